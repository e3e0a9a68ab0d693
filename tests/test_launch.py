"""Launchers end to end: `launch/slurm.py` through submitit's LocalExecutor (2 CPU tasks, gloo), with a
time-limit signal, requeue and resume; `launch/torchrun.sh` with a worker killed and the group restarted.

Every interrupted run must end with the labels and per-cycle losses of the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
SLURM = [sys.executable, str(ROOT / "launch" / "slurm.py")]
TORCHRUN = str(ROOT / "launch" / "torchrun.sh")
CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
# Two CPU processes on this machine; a time limit far away (the test delivers the time-limit signal itself).
LOCAL = ["--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "10"]


def _overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_run_overrides(shards, run_dir, **{"checkpoint.every_steps": 4, **extra})


def submit(args: list[str], timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run([*SLURM, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank0_log(run_dir: Path) -> str:
    (log,) = (run_dir / "submitit").glob("*_0_log.out")
    return log.read_text()


def wait_for_file(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, f"no {pattern} in {folder} after {timeout} s"
        time.sleep(0.05)


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def assert_same_result(reference: Path, run_dir: Path) -> None:
    ref, got = metrics(reference), metrics(run_dir)
    assert [r["cycle"] for r in got] == [r["cycle"] for r in ref] == [0, 1]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["nmi_gt"] == pytest.approx(a["nmi_gt"], abs=1e-9)
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-6)
    np.testing.assert_array_equal(np.load(reference / "labels.npy"), np.load(run_dir / "labels.npy"))


@pytest.fixture(scope="module")
def local_run(digits_train_shards, tmp_path_factory):
    """An uninterrupted 2-task job under submitit's LocalExecutor: the reference for the other runs."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    proc = submit(["--config", CONFIG, *LOCAL, *_overrides(digits_train_shards, run_dir)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir, proc


