"""The job that `launch/slurm.py` submits through submitit; imported only by the launchers (the check
every launcher runs first is `dcscale.train.check.check_run_inputs`).

It lives in the package (not in the launcher script) so that submitit pickles it by reference:
the job process imports the installed dcscale, whatever script submitted it.

Preemption and time limits: submitit installs a handler for the preemption/time-limit signal
(SIGUSR2) in every task. On global rank 0 that handler calls `TrainJob.checkpoint`, which
returns the same job to requeue; the task then exits and the scheduler (SLURM, or submitit's
local controller) starts all tasks again. The handler runs inside a signal handler on one rank
while the other ranks keep training, so it must not run collectives and does not save
anything: the training loop already writes a checkpoint every `checkpoint.every_steps` steps and
at the end of every cycle, and the requeued job always runs with `resume: auto`, so it continues
from the newest one and ends exactly where an uninterrupted run would have. The other ranks get the
same signal and keep training until rank 0's exit breaks their next collective; that error is the
expected end of their run, so they report it in one line instead of a traceback.
"""

from __future__ import annotations

import re
import signal
import sys
import zlib

import submitit

from dcscale.config import Config, config_from_dict, config_to_dict

# Mid-epoch checkpoints when the config has none: a preempted job then loses at most this many
# steps (plus the start-up) instead of a whole epoch.
DEFAULT_CHECKPOINT_EVERY_STEPS = 500

_PORT_RANGE = (20000, 60000)


def prepare_job_config(cfg: Config) -> tuple[Config, list[str]]:
    """The config a submitted job runs, and notes for the user about what was changed.

    `resume` is always `auto` inside the job (a requeued job must continue the run); a checkpoint
    path given by the user still starts the run (see `job_resume`). Mid-epoch checkpoints are
    switched on when the config has none.
    """
    notes = []
    raw = config_to_dict(cfg)
    if cfg.resume in (None, "auto"):
        raw["resume"] = "auto"
        notes.append("resume: auto (forced: a requeued job continues from the run's newest checkpoint)")
    else:
        notes.append(f"resume: starts from {cfg.resume}, then auto (a requeued job continues from the run's "
                     f"newest checkpoint)")
    if cfg.checkpoint.every_steps is None:
        raw["checkpoint"]["every_steps"] = DEFAULT_CHECKPOINT_EVERY_STEPS
        notes.append(f"warning: checkpoint.every_steps is null; using {DEFAULT_CHECKPOINT_EVERY_STEPS} so that a "
                     f"preempted job loses little work (set checkpoint.every_steps to choose)")
    return config_from_dict(raw, source="the job config"), notes


def job_resume(cfg: Config) -> str:
    """`auto`, unless the user asked to start from a given checkpoint and the run has none of its own yet."""
    if cfg.resume in (None, "auto"):
        return "auto"
    from dcscale.train.checkpoint import checkpoint_dir  # (imports torch: only inside the job)

    has_own = (checkpoint_dir(cfg.output.dir) / "last.pt").is_file()
    return "auto" if has_own else cfg.resume


def job_master_port(job_id: str) -> int:
    """A rendezvous port derived from the job id only: every task computes the same one, and so does
    every requeued run of the job (SLURM and the local controller keep the job id)."""
    low, high = _PORT_RANGE
    return low + zlib.crc32(str(job_id).encode()) % (high - low)


def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from submitit's job environment
    (what `dcscale.dist.init_distributed` reads). The first node's host name is the master."""
    env = submitit.helpers.TorchDistributedEnvironment()
    env.master_port = job_master_port(submitit.JobEnvironment().job_id)
    # CUDA_VISIBLE_DEVICES is left alone: dist.py picks cuda:(local_rank mod visible GPUs), which is
    # right whether SLURM shows a task all of the node's GPUs or only its own.
    return env.export(set_cuda_visible_devices=False, overwrite=True)


def _note_stop_signal() -> list:
    """Chain onto submitit's time-limit/preemption handler; the returned list gets an entry when the
    signal arrives."""
    signum = submitit.JobEnvironment._usr_sig()
    previous = signal.getsignal(signum)
    received = []

    def handler(sig, frame):
        received.append(sig)
        if callable(previous):
            previous(sig, frame)

    signal.signal(signum, handler)
    return received


class TrainJob(submitit.helpers.Checkpointable):
    """`dcscale train` as a submitit job: one task per GPU (or per CPU process), all running this."""

    def __init__(self, config: dict):
        self.config = config  # the resolved config, frozen at submission (config_to_dict)

    def __call__(self) -> dict:
        env = export_distributed_env()
        signalled = _note_stop_signal()
        cfg = config_from_dict(self.config, source="the submitted job config")
        cfg.resume = job_resume(cfg)
        job = submitit.JobEnvironment()
        if env.rank == 0:
            print(f"dcscale job {job.job_id}: {env.world_size} task(s) on {job.num_nodes} node(s), rendezvous "
                  f"{env.master_addr}:{env.master_port}, resume={cfg.resume}", flush=True)
        from dcscale import dist
        from dcscale.train.loop import train  # torch is imported here, in the job, not at submission

        try:
            metrics = train(cfg)
        except Exception as err:
            if env.rank == 0 or not signalled:
                raise
            # e.g. "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:9128. This is ..."
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0]).split(". ")[0]
            print(f"dcscale job {job.job_id}: rank {env.rank} stopped: rank 0 left to requeue the job after the "
                  f"time-limit/preemption signal, which broke this rank's collective ({type(err).__name__}: "
                  f"{first}); expected, the requeued job resumes", file=sys.stderr, flush=True)
            raise SystemExit(1) from None  # (not an exception: submitit records no failure for this task)
        dist.shutdown()
        return metrics

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Called by submitit's signal handler on global rank 0 only, while the other ranks are still
        # training: no collectives and nothing to save here (see the module docstring). The requeued
        # job is this same job; it resumes from the newest checkpoint by `resume: auto`.
        return submitit.helpers.DelayedSubmission(TrainJob(self.config))
