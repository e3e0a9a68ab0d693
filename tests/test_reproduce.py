"""tools/reproduce_deep_dive.py at its smallest (--tiny, digits): real IA sampling, training sweeps and
probes end to end, then the JSON of every number, the PNG figures, the tables and the blocks of docs/deep_dive.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "reproduce_deep_dive.py"
BLOCKS = ("setup", "ia", "k", "halt", "pca", "seeds")


@pytest.mark.timeout(600)
def test_tiny_reproduction_writes_every_number_figure_and_table(tmp_path):
    doc = tmp_path / "deep_dive.md"
    original = (ROOT / "docs" / "deep_dive.md").read_text()
    doc.write_text(original)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(TOOL), "--tiny", "--dataset", "digits", "--out", str(out),
                           "--doc", str(doc)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    r = json.loads((out / "deep_dive.json").read_text())
    assert r["dataset"] == "digits" and r["n_train"] == 1437 and r["n_test"] == 360 and r["cycles"] == 2
    assert r["probe"]["protocol"] == "deepdive" and r["probe"]["layer"] == "conv2"
    assert r["probe"]["settings"]["epochs"] == 1  # --tiny's; the full run keeps the protocol's 20
    # 1. IA over random initialisations, at the authors' K
    assert r["ia_distribution"]["k"] == 9 and r["ia_distribution"]["seeds"] == [0, 1, 2]
    assert all(0 < v < 1 for v in r["ia_distribution"]["ia"])
    # 2. median IA and median accuracy per K (the config's K=5 and 10)
    by_k = r["versus_k"]["by_k"]
    assert [b["k"] for b in by_k] == [5, 10] and all(0 < b["probe_top1_median"] <= 1 for b in by_k)
    assert [b["ia_n"] for b in by_k] == [2, 2] and 0 < r["versus_k"]["random_init_probe_top1"] <= 1
    # 3. early clustering stop: clustering once against every cycle
    (once,) = r["halt"]["runs"]
    assert once["values"] == {"cluster.halt_after": 1} and once["clustering_cycles"] == 1
    assert r["halt"]["reference"]["clustering_cycles"] == 2 and r["halt"]["reference_value"] is None
    assert once["time_total_s"] > 0 and once["time_clustering_s"] > 0
    # 4. PCA dimensions
    assert [row["values"] for row in r["pca"]["runs"]] == [{"cluster.pca_dim": 8}]
    # 5. IA of a seed against its final accuracy; a run's IA is `dcscale ia`'s for that seed
    assert [row["values"]["seed"] for row in r["seeds"]["runs"]] == [0, 1]
    assert r["seeds"]["ia_equals_dcscale_ia"] == {"compared": 2, "max_abs_diff": 0.0}
    assert r["timing"]["total_wall_s"] > 0

    for name in r["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["figures"]) == 5
    tables = (out / "deep_dive.md").read_text()
    new = doc.read_text()
    for name in BLOCKS:
        body = re.search(rf"<!-- deep_dive:{name} -->\n(.*?)<!-- /deep_dive:{name} -->", tables, re.S).group(1)
        assert body.strip() and f"<!-- deep_dive:{name} -->\n{body}<!-- /deep_dive:{name} -->" in new
    assert "| 1 (cluster once) | 1 |" in tables and "| 10 |" in tables

    def outside_blocks(text):
        return re.sub(r"(<!-- deep_dive:(\w+) -->\n).*?(<!-- /deep_dive:\2 -->)", r"\1\3", text, flags=re.S)

    assert outside_blocks(new) == outside_blocks(original), "only the blocks' bodies change"
