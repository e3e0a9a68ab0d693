"""tools/bench_gpu.py runs end to end at its smallest settings on the CPU (so that it cannot rot
before it meets a GPU): every phase measured for both networks and both CPU precisions, one table,
one JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_run_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--images", "8", "--image-size", "64", "--batch", "4", "--steps", "2", "--warmup", "1",
                       "--k", "10", "--workers", "0", "--kmeans-n", "2000", "--kmeans-d", "16", "--kmeans-k", "10",
                       "--kmeans-iter", "2", "--device", "cpu", "--data-dir", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    assert [(r["arch"], r["precision"]) for r in result["rows"]] == [
        ("alexnet", "fp32"), ("alexnet", "bf16"), ("resnet50", "fp32"), ("resnet50", "bf16")]  # no fp16 on a CPU
    for row in result["rows"]:
        assert row["forward_ips"] > 0 and row["extraction_ips"] > 0 and row["train_ips"] > 0
    assert result["kmeans_s"] > 0 and result["kmeans_gpus"] == 0 and result["decode_ips_per_core"] > 0
    table = capsys.readouterr().out
    assert "| model | precision | forward img/s | extraction img/s |" in table
    assert table.count("| alexnet |") == 2 and "faiss k-means 2,000 x 16 -> 10 centroids" in table
