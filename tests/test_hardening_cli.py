"""Issue 21, part B: `dcscale train --check` refuses what training refuses, CLI arguments are validated,
output paths fail with one line, and a failed start leaves nothing behind.

Most cases run the CLI in this process (`dcscale.cli.main`, the same code as the command, without a
torch import per case); the launcher cases run the real scripts."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from dcscale.cli import main as dcscale_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `dcscale ARGV` in this process: it must exit 2 with exactly one line on stderr, which is returned."""
    code = dcscale_main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, out[-2000:] + err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def check_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--check", "--config", CONFIG,
            *tiny_run_overrides(shards, run_dir, **{"train.cycles": 1}), *extra]


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. `dcscale train --check` opens what training opens ----------------------------------------------

def test_check_passes_on_good_inputs(digits_train_shards, tmp_path, capsys):
    assert dcscale_main(check_args(digits_train_shards, tmp_path / "run")) == 0
    assert "config and inputs ok" in capsys.readouterr().out
    assert not (tmp_path / "run").exists(), "--check writes nothing"


def _truncated_tar(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "truncated")
    os.truncate(root / "shard-000003.tar", 100_000)
    return root


def _missing_shard(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "missing")
    (root / "shard-000005.tar").unlink()
    return root


def _lying_manifest(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "lying")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.replace('"count": 37', '"count": 38').replace('"total": 1437',
                                                                                          '"total": 1438'))
    return root


@pytest.mark.parametrize("damage, message", [
    (_truncated_tar, "shard-000003.tar: 100000 bytes but the manifest says"),
    (_missing_shard, "shard not found:"),
    (_lying_manifest, "shard-000007.tar: holds 37 samples but"),
])
def test_check_verifies_the_tars_against_the_manifest(damage, message, digits_train_shards, tmp_path, capsys):
    line = one_error_line(capsys, check_args(damage(digits_train_shards, tmp_path), tmp_path / "run"))
    assert message in line


def _garbage(tmp: Path) -> str:
    path = tmp / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all\n" * 10)
    return str(path)


@pytest.mark.parametrize("setting, message", [
    (lambda t: f"model.init={_garbage(t)}", "model.init: "),
    (lambda t: f"resume={_garbage(t)}", "damaged or not a checkpoint"),
    (lambda t: "cluster.k=5000", "cluster.k = 5000 is more than the 1437 images"),
    (lambda t: "cluster.pca_dim=5000", "cluster.pca_dim = 5000 is more than the 84 feature dimensions of lenet5"),
    (lambda t: "data.image_size=1", "cannot take 1x1 inputs"),
    (lambda t: "data.mean=[0.5,0.5,0.5]", "data.mean has 3 values but the images have 1 channel"),
    (lambda t: "data.std=[0.5,0.5]", "data.std has 2 values but the images have 1 channel"),
])
def test_check_refuses_what_training_refuses(setting, message, digits_train_shards, tmp_path, capsys):
    line = one_error_line(capsys, check_args(digits_train_shards, tmp_path / "run", setting(tmp_path)))
    assert message in line


def test_check_refuses_sync_bn_on_cpu_for_several_processes(digits_train_shards, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: SyncBatchNorm runs")
    argv = check_args(digits_train_shards, tmp_path / "run", "model.sync_bn=true")
    assert dcscale_main(argv) == 0  # one process: nothing to synchronise
    capsys.readouterr()
    assert "model.sync_bn = true with processes on cpu" in one_error_line(capsys, [*argv, "--nproc", "2"])


def test_check_refuses_a_run_directory_held_by_a_live_run(digits_train_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        held.write("host elsewhere, pid 4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `dcscale train` holds it
        line = one_error_line(capsys, check_args(digits_train_shards, run_dir))
    assert "is in use by another run (host elsewhere, pid 4242)" in line
    assert dcscale_main(check_args(digits_train_shards, run_dir)) == 0  # released: free again


def test_torchrun_sh_checks_once_and_never_starts_workers(digits_train_shards, tmp_path):
    """A garbage model.init is refused by the launcher's check in one line: no worker starts, nothing restarts."""
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "3",
                           "--", "--config", CONFIG, *tiny_run_overrides(digits_train_shards, tmp_path / "run"),
                           f"model.init={_garbage(tmp_path)}"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dcscale: error: model.init: ") and proc.stdout == ""
    assert time.monotonic() - started < 60
