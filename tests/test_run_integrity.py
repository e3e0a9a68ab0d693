"""A run directory is owned, verified and never corrupted: checkpoints cannot run code, one run per
directory (a lock that dies with its holder), workers die with torchrun, a resume keeps the run's
config, damaged checkpoints are skipped, and a full disk or a read-only directory is one line."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, tiny_run_overrides
from test_train_run import ENV, _cmd, metrics, run_train

from dcscale.cli import main
from dcscale.config import load_config
from dcscale.data.build import write_shard_set
from dcscale.data.converters import SourceData
from dcscale.train.checkpoint import load_checkpoint, save_checkpoint

CONFIG = str(Path(__file__).parent / "train_test.yaml")


class RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears if a loader runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": RunsCode(marker), "config": {}, "image_shape": [1, 32, 32]}, path)
    return path


def train_in_process(capsys, overrides: list[str]) -> tuple[int, str]:
    """`dcscale train` in this process: (exit code, stderr)."""
    try:
        code = main(["train", "--config", CONFIG, *overrides])
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(digits_train_shards, tmp_path_factory) -> Path:
    """A finished 2-cycle run (periodic checkpoints after cycles 0 and 1, and last.pt)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(1, tiny_run_overrides(digits_train_shards, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))
    return to


# ---- checkpoints cannot run code -----------------------------------------------------------------

def test_a_crafted_checkpoint_is_refused_and_runs_nothing(finished_run, digits_train_shards, digits_test_shards,
                                                          tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)

    code, err = train_in_process(capsys, tiny_run_overrides(digits_train_shards, tmp_path / "a",
                                                            **{"model.init": evil}))
    assert code == 2 and "refused: it holds a Python object (io.open)" in one_line(err)

    code = main(["probe", "--checkpoint", str(evil), "--train", str(digits_train_shards), "--test",
                 str(digits_test_shards), "--layer", "relu2", "--epochs", "1", "--workers", "0"])
    assert code == 2 and "refused" in one_line(capsys.readouterr().err)

    run_dir = copy_run(finished_run, tmp_path / "b")
    for periodic in (run_dir / "checkpoints").glob("cycle*.pt"):
        periodic.unlink()
    crafted_checkpoint(run_dir / "checkpoints" / "last.pt", marker)
    code, err = train_in_process(capsys, tiny_run_overrides(digits_train_shards, run_dir,
                                                            **{"resume": "auto", "train.cycles": 3}))
    line = one_line(err)
    assert code == 2 and "no intact checkpoint to resume from" in line and "refused" in line
    assert not marker.exists(), "loading a checkpoint ran code from it"


# ---- one run per directory; workers die with their launcher ---------------------------------------

def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


