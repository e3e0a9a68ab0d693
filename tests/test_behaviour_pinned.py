"""A short run's pseudo-labels and final weights, pinned: moving code between modules must not change them.

The hashes were recorded on the code before issue 20's restructuring (1 process, and 2 gloo processes on
CPU, OMP_NUM_THREADS=1). A change that is meant to alter results (a new default, a different k-means)
updates them deliberately, saying why in its commit."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

PINNED = {  # world size -> (labels.npy's sha256, the final model weights' sha256)
    1: ("f9b3247e94110bb2593b95821275a33fd104eadc1d42065dbdf95b50980259ce",
        "6b6b081692ad4abef9ba841e4ff18ab88503de7d2d3f34d42ada83cb2c53a558"),
    2: ("f33b609f5bda17af22c727a208f76d10ebe6131d75c3cb0b7104b3333c24e541",
        "a0ee44eb4e17e24c57817894376ad0826a580d3ef53628d96dcd0a66012aae83"),
}


def weights_digest(state_dict: dict) -> str:
    """sha256 over every tensor of a state_dict, by sorted key: its name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def run_digests(nproc: int, shards: Path, run_dir: Path) -> tuple[str, str]:
    train = ["-m", "dcscale", "train", "--config", str(Path(__file__).parent / "train_test.yaml"),
             *tiny_run_overrides(shards, run_dir, seed=3, **{"cluster.pca_dim": 16})]
    cmd = [sys.executable, *train] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.load(run_dir / "labels.npy")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["cycle"] == 2, "the final checkpoint is the one written after the last cycle"
    np.testing.assert_array_equal(ckpt["labels"].numpy(), labels)
    return hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(), weights_digest(ckpt["model"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_labels_and_weights_are_pinned(nproc, digits_train_shards, tmp_path):
    assert run_digests(nproc, digits_train_shards, tmp_path / "run") == PINNED[nproc]
