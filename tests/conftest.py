"""Shared, session-scoped fixtures: small digits shard sets (several shards each) built once per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcscale.data.build import build_digits

DIGITS_SAMPLES_PER_SHARD = 200  # 1437 train samples -> 8 shards, 360 test samples -> 2 shards


@pytest.fixture(scope="session")
def digits_train_shards(tmp_path_factory) -> Path:
    """Path to the digits train split (1437 labelled 8x8 grey images) as a shard set."""
    out = tmp_path_factory.mktemp("digits") / "train"
    build_digits(out, split="train", samples_per_shard=DIGITS_SAMPLES_PER_SHARD)
    return out


@pytest.fixture(scope="session")
def digits_test_shards(tmp_path_factory) -> Path:
    """Path to the digits test split (360 labelled 8x8 grey images) as a shard set."""
    out = tmp_path_factory.mktemp("digits") / "test"
    build_digits(out, split="test", samples_per_shard=DIGITS_SAMPLES_PER_SHARD)
    return out


def tiny_run_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """key=value overrides for a tiny, fast training run on a shard set (end-to-end tests)."""
    base = {
        "data.train": str(shards), "data.image_size": 32, "data.workers": 0, "model.arch": "lenet5",
        "cluster.k": 10, "cluster.pca_dim": 16, "cluster.niter": 10, "train.cycles": 2,
        "train.batch_size": 64, "train.augment": "small", "train.hflip": False, "train.lr": 0.05,
        "output.dir": str(run_dir), "dist.timeout_min": 2, "cluster.wait_timeout_min": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def halted_image_run(digits_train_shards, digits_test_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny 2-cycle `dcscale train` that clusters at cycle 0 only (cluster.halt_after=1), with TensorBoard
    images and the k-NN monitor every cycle, and a progress line at every tenth of a phase (its stderr is
    a pipe, not a terminal): (run dir, the finished process)."""
    run_dir = tmp_path_factory.mktemp("images") / "run"
    overrides = tiny_run_overrides(digits_train_shards, run_dir, **{
        "cluster.halt_after": 1, "output.images_every": 1, "data.test": digits_test_shards, "eval.knn_every": 1})
    proc = subprocess.run([sys.executable, "-m", "dcscale", "train", "--config",
                           str(Path(__file__).parent / "train_test.yaml"), *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DCSCALE_PROGRESS_S": "0"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_result(reference: Path, run_dir: Path) -> None:
    """Two 2-cycle runs ended with the same pseudo-labels and the same per-cycle numbers."""
    ref, got = metrics(reference), metrics(run_dir)
    assert [r["cycle"] for r in got] == [r["cycle"] for r in ref] == [0, 1]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["nmi_gt"] == pytest.approx(a["nmi_gt"], abs=1e-9)
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-6)
    np.testing.assert_array_equal(np.load(reference / "labels.npy"), np.load(run_dir / "labels.npy"))


def one_line(stderr: str) -> str:
    """The one `dcscale: error` line of a failed command (and no traceback)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("dcscale: error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def peak_rss_growth(fn):
    """fn's result and the growth of this process's peak resident memory while it ran (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    before = status("VmRSS")
    result = fn()
    return result, status("VmHWM") - before

