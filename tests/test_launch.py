"""Launchers end to end: `launch/slurm.py` through submitit's LocalExecutor (2 CPU tasks, gloo), with a
time-limit signal, requeue and resume; `launch/torchrun.sh` with a worker killed and the group restarted.

Every interrupted run must end with the labels and per-cycle losses of the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from conftest import assert_same_result, metrics, tiny_run_overrides

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
    assert "2 process(es) x 1 thread(s) (OMP_NUM_THREADS), fresh run" in text and "dcscale train: done 2 cycles" in text
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
    # Rank 1's collective broke when rank 0 left: one line that says why, not a gloo traceback.
    rank1_err = (run_dir / "submitit" / f"{job_id}_1_log.err").read_text()
    assert "Traceback" not in rank1_err, rank1_err
    assert rank1_err.count("rank 1 stopped: rank 0 left to requeue the job") == 1, rank1_err
    assert_same_result(reference, run_dir)


# ---- threads per process ---------------------------------------------------------------------------------

def _threads(omp_num_threads: str | None, *envs: dict) -> list[str]:
    """'threads source' that `init_distributed` picks in a fresh process, for each environment in turn."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    code = ("import os, sys, json, torch; from dcscale import dist\n"
            "for extra in json.loads(sys.argv[1]):\n"
            "    os.environ.update(extra); e = dist.init_distributed()\n"
            "    assert e.threads == torch.get_num_threads(); print(e.threads, e.threads_from)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(envs)], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return out.splitlines()


def test_threads_are_the_users_or_a_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert _threads("1", {}, {"LOCAL_WORLD_SIZE": "2"}) == ["1 OMP_NUM_THREADS"] * 2
    assert _threads(None, {}, {"LOCAL_WORLD_SIZE": "2"}, {"SLURM_CPUS_PER_TASK": "1"}) == [
        f"{cores} {cores} core(s) / 1 process(es)",
        f"{max(cores // 2, 1)} {cores} core(s) / 2 process(es)",
        "1 SLURM_CPUS_PER_TASK=1"]


# ---- more time limits than submitit's local controller takes ------------------------------------------

class TimeLimitedJob(submitit.helpers.Checkpointable):
    """A job that reaches its time limit `limits` times, then finishes: at each run's start it sends itself
    the time-limit signal (what the local controller sends at the limit), so no run waits for a clock."""

    def __init__(self, runs_file: str, limits: int):
        self.runs_file, self.limits = runs_file, limits

    def __call__(self) -> dict:
        with open(self.runs_file, "a") as f:
            f.write("run\n")
        runs = len(Path(self.runs_file).read_text().splitlines())
        if runs <= self.limits:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(60)  # submitit's handler requeues the job and exits during this sleep
        return {"loss": 0.25, "runs": runs}


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this test module


def _load_launcher():
    spec = importlib.util.spec_from_file_location("dcscale_slurm_launcher", ROOT / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_time_limited_job(tmp_path: Path, limits: int, max_requeues: int) -> tuple[int, int]:
    """(launcher exit code, runs made) for a 1-task local job that hits `limits` time limits."""
    slurm = _load_launcher()
    args = slurm.parse_args(["--config", CONFIG, "--cluster", "local", "--gpus-per-node", "0", "--timeout-min", "5",
                             "--max-requeues", str(max_requeues), "--job-dir", str(tmp_path / "submitit")])
    slurm.check_resources(args)
    runs = tmp_path / "runs.txt"
    code = slurm.run_job(args, TimeLimitedJob(str(runs), limits), tmp_path, "1 task")
    return code, len(runs.read_text().splitlines())


def test_local_job_takes_max_requeues_time_limits_past_submitits_six(tmp_path, capsys):
    code, runs = _run_time_limited_job(tmp_path, limits=7, max_requeues=8)
    out = capsys.readouterr()
    assert code == 0 and runs == 8, out.out + out.err
    assert out.out.count("submitting it again") == 1 and "(2 time limit(s) to go)" in out.out
    assert out.out.strip().splitlines()[-1].startswith("launch/slurm.py: job ") and "done, final loss 0.2500" in out.out


def test_local_job_stops_after_max_requeues_time_limits(tmp_path, capsys):
    code, runs = _run_time_limited_job(tmp_path, limits=3, max_requeues=2)
    err = capsys.readouterr().err
    assert code == 1 and runs == 3
    assert err.count("\n") == 1 and "Job not requeued because: timed-out too many times" in err


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
