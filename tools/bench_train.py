"""Per-phase seconds and images/s of the DeepCluster cycle, with 1 and 2 processes, side by side.

Builds a larger digits-based shard set (the 1,797 digits, each also shifted by a few pixels, as real
PNGs in tars), then runs `dcscale train` for two cycles with `cluster.halt_after=1` under torchrun
with 1 and with 2 processes, and measures the model's forward-only throughput on preloaded tensors
(the ceiling the extraction pipeline is judged against) next to the extraction pass itself, with the
same model, batch size and thread count, in the same process. Prints markdown tables.

    python tools/bench_train.py [--copies 8] [--workers 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_bench_shards(out: Path, copies: int) -> Path:
    from sklearn.datasets import load_digits

    from dcscale.data.manifest import FORMAT_VERSION, Manifest, save_manifest
    from dcscale.data.writers import ShardSetWriter

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    writer = ShardSetWriter(out, samples_per_shard=2000)
    for copy in range(copies):
        shifts = rng.integers(-1, 2, size=(len(images), 2)) if copy else np.zeros((len(images), 2), int)
        for image, label, (dy, dx) in zip(images, digits.target, shifts):
            writer.write(np.roll(image, (dy, dx), axis=(0, 1)), label=int(label))
    stats = writer.close()
    save_manifest(Manifest(FORMAT_VERSION, stats.shards, stats.total, True, 10, [str(c) for c in range(10)],
                           f"digits x{copies} (shifted copies), benchmark", [1, 8, 8], 1), out)
    return out


def _bench_model():
    from dcscale.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, image_size=32, num_classes=30).eval()


def forward_only_ips(shards: Path, batch_size: int, repeats: int = 3) -> float:
    """Images/s of the demo model's feature pass on tensors already in memory (1 thread, best of
    `repeats` passes over as many images as the shard set holds)."""
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform

    ss = ShardSet(shards)
    tf = eval_transform(32, 1)
    batch = torch.stack([tf(ss.read(i).image) for i in range(batch_size)])
    n_batches = max(1, len(ss) // batch_size)
    model = _bench_model()
    torch.set_num_threads(1)
    best = 0.0
    with torch.no_grad():
        model.features(batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n_batches):
                model.features(batch)
            best = max(best, n_batches * batch_size / (time.perf_counter() - t0))
    return best


def extraction_ips(shards: Path, batch_size: int, workers: int, repeats: int = 3) -> float:
    """Images/s of the real extraction pass (phases.extract_features: shard reads, decode, transform,
    the same model and batch size, 1 thread) over the whole shard set in this process, best of
    `repeats`; includes the DataLoader workers' start, as in a training run."""
    from dcscale.dist import DistEnv
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle import phases

    ss = ShardSet(shards)
    model = _bench_model()
    torch.set_num_threads(1)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        indices, _, _ = phases.extract_features(model.features, ss, eval_transform(32, 1), DistEnv(), batch_size,
                                                workers)
        best = max(best, len(indices) / (time.perf_counter() - t0))
    return best


def run_cycles(shards: Path, nproc: int, workers: int, run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dcscale", "train", "--config", str(ROOT / "configs" / "digits_demo.yaml"),
           f"data.train={shards}", "data.test=null", f"data.workers={workers}", "eval.knn_every=null",
           "train.cycles=3", "cluster.halt_after=2", f"output.dir={run_dir}", "resume=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="shifted copies of the 1,797 digits")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dcscale-bench-train-"))
    shards = build_bench_shards(tmp / "shards", args.copies)
    n = 1797 * args.copies
    results = {"n": n, "forward_only_ips": forward_only_ips(shards, 256),
               "extraction_ips": extraction_ips(shards, 256, args.workers)}
    for nproc in (1, 2):
        rows = run_cycles(shards, nproc, args.workers, tmp / f"run{nproc}")
        # cycle 1: clustered (past the first cycle's warm-up); cycle 2: after the halt
        results[f"p{nproc}"] = {"clustered": rows[1], "halted": rows[2]}
    if args.json:
        print(json.dumps(results))
        return 0
    fwd, ext = results["forward_only_ips"], results["extraction_ips"]
    print(f"N = {n} images (8x8 PNG, upscaled to 32x32), LeNet-5, K=30, PCA 32, "
          f"{args.workers} loader worker(s) per rank, batch 256, 1 thread\n")
    print("| in one process, best of 3 | img/s |\n|---|---|")
    print(f"| forward-only on preloaded tensors | {fwd:,.0f} |")
    print(f"| extraction (shards -> decode -> transform -> forward) | {ext:,.0f} ({ext / fwd:.0%} of forward-only) |\n")
    print("| processes | extract s | extract img/s | pca s | kmeans s | assign s | train s | train img/s "
          "| cycle s (clustering) | cycle s (after halt) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for nproc in (1, 2):
        c, h = results[f"p{nproc}"]["clustered"], results[f"p{nproc}"]["halted"]
        print(f"| {nproc} | {c['t_extract']:.2f} | {c['ips_extract']:,.0f} | {c['t_pca']:.2f} | {c['t_kmeans']:.2f} "
              f"| {c['t_assign']:.2f} | {c['t_train']:.2f} | {c['ips_train']:,.0f} | {c['t_cycle']:.2f} "
              f"| {h['t_cycle']:.2f} |")
    e1, e2 = results["p1"]["clustered"]["ips_extract"], results["p2"]["clustered"]["ips_extract"]
    print(f"\nextraction speed-up 2 vs 1 process: {e2 / e1:.2f}x; 1-process extraction in `dcscale train` "
          f"at {e1 / fwd:.0%} of forward-only throughput (the training run's extract time also counts "
          f"process-group and worker start-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
