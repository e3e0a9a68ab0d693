#!/usr/bin/env python
"""Submit `dcscale train` as a submitit job: to SLURM, or run the same job here.

    python launch/slurm.py --config configs/imagenet_alexnet.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --timeout-min 4320 --max-requeues 20 train.batch_size=32 output.dir=runs/in1k

`--config` and the `key=value` overrides are those of `dcscale train`. One task per GPU; ranks,
world size and the rendezvous come from submitit's job environment (NCCL on GPUs, gloo on CPU).
The job always runs with `resume: auto`: when it is preempted or reaches its time limit, submitit
requeues it and the requeued job continues from the run's newest checkpoint.

`--cluster local` runs the job on this machine with submitit's LocalExecutor (same job code,
time limit and requeue included; submitit's local controller runs one job at most 6 times, so past
that the launcher submits it again, up to --max-requeues time limits in all); `--cluster debug` runs
one task inside this process.
`--dry-run` validates everything and prints what would be submitted, without submitting.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

PROG = "launch/slurm.py"
DEFAULT_TIMEOUT_MIN = 1440.0
DEFAULT_MAX_REQUEUES = 10


class LaunchError(Exception):
    """Bad input, reported as one line before anything is submitted."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file, as for `dcscale train`")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides, as for `dcscale train`")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="submitit executor: slurm (sbatch), local (this machine, same job), debug (in this process)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node; one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node; default and must be: --gpus-per-node (set it only for CPU jobs, "
                        "--gpus-per-node 0)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: data.workers + 2")
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the cluster's)")
    p.add_argument("--timeout-min", type=float, default=DEFAULT_TIMEOUT_MIN,
                   help="time limit of one run of the job, in minutes (whole minutes on SLURM)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--constraint")
    p.add_argument("--qos")
    p.add_argument("--comment")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help="how many times the job may reach its time limit and be requeued")
    p.add_argument("--signal-delay-s", type=int, default=None,
                   help="the time-limit signal comes this long before the limit (default: submitit's, 90 s on "
                        "SLURM, 30 s locally)")
    p.add_argument("--job-dir", default=None, help="submitit folder: job pickles and logs (default: <output.dir>/submitit)")
    p.add_argument("--name", default=None, help="job name (default: dcscale-<run dir name>)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the job to end and report it (default: yes for local/debug, no for slurm)")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted; submit nothing")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_intermixed_args(argv)
    if extra:
        options = [o for a in parser._actions for o in a.option_strings]
        unknown = extra[0].split("=", 1)[0]
        close = difflib.get_close_matches(unknown, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unknown option {unknown}{hint}" if unknown.startswith("-") else f"unexpected argument {unknown}")
    return args


# ---- validation: everything is checked before anything is submitted -------------------------------------

_SBATCH_TEXT = ("partition", "account", "constraint", "qos", "comment", "name", "job_dir")


def check_resources(args) -> None:
    for key in _SBATCH_TEXT:  # written into #SBATCH lines: a newline there would add a line of its own
        value = getattr(args, key)
        if value is not None and re.search(r"[\x00-\x1f\x7f]", value):
            raise LaunchError(f"--{key.replace('_', '-')} {value!r}: control characters (newline, tab, ...) are not "
                              f"allowed (the value goes into the job script's #SBATCH lines)")
    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: expected an integer >= 1")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: expected an integer >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.gpus_per_node, 1)
    if args.tasks_per_node < 1:
        raise LaunchError(f"--tasks-per-node {args.tasks_per_node}: expected an integer >= 1")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        raise LaunchError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                          f"one task per GPU (leave --tasks-per-node out)")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task {args.cpus_per_task}: expected an integer >= 1")
    if args.mem_gb is not None and not (math.isfinite(args.mem_gb) and args.mem_gb > 0):
        raise LaunchError(f"--mem-gb {args.mem_gb:g}: expected a number > 0")
    if not (math.isfinite(args.timeout_min) and args.timeout_min > 0):
        raise LaunchError(f"--timeout-min {args.timeout_min:g}: expected a number > 0")
    if args.max_requeues < 0:
        raise LaunchError(f"--max-requeues {args.max_requeues}: expected an integer >= 0")
    if args.signal_delay_s is not None and not 0 < args.signal_delay_s < args.timeout_min * 60:
        raise LaunchError(f"--signal-delay-s {args.signal_delay_s}: expected a number of seconds > 0 and below "
                          f"--timeout-min")
    if args.cluster == "slurm":
        if args.timeout_min != int(args.timeout_min):
            raise LaunchError(f"--timeout-min {args.timeout_min:g}: SLURM takes whole minutes")
    else:
        if args.nodes != 1:
            raise LaunchError(f"--nodes {args.nodes}: --cluster {args.cluster} runs on this machine, use --nodes 1")
        if args.gpus_per_node:
            gpus = _visible_gpus()
            if gpus < args.gpus_per_node:
                raise LaunchError(f"--gpus-per-node {args.gpus_per_node} with --cluster {args.cluster}: this machine "
                                  f"has {gpus} GPU(s) that torch can use (for CPU processes: --gpus-per-node 0 "
                                  f"--tasks-per-node N)")
        if args.cluster == "debug" and args.tasks_per_node != 1:
            raise LaunchError("--cluster debug runs one task in this process: use --gpus-per-node 1 or "
                              "--gpus-per-node 0 --tasks-per-node 1 (or --cluster local for several)")
        slurm_only = [f"--{k.replace('_', '-')}" for k in ("partition", "account", "constraint", "qos", "comment")
                      if getattr(args, k)]
        if slurm_only:
            print(f"{PROG}: note: {', '.join(slurm_only)} ignored by --cluster {args.cluster}", file=sys.stderr)


