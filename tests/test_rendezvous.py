"""A world that cannot form is one line within the rendezvous timeout, not a silent wait of
dist.timeout_min; a rank blocked in a collective says so every $DCSCALE_WAIT_WARN_S seconds.
Real `dcscale train` processes and real gloo groups, with short timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

CONFIG = str(Path(__file__).parent / "train_test.yaml")
BASE_ENV = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(shards: Path, run_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dcscale", "train", "--config", CONFIG,
                             *tiny_run_overrides(shards, run_dir), "dist.rendezvous_timeout_s=4", *extra],
                            env={**BASE_ENV, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line(proc: subprocess.Popen, within_s: float) -> str:
    _, err = proc.communicate(timeout=within_s)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK=3 in the environment is outside WORLD_SIZE=2: expected a rank from 0 to 1"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' in the environment: expected an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
     "MASTER_PORT='http' in the environment: expected a port number"),
])
def test_a_world_that_cannot_form_is_one_line(env, message, digits_train_shards, tmp_path):
    assert message in one_line(train(digits_train_shards, tmp_path / "run", env), within_s=60)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_no_peer_is_one_line_within_the_rendezvous_timeout(rank, digits_train_shards, tmp_path):
    """Rank 0 alone waits for the others, rank 1 alone for rank 0's store: both give up after
    dist.rendezvous_timeout_s (4 s here), not after dist.timeout_min (30 min here)."""
    started = time.monotonic()
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    line = one_line(train(digits_train_shards, tmp_path / "run", env, "dist.timeout_min=30"), within_s=120)
    assert f"rank {rank} of 2: rendezvous failed after waiting up to 4 s" in line
    assert time.monotonic() - started < 120  # (most of it: starting Python and torch on a busy machine)


WAITER = textwrap.dedent("""
    import logging, os, sys, time
    logging.basicConfig(level=logging.WARNING, format="dcscale: %(levelname)s: %(message)s", stream=sys.stderr)
    from dcscale import dist
    env = dist.init_distributed("gloo", timeout_min=1, rendezvous_timeout_s=20)
    if env.rank == 1:
        time.sleep(float(sys.argv[1]))  # a slow (or stopped) rank
    dist.barrier()
    print("done", flush=True)
    dist.shutdown()
""")


def test_a_rank_waiting_in_a_collective_says_so_every_interval(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WAITER, "4.5"],
                              env={**BASE_ENV, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(r),
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "DCSCALE_WAIT_WARN_S": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    waits = [ln for ln in outs[0][1].splitlines() if "rank 0 waiting for a barrier since" in ln]
    assert 3 <= len(waits) <= 5, outs[0][1]  # about one a second over rank 1's 4.5 s
    assert waits[0].startswith("dcscale: WARNING: rank 0 waiting for a barrier since 1 s")
    assert "waiting for" not in outs[1][1], "the late rank did not wait"
