"""`dcscale train --config FILE [key=value ...]`: one process plainly, N under torchrun or submitit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

from dcscale.config import dump_config, load_config
from dcscale.errors import DcscaleError
from dcscale.dist import process_env
from dcscale.train.check import check_run_inputs


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. cluster.k=500")
    parser.add_argument("--check", action="store_true",
                        help="check the config and everything the run would open (shard sets, checkpoints, the "
                             "network for the images, the run directory, platform options), run nothing")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="with --check: check for a run of N processes (default: $WORLD_SIZE, else 1)")


def run(args) -> int:
    exit_with_launcher()
    rank, world_size, local_rank = process_env()
    try:  # bad config or inputs: exit 2 before any work starts
        cfg = load_config(args.config, args.overrides)
        if args.nproc is not None and not args.check:
            raise DcscaleError("--nproc applies to --check only (a run's processes come from torchrun or submitit)")
        if args.nproc is not None and args.nproc < 1:
            raise DcscaleError(f"--nproc {args.nproc}: expected an integer >= 1")
        # A run checks quickly here: training itself opens and checks the rest before it writes anything.
        train_set = check_run_inputs(cfg, args.config, world_size=args.nproc or world_size, thorough=args.check)
    except DcscaleError:
        if local_rank != 0 and "LOCAL_RANK" in os.environ:
            raise SystemExit(2) from None  # every rank found the same: one line per machine is enough
        raise
    if args.check:
        print(f"dcscale train --check: config and inputs ok ({train_set.total} images in data.train, "
              f"run dir {cfg.output.dir})", flush=True)
        return 0
    if rank == 0:
        print(dump_config(cfg), end="", flush=True)
    from dcscale.train.checkpoint import NO_SPACE, newest_checkpoint, write_failure
    from dcscale.train.loop import train  # torch is imported only once the config is valid

    try:
        train(cfg)
    except DcscaleError as err:
        print(f"dcscale: error{_on_rank(rank, world_size)}: {err}", file=sys.stderr, flush=True)
        _exit_now(2, world_size)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        # a full disk under a write the loop does not route through rank 0's checked writes (e.g.
        # TensorBoard's): the checkpoints are intact
        print(f"dcscale: error{_on_rank(rank, world_size)}: "
              f"{write_failure(err, newest_checkpoint(cfg.output.dir))}", file=sys.stderr, flush=True)
        _exit_now(2, world_size)
    except Exception:
        print(f"dcscale: failed{_on_rank(rank, world_size)}:", file=sys.stderr, flush=True)
        traceback.print_exc()
        _exit_now(1, world_size)
    from dcscale import dist

    dist.shutdown()
    return 0


def _on_rank(rank: int, world_size: int) -> str:
    return f" on rank {rank}" if world_size > 1 else ""


def _exit_now(code: int, world_size: int) -> None:
    """Leave without tearing down the process group: a peer may be blocked in a collective, and the
    broken connection is what makes it fail promptly instead of waiting for a timeout."""
    sys.stdout.flush()
    sys.stderr.flush()
    if world_size > 1:
        os._exit(code)
    raise SystemExit(code)


def exit_with_launcher() -> None:
    """Under torchrun, end this worker when the launcher dies. torch starts workers in sessions of
    their own, so a kill of torchrun's process group does not reach them: they would go on training
    and writing beside a restarted run. Linux: the kernel sends SIGKILL when the parent dies
    (PR_SET_PDEATHSIG; it fires when the parent *thread* exits, and torchrun's agent starts workers
    from its main thread). Elsewhere: a thread that watches the parent pid."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # run plainly (the shell may go away, e.g. nohup) or by submitit (the scheduler stops tasks)
    launcher = os.getppid()
    if launcher == 1:  # torchrun died while this worker started up (its orphans go to init)
        os._exit(1)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        args = (ctypes.c_ulong(v) for v in (signal.SIGKILL, 0, 0, 0))
        if ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_int(pr_set_pdeathsig), *args) == 0:
            if os.getppid() != launcher:  # it died before the call
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        print("dcscale: the launcher (torchrun) ended; stopping this worker", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="dcscale-launcher-watch", daemon=True).start()