def _visible_gpus() -> int:
    """CUDA GPUs torch sees on this machine (the job runs here with --cluster local/debug). On SLURM the
    login node's count says nothing about the compute nodes, so it is not checked there."""
    import torch

    return torch.cuda.device_count()


def check_slurm_available(args) -> None:
    """Without SLURM commands there is nothing to submit to; with them, the partition must exist."""
    if args.cluster != "slurm":
        return
    if shutil.which("sinfo") and args.partition:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            known = sorted({p.strip().rstrip("*") for p in out.stdout.split()})
            if args.partition not in known:
                close = difflib.get_close_matches(args.partition, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (sinfo lists: {', '.join(known)})"
                raise LaunchError(f"--partition {args.partition}: no such SLURM partition{hint}")
    if not args.dry_run and not (shutil.which("sbatch") and shutil.which("srun")):
        raise LaunchError("--cluster slurm: sbatch/srun not found on this machine (submit from a SLURM login node, "
                          "or use --cluster local to run here, or --dry-run to see the job)")


def load_job_config(args):
    """The validated config the job will run (resume: auto forced), and notes on what was changed."""
    from dcscale.config import load_config
    from dcscale.slurm_job import job_resume, prepare_job_config
    from dcscale.train.check import check_run_inputs

    cfg = load_config(args.config, args.overrides)
    # A bad shard set, checkpoint or setting fails here, not after hours in the queue, checked as the job
    # will start (with the checkpoint it will resume from). The platform options are checked here only
    # when the job runs on this machine (a SLURM login node has no GPUs).
    checked = copy.copy(cfg)
    checked.resume = job_resume(cfg)
    check_run_inputs(checked, args.config, on_this_machine=args.cluster != "slurm",
                     world_size=args.nodes * args.tasks_per_node)
    return prepare_job_config(cfg)


# ---- executors -----------------------------------------------------------------------------------------

def slurm_parameters(args) -> dict:
    """submitit SlurmExecutor parameters (sbatch names)."""
    params = {
        "job_name": args.name, "nodes": args.nodes, "ntasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task, "time": int(args.timeout_min),
        "partition": args.partition, "account": args.account, "constraint": args.constraint,
        "qos": args.qos, "comment": args.comment, "signal_delay_s": args.signal_delay_s,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb is not None:
        from submitit.slurm.slurm import _convert_mem

        params["mem"] = _convert_mem(args.mem_gb)
    return {k: v for k, v in params.items() if v is not None}


def local_parameters(args) -> dict:
    params = {"timeout_min": args.timeout_min, "tasks_per_node": args.tasks_per_node,
              "gpus_per_node": args.gpus_per_node, "nodes": 1}
    if args.signal_delay_s is not None:
        params["signal_delay_s"] = args.signal_delay_s
    return params


def make_executor(args, max_requeues: int):
    import submitit

    if args.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=args.job_dir, max_num_timeout=max_requeues)
        executor.update_parameters(**slurm_parameters(args))
    elif args.cluster == "local":
        executor = submitit.LocalExecutor(folder=args.job_dir, max_num_timeout=max_requeues)
        executor.update_parameters(**local_parameters(args))
    else:
        executor = submitit.DebugExecutor(folder=args.job_dir)
    return executor


def dry_run_text(args) -> str:
    """What would be submitted: the sbatch script (SLURM) or the local executor's parameters."""
    import submitit

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(args.job_dir)])
    if args.cluster == "slurm":
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command=command, folder=args.job_dir, **slurm_parameters(args))
    params = local_parameters(args) if args.cluster == "local" else {"tasks_per_node": 1}
    lines = [f"submitit {args.cluster} executor (submitit {submitit.__version__}), folder {args.job_dir}"]
    lines += [f"  {k}: {v}" for k, v in params.items()]
    lines.append(f"  max requeues: {args.max_requeues}")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from dcscale.config import dump_config
    from dcscale.errors import DcscaleError

    try:
        check_resources(args)
        cfg, notes = load_job_config(args)
        run_dir = Path(cfg.output.dir).resolve()
        args.job_dir = str(Path(args.job_dir or run_dir / "submitit").resolve())
        args.name = args.name or f"dcscale-{run_dir.name}"
        if args.cpus_per_task is None:
            args.cpus_per_task = cfg.data.workers + 2
        check_slurm_available(args)
    except (LaunchError, DcscaleError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr if note.startswith("warning") else sys.stdout)
    tasks = args.nodes * args.tasks_per_node
    shape = (f"{args.nodes} node(s) x {args.tasks_per_node} task(s) = {tasks} task(s), "
             f"{args.gpus_per_node} GPU(s)/node, {args.timeout_min:g} min, up to {args.max_requeues} requeue(s)")
    if (run_dir / "checkpoints" / "last.pt").is_file():
        print(f"{PROG}: note: {run_dir} already has a checkpoint; the job continues that run")

    if args.dry_run:
        print(f"# dry run: nothing submitted. {args.cluster} job '{args.name}': {shape}")
        print(f"# run dir {run_dir}; logs in {args.job_dir}")
        print("# ---- job ----")
        print(dry_run_text(args))
        print("# ---- config the job runs ----")
        print(dump_config(cfg), end="")
        print(f"{PROG}: dry run, nothing submitted ({args.cluster}, {tasks} task(s), run dir {run_dir})")
        return 0

    from dcscale.config import config_to_dict
    from dcscale.slurm_job import TrainJob

    return run_job(args, TrainJob(config_to_dict(cfg)), run_dir, shape)


