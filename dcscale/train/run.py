"""`dcscale train --config FILE [key=value ...]`: one process plainly, N under torchrun or submitit."""

from __future__ import annotations

import os
import sys
import traceback

from dcscale.config import dump_config, load_config
from dcscale.errors import DcscaleError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. cluster.k=500")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)  # bad config: exit 2 before any work starts
    if cfg.data.train is None:
        raise DcscaleError(f"data.train is not set in {args.config}: give the training shard set, "
                           "e.g. data.train=data/digits/train")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        print(dump_config(cfg), end="", flush=True)
    from dcscale.train.loop import train  # torch is imported only once the config is valid

    try:
        train(cfg)
    except DcscaleError as err:
        print(f"dcscale: error{_on_rank(rank, world_size)}: {err}", file=sys.stderr, flush=True)
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