# ---- submission: bad input, dry run ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--partiton", "gpu"], "unknown option --partiton (did you mean --partition?)"),
    (["--nodes", "0"], "--nodes 0: expected an integer >= 1"),
    (["--cluster", "local", "--nodes", "2"], "--nodes 2: --cluster local runs on this machine, use --nodes 1"),
    (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
    (["--timeout-min", "0"], "--timeout-min 0: expected a number > 0"),
    (["cluster.kk=3"], "unknown config key 'cluster.kk' in the command line (did you mean 'cluster.k'?)"),
    (["train.lr=-1"], "train.lr = -1.0 in the command line: expected a number > 0"),
    (["data.train=/nonexistent/shards"], "/nonexistent/shards"),
])
def test_bad_input_fails_before_submitting_with_one_line(args, message, digits_train_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = submit(["--config", CONFIG, "--dry-run", *_overrides(digits_train_shards, run_dir), *args], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/slurm.py: error: "), proc.stderr
    assert message in lines[0]
    assert proc.stdout == ""
    assert not run_dir.exists(), "nothing is created for a rejected job"


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has SLURM")
def test_slurm_without_slurm_says_so(digits_train_shards, tmp_path):
    proc = submit(["--config", CONFIG, *_overrides(digits_train_shards, tmp_path / "run")], timeout=60)
    assert proc.returncode == 2
    assert "sbatch/srun not found" in proc.stderr and "--cluster local" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_sbatch_job_and_submits_nothing(digits_train_shards, tmp_path):
    run_dir = tmp_path / "in1k"
    overrides = _overrides(digits_train_shards, run_dir, **{"checkpoint.every_steps": "null", "data.workers": 8})
    proc = submit(["--config", CONFIG, "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--account", "proj", "--qos", "high", "--constraint", "volta32gb", "--comment", "dcscale test",
                   "--mem-gb", "480", "--timeout-min", "4320", "--max-requeues", "20", *overrides], timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --constraint=volta32gb", "#SBATCH --comment='dcscale test'",
                 "#SBATCH --mem=480GB", "#SBATCH --time=4320", "#SBATCH --signal=USR2@90",
                 "#SBATCH --job-name=dcscale-in1k", f"#SBATCH --output={run_dir}/submitit/%j_0_log.out"]:
        assert line in out.splitlines(), f"{line!r} missing from:\n{out}"
    assert "srun --unbuffered" in out and "-m submitit.core._submit" in out
    assert "32 task(s)" in out and "up to 20 requeue(s)" in out
    assert "\nresume: auto\n" in out, "the job always resumes from the newest checkpoint"
    assert "every_steps: 500" in out and "warning: checkpoint.every_steps is null" in proc.stderr
    assert out.strip().splitlines()[-1].startswith("launch/slurm.py: dry run, nothing submitted")
    assert not run_dir.exists()


# ---- the job, run here by submitit's LocalExecutor --------------------------------------------------------

def test_local_job_completes_and_says_where_things_are(local_run):
    run_dir, proc = local_run
    out = proc.stdout
    job_id = next(line.split()[2] for line in out.splitlines() if line.startswith("job id:"))
    log = run_dir / "submitit" / f"{job_id}_0_log.out"
    assert f"logs:     {log}" in out and f"run dir:  {run_dir}" in out
    assert out.strip().splitlines()[-1].startswith(f"launch/slurm.py: job {job_id} done, final loss")
    assert [r["cycle"] for r in metrics(run_dir)] == [0, 1]
    assert (run_dir / "checkpoints" / "last.pt").is_file() and list((run_dir / "tb").glob("events.out.*"))
    text = log.read_text()
    assert f"dcscale job {job_id}: 2 task(s) on 1 node(s)" in text and "resume=auto" in text
    assert "2 process(es), fresh run" in text and "dcscale train: done 2 cycles" in text
    assert "resume: auto" in (run_dir / "config.yaml").read_text()


def test_time_limit_signal_requeues_and_resumes_to_the_uninterrupted_result(local_run, digits_train_shards,
                                                                             tmp_path):
    reference, _ = local_run
    run_dir = tmp_path / "requeued"
    proc = subprocess.Popen([*SLURM, "--config", CONFIG, *LOCAL, *_overrides(digits_train_shards, run_dir)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = next(line.split()[2] for line in proc.stdout if line.startswith("job id:"))
        # The local job's id is its controller's pid; its children are the two tasks. At the time limit
        # the controller sends them SIGUSR2 (as SLURM does with --signal=USR2@delay); here the test sends
        # it itself, mid-way through cycle 1's epoch, so the moment does not depend on machine speed.
        wait_for_file("cycle00001_epoch000_step00000004.pt", run_dir / "checkpoints", proc)
        tasks = subprocess.run(["pgrep", "-P", job_id], capture_output=True, text=True).stdout.split()
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(int(pid), signal.SIGUSR2)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "done, final loss" in out
    log = rank0_log(run_dir)
    assert "Caught signal SIGUSR2" in log and f"Requeued job {job_id}" in log
    assert log.count("fresh run") == 1 and log.count("resuming from") == 1, log
    assert "at cycle 1 step" in log.split("resuming from")[1].splitlines()[0]
    assert_same_result(reference, run_dir)


# ---- torchrun on one node --------------------------------------------------------------------------------

def test_torchrun_bad_arguments_fail_with_one_line(tmp_path):
    for args, message in [(["--max-restarts", "x", "--", "--config", CONFIG], "--max-restarts x"),
                          (["--", "--config", CONFIG, "resume=/x.pt"], "restarts need resume=auto"),
                          (["--config", CONFIG], "unknown option --config")]:
        proc = subprocess.run([TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("launch/torchrun.sh: error:") and message in lines[0]


def test_torchrun_restarts_a_killed_worker_and_resumes(local_run, digits_train_shards, tmp_path):
    reference, _ = local_run
    run_dir = tmp_path / "elastic"
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1", "--", "--config", CONFIG,
           *_overrides(digits_train_shards, run_dir)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # Kill rank 0 (it hosts the process group's store) right after cycle 0's end-of-cycle checkpoint.
        wait_for_file("cycle00001_epoch000_step00000000.pt", run_dir / "checkpoints", proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank0 = [int(p) for p in workers if environ(int(p)).get("RANK") == "0"]
        assert len(workers) == 2 and len(rank0) == 1
        os.kill(rank0[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert out.count("fresh run") == 1 and out.count("resuming from") == 1, out
    assert "at cycle 1 step 0" in out
    assert_same_result(reference, run_dir)