def run_job(args, fn, run_dir: Path, shape: str) -> int:
    """Submit `fn` (the job), say where things are, and with --wait wait for it and report how it ended."""
    job = submit(args, fn, args.max_requeues, shape)
    if job is None:
        return 1
    paths = job.paths
    print(f"run dir:  {run_dir} (metrics.jsonl, tb/, checkpoints/, labels.npy)")
    wait = args.wait if args.wait is not None else args.cluster != "slurm"
    if not wait:
        print(f"{PROG}: submitted job {job.job_id}; logs {paths.stdout}; run dir {run_dir}")
        return 0
    return wait_for(job, run_dir, args, fn, shape)


def submit(args, fn, max_requeues: int, shape: str):
    """Submit `fn` allowing `max_requeues` more time limits; print its id and logs. None if refused."""
    try:
        job = make_executor(args, max_requeues).submit(fn)
    except Exception as err:  # sbatch refused the job: say why on one line
        print(f"{PROG}: error: submission failed: {' '.join(str(err).split())}", file=sys.stderr)
        return None
    print(f"job id:   {job.job_id} ({args.cluster}: {shape})")
    print(f"logs:     {job.paths.stdout} and {job.paths.stderr.name} (rank 0; rank r: {job.job_id}_r_log.out/.err)",
          flush=True)
    return job


def wait_for(job, run_dir: Path, args, fn, shape: str) -> int:
    """Wait for the job (requeued runs included) and report how it ended, in one line. A local job that
    submitit's controller stopped in the middle of a requeue is submitted again with the time limits it
    has left."""
    try:
        while True:
            job.wait()
            left = requeues_left(job) if args.cluster == "local" else None
            if left is None:
                results = job.results()
                break
            print(f"{PROG}: job {job.job_id} asked for a requeue ({left} time limit(s) to go) after the 6 runs "
                  f"submitit's local controller makes of one job; submitting it again (it resumes from the "
                  f"newest checkpoint)", flush=True)
            job = submit(args, fn, left, shape)
            if job is None:
                return 1
    except KeyboardInterrupt:
        job.cancel()
        print(f"{PROG}: interrupted; job {job.job_id} cancelled", file=sys.stderr)
        return 130
    except Exception as err:
        line = failure_line(err)
        if "timed-out too many times" in line:
            line += (f" (--max-requeues {args.max_requeues}); submit the same command again to continue from the "
                     f"newest checkpoint")
        print(f"{PROG}: error: job {job.job_id} failed: {line}; see {job.paths.stderr}", file=sys.stderr)
        return 1
    final = results[0] or {}
    loss = f", final loss {final['loss']:.4f}" if isinstance(final.get("loss"), float) else ""
    print(f"{PROG}: job {job.job_id} done{loss}; logs {job.paths.stdout}; run dir {run_dir}")
    return 0


_REQUEUED = re.compile(r"Requeued job \S+ \((\d+) remaining timeouts\)")


def requeues_left(job) -> int | None:
    """The time limits a finished local job may still take if its last run ended by asking for a requeue
    (read from rank 0's log, where submitit records each requeue); None if it ended otherwise."""
    try:
        log = job.paths.stdout.read_text(errors="replace")
    except OSError:
        return None
    requeues = list(_REQUEUED.finditer(log))
    if not requeues or requeues[-1].start() < log.rfind("Starting with JobEnvironment"):
        return None
    return int(requeues[-1].group(1))


def failure_line(err: Exception) -> str:
    """The last line of the job's traceback (submitit wraps it between dashed lines), without the
    module path of dcscale's own errors."""
    text = str(err)
    sections = [part for part in text.split("----------------------")]
    trace = sections[1] if len(sections) >= 3 else text
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    for prefix in ("dcscale.errors.DcscaleError: ", "dcscale.errors.ConfigError: ", "dcscale.errors.DataError: ",
                   "submitit.core.utils.UncompletedJobError: "):
        last = last.removeprefix(prefix)
    return last


if __name__ == "__main__":
    raise SystemExit(main())