def test_one_run_per_directory_and_workers_die_with_torchrun(digits_train_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 200})
    first = subprocess.Popen(_cmd(2, overrides), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").is_file():  # the first cycle is done
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = _children(first.pid)
        assert len(workers) == 2
        holder = (run_dir / ".lock").read_text()
        assert f"host {socket.gethostname()}, pid " in holder and any(f"pid {w}," in holder for w in workers)

        # A second run on the same directory, one process or a torchrun group, is refused at once
        # (its rank 1 learns rank 0's refusal instead of waiting in a collective).
        lines_before = (run_dir / "metrics.jsonl").read_text().count("\n")
        for nproc in (1, 2):
            second = run_train(nproc, overrides + ["resume=auto"], timeout=120)
            assert second.returncode != 0
            errors = [ln for ln in second.stderr.splitlines() if ln.startswith("dcscale: error")]
            # rank 0 names the holder; another rank says the same or leaves silently (exit 2), never
            # something else (seen once in about ten runs: rank 1 silent)
            assert errors and all("is in use by another run" in ln and holder.strip() in ln for ln in errors), \
                "\n".join(ln for ln in second.stderr.splitlines() if ln.startswith("dcscale"))
            assert any(ln.startswith("dcscale: error" + ("" if nproc == 1 else " on rank 0")) for ln in errors)
            assert "dcscale: failed" not in second.stderr  # (no rank's traceback; torchrun adds its own report)
        assert first.poll() is None, "the first run goes on"
        assert (run_dir / "metrics.jsonl").read_text().count("\n") >= lines_before

        # SIGKILL to torchrun alone (not its group): the workers, in sessions of their own, follow it.
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived torchrun"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        for w in _children(first.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)

    # The lock died with its holder: the run can be resumed (and its extension is recorded).
    done = load_checkpoint(run_dir / "checkpoints" / "last.pt")["cycle"]
    resumed = run_train(1, tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": done,
                                                                               "resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing to do" in resumed.stdout


def test_prune_leaves_other_processes_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    foreign_tmp = folder / ".cycle00009_epoch000_step00000000.pt.999999.tmp"
    foreign_tmp.write_bytes(b"being written by someone else")
    newer = folder / "cycle00009_epoch000_step00000000.pt"
    newer.write_bytes(b"x")
    for cycle in (1, 2, 3):
        save_checkpoint({"cycle": cycle, "epoch": 0, "step": 0, "w": torch.ones(3)}, tmp_path, keep_last=2)
    left = sorted(p.name for p in folder.iterdir())
    assert left == [foreign_tmp.name, "cycle00002_epoch000_step00000000.pt", "cycle00003_epoch000_step00000000.pt",
                    newer.name, "last.pt"]
    assert load_checkpoint(folder / "last.pt")["cycle"] == 3


# ---- a run directory belongs to one config -----------------------------------------------------------

def _rgb_shards(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    source = SourceData(samples=[(im, i % 2) for i, im in enumerate(images)], num_samples=n,
                        class_names=["a", "b"], description="rgb noise")
    write_shard_set(source, root, samples_per_shard=20)
    return root


def test_a_resume_keeps_the_runs_config(finished_run, digits_train_shards, digits_test_shards, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    kept = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "labels.npy")}

    code, err = train_in_process(capsys, tiny_run_overrides(digits_train_shards, run_dir, **{
        "resume": "auto", "cluster.k": 5, "train.lr": 0.01}))
    line = one_line(err)
    assert code == 2 and "holds a run with another config: cluster.k (10 -> 5), train.lr (0.05 -> 0.01)" in line
    assert "give a new output.dir" in line

    code, err = train_in_process(capsys, tiny_run_overrides(digits_test_shards, run_dir, **{"resume": "auto"}))
    assert code == 2 and f"data.train ({digits_train_shards} -> {digits_test_shards})" in one_line(err)
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept, "a refused resume wrote into the run"

    # Another run's checkpoint, given as resume=PATH to start a new run: the network must fit.
    last = finished_run / "checkpoints" / "last.pt"
    bad_inputs = [
        (tiny_run_overrides(digits_train_shards, tmp_path / "a", **{"model.arch": "alexnet_small"}),
         "holds a lenet5 network; this run builds a alexnet_small"),
        (tiny_run_overrides(_rgb_shards(tmp_path / "rgb"), tmp_path / "c", **{"cluster.k": 4}),
         "was written for 1x32x32 inputs; this run's are 3x32x32"),
        (tiny_run_overrides(digits_test_shards, tmp_path / "s"),
         f"was written for a shard set of 1437 images; {digits_test_shards} has 360"),
    ]
    for overrides, expected in bad_inputs:
        code, err = train_in_process(capsys, overrides + [f"resume={last}"])
        assert code == 2 and expected in one_line(err)

    # A new run (fresh, or from another run's checkpoint) never takes over a directory holding a run.
    checkpoints = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    for resume in ("null", str(last)):
        code, err = train_in_process(capsys, tiny_run_overrides(digits_train_shards, run_dir, resume=resume))
        assert code == 2 and f"output.dir {run_dir} already holds a run (checkpoint last.pt)" in one_line(err)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == checkpoints
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept

    # Keys that only extend or watch the run may change; config.yaml records them and still loads.
    extended = tiny_run_overrides(digits_train_shards, run_dir, **{
        "resume": "auto", "train.cycles": 3, "checkpoint.keep_last": 1, "data.extract_batch_size": 100})
    code, err = train_in_process(capsys, extended)
    assert code == 0, err
    history = (run_dir / "config.yaml").read_text().split("(key: old -> new, from that cycle on):\n")[1]
    assert history.splitlines() == ["# cycle 2: data.extract_batch_size: 256 -> 100", "# cycle 2: train.cycles: 2 -> 3",
                                    f"# cycle 2: output.dir: {finished_run} -> {run_dir}",  # (a copy)
                                    "# cycle 2: checkpoint.keep_last: 2 -> 1"]
    assert load_config(run_dir / "config.yaml") == load_config(CONFIG, extended)
    assert [r["cycle"] for r in metrics(run_dir)] == [0, 1, 2]


# ---- damaged checkpoints --------------------------------------------------------------------------

def flip_a_weight_bit(path: Path) -> None:
    """Flip one bit inside the largest tensor's bytes (a flip there still loads without a checksum)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def results(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without the timings and memory (which vary from run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith(("t_", "ips_", "peak_"))} for r in rows]


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(finished_run, digits_train_shards, tmp_path,
                                                                   capsys, caplog):
    run_dir = copy_run(finished_run, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    after_cycle0 = ckpts / "cycle00001_epoch000_step00000000.pt"
    after_cycle1 = ckpts / "cycle00002_epoch000_step00000000.pt"
    overrides = tiny_run_overrides(digits_train_shards, run_dir, **{"resume": "auto"})

    flip_a_weight_bit(ckpts / "last.pt")
    code, err = train_in_process(capsys, overrides)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{ckpts / 'last.pt'}: damaged: its content does not match the checksum written with "
                               f"it; resuming from {after_cycle1}, the newest intact checkpoint"]
    assert load_checkpoint(ckpts / "last.pt")["cycle"] == 2, "last.pt is whole again"

    # The newest periodic one damaged too: back to the end of cycle 0, and cycle 1 is trained again,
    # exactly as before.
    flip_a_weight_bit(ckpts / "last.pt")
    flip_a_weight_bit(after_cycle1)
    caplog.clear()
    code, err = train_in_process(capsys, overrides)
    assert code == 0, err
    assert f"(and 1 more); resuming from {after_cycle0}" in [r.getMessage() for r in caplog.records
                                                               if r.levelname == "WARNING"][0]
    assert results(metrics(run_dir)) == results(metrics(finished_run))

    for path in ckpts.glob("*.pt"):
        flip_a_weight_bit(path)
    code, err = train_in_process(capsys, overrides)
    assert code == 2 and f"no intact checkpoint to resume from in {ckpts}" in one_line(err)


# ---- a directory that cannot be written, a full disk -----------------------------------------------

def _without_root_override():
    """For a child process: no CAP_DAC_OVERRIDE, so that root, too, obeys file modes."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(24, 1, 0, 0, 0) == 0  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE


def test_a_directory_that_cannot_be_written_is_one_line(finished_run, digits_train_shards, tmp_path):
    locked = tmp_path / "read_only"
    locked.mkdir()
    run_dir = copy_run(finished_run, tmp_path / "run")
    try:
        locked.chmod(0o555)
        (run_dir / "checkpoints").chmod(0o555)
        for overrides, expected in [
            (tiny_run_overrides(digits_train_shards, locked / "run"),
             f"dcscale: error: output.dir {locked / 'run'} is not writable: Permission denied"),
            (tiny_run_overrides(digits_train_shards, run_dir, **{"resume": "auto", "train.cycles": 3}),
             f"dcscale: error: {run_dir / 'checkpoints'} is not writable: Permission denied"),
        ]:
            proc = subprocess.run(_cmd(1, overrides), env=ENV, capture_output=True, text=True, timeout=240,
                                  preexec_fn=_without_root_override)
            assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        locked.chmod(0o755)
        (run_dir / "checkpoints").chmod(0o755)


@contextlib.contextmanager
def small_disk(path: Path, size: int):
    """`path` on a tmpfs of `size` bytes (root), else (None) for RLIMIT_FSIZE instead."""
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_is_one_line_and_loses_nothing(finished_run, digits_train_shards, tmp_path):
    files = sorted(p for p in finished_run.rglob("*") if p.is_file() and p.name != ".lock")
    used = sum(p.stat().st_size + 4096 for p in files)
    checkpoint_size = (finished_run / "checkpoints" / "last.pt").stat().st_size
    with small_disk(tmp_path / "disk", used + checkpoint_size // 2) as mounted:
        run_dir = copy_run(finished_run, tmp_path / "disk" / "run")
        before = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        limit = None
        if not mounted:  # a file may not grow past half a checkpoint: writes fail with EFBIG
            limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (checkpoint_size // 2,) * 2)  # noqa: E731
        overrides = tiny_run_overrides(digits_train_shards, run_dir, **{"resume": "auto", "train.cycles": 3})
        proc = subprocess.run(_cmd(1, overrides), env=ENV, capture_output=True, text=True, timeout=240,
                              preexec_fn=limit)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        reason = "No space left on device" if mounted else "File too large"
        assert last.startswith(f"dcscale: error: cannot write {run_dir / 'checkpoints' / 'last.pt'}: {reason}")
        assert last.endswith(f"nothing was lost: the newest checkpoint {run_dir / 'checkpoints' / 'last.pt'} is intact "
                             f"(free space, then run again with resume=auto)")
        after = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # (verified against its checksum)
        assert after["cycle"] == before["cycle"] == 2
        assert not list((run_dir / "checkpoints").glob(".*.tmp")), "no partial file left to fill the disk"
