"""A checkpoint written by the code before the run state got its state_dict()/load_state_dict() (main at
88b8aa5, checkpoint format 2) still loads, resumes to the same result, and is written back the same.

tests/data/checkpoint_format2_mid_epoch.pt is that code's `checkpoints/cycle00001_epoch000_step00000010.pt`
of test_behaviour_pinned's 1-process run (digits, seed=3, cluster.pca_dim=16) with checkpoint.every_steps=10
and checkpoint.keep_last=20: mid-epoch in the second cycle, so it holds a head optimizer, previous labels,
running totals, the RNG state and the last metrics row. A deliberate change of test_behaviour_pinned's
PINNED[1] (new results) changes where this checkpoint's resume ends too: then regenerate the file the same
way, with the code of that change, and say so in its commit."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_run_overrides
from test_behaviour_pinned import PINNED, weights_digest

from dcscale.config import config_from_dict
from dcscale.cycle.checkpoint import DIGEST_KEY, content_digest
from dcscale.models import build_model_from_config
from dcscale.train.optim import body_optimizer
from dcscale.train.checkpoint import Checkpointer, RunState, load_checkpoint

OLD = Path(__file__).parent / "data" / "checkpoint_format2_mid_epoch.pt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_old_checkpoint_resumes_to_the_pinned_result(digits_train_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dcscale", "train", "--config", str(Path(__file__).parent / "train_test.yaml"),
           *tiny_run_overrides(digits_train_shards, run_dir, seed=3, **{"cluster.pca_dim": 16}), f"resume={OLD}"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {OLD} at cycle 1 step 10" in proc.stdout
    labels = np.load(run_dir / "labels.npy")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["cycle"] == 2
    got = hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(), weights_digest(ckpt["model"])
    assert got == PINNED[1], "resuming the old checkpoint ends where the uninterrupted run ends"


def test_old_checkpoint_is_written_back_unchanged():
    """Restored into a fresh network and optimizer and saved again, the old checkpoint's content (and so
    its checksum) comes back the same: the format did not change."""
    old = load_checkpoint(OLD)
    cfg = config_from_dict(old["config"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg, in_channels=1, image_size=32)
    body_opt = body_optimizer(model, cfg)
    checkpointer = Checkpointer(OLD.parent, cfg, len(old["labels"]), (1, 32))
    state = RunState()
    head_opt = checkpointer.load(old, OLD, model, body_opt, state)
    assert (state.cycle, state.epoch, state.step, state.clustered_this_cycle) == (1, 0, 10, True)
    assert head_opt is not None and state.prev_labels is not None and state.last_row["cycle"] == 0
    again = checkpointer.state_dict(model, body_opt, head_opt, state)
    assert list(again) == [k for k in old if k != DIGEST_KEY]
    assert content_digest(again) == torch.load(OLD, weights_only=True)[DIGEST_KEY]
