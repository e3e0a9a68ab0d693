"""tools/bench_scale.py: its memory attribution at phase boundaries, and a tiny end-to-end run under
torchrun at W = 1 and 2 (so that the benchmark behind docs/scaling.md's figures cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "tools" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scale", None)


def test_a_phase_does_not_inherit_the_peak_of_the_phase_before(bench):
    # Sample k covers (t[k-1], t[k]]: the previous phase peaked at 900 just before t = 2 and freed it.
    trace = bench.RankTrace(pid=0, t=[0, 1, 2, 3, 4, 5], peak_kb=[10, 50, 900, 20, 30, 40],
                            rss_kb=[10, 40, 20, 20, 25, 35], fds=[1] * 6)
    assert trace.window(1.5, 4.5)["peak_mb"] * 1024 == 40  # straddling the start: its RSS (20), not 900
    assert trace.window(0.5, 1.9)["peak_mb"] * 1024 == 900  # straddling the end: its peak (an upper bound)
    assert trace.window(2.1, 2.2)["peak_mb"] * 1024 == 20  # within one interval: that sample's peak
    assert trace.window(1.5, 4.5)["start_mb"] * 1024 == 40  # the RSS read last before the window


def test_tiny_run_at_one_and_two_processes(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--n", "3000", "--world", "1", "2", "--k", "20", "--steps", "3", "--niter", "3",
                       "--samples-per-shard", "500", "--poll-ms", "50", "--timeout-min", "5", "--out", str(out)]) == 0
    result = json.loads((out / "bench_scale.json").read_text())
    assert [(r["n"], r["world"]) for r in result["runs"]] == [(3000, 1), (3000, 2)]
    for run in result["runs"]:
        assert "error" not in run and run["steps"] >= 3  # (a tiny epoch may end before the stop is seen)
        assert set(run["phases"]) == set(bench.PHASES)
        for phase in bench.TIMED_PHASES:
            assert run["phases"][phase]["seconds"] >= 0
            assert len(run["phases"][phase]["ranks"]) == run["world"]
        # The distributed default: no k-means rows travel to rank 0; the sums are all-reduced at W = 2.
        assert run["bytes"]["kmeans_mode"] == "distributed" and run["bytes"]["to_rank0_kmeans"] == 0
        assert (run["bytes"]["kmeans_all_reduce_per_iter"] > 0) == (run["world"] == 2)
    assert "| 3,000 | 2 | distributed |" in capsys.readouterr().out
