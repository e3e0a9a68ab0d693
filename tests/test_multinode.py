"""Two nodes on one machine: two torchrun agents joined by a c10d rendezvous on localhost, 2 processes
each (so a worker's RANK differs from its LOCAL_RANK), give the labels and per-cycle losses of one
agent with 4 processes.

Rendezvous notes (torch 2.x):
- With the c10d backend, --node_rank is ignored (torchrun warns): group ranks follow the order in
  which the agents join, so either agent may hold global ranks 0-1. Nothing here assumes which.
- Both agents see the endpoint as their own host and try to serve its TCP store; the second bind
  fails and that agent falls back to being a client (torch handles it; no is_host setting needed).
- --local_addr 127.0.0.1 makes the group-rank-0 agent advertise 127.0.0.1 as the workers'
  MASTER_ADDR instead of the machine's hostname, which need not resolve.
- A lone agent waits for its peer up to the join timeout, so the agents are killed on any failure.
- The underscore spellings of torchrun's flags are accepted by old and new torch versions alike.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_same_result, tiny_run_overrides

CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(topology: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *topology, "-m", "dcscale", "train", "--config", CONFIG,
            *overrides]


def worker_ranks(agent_pid: int) -> dict[int, tuple[int, int]]:
    """{pid: (RANK, LOCAL_RANK)} of an agent's worker processes, read from their environment."""
    found = {}
    for task in Path(f"/proc/{agent_pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(e.decode().split("=", 1) for e in entries if b"=" in e)
            if "RANK" in env:
                found[pid] = (int(env["RANK"]), int(env["LOCAL_RANK"]))
    return found


def run_two_agents(overrides: list[str], logs: Path) -> list[dict[int, tuple[int, int]]]:
    """Two agents of 2 processes each (output in `logs`); returns each agent's workers' (RANK, LOCAL_RANK)."""
    port = free_port()
    logs.mkdir()
    agents = []
    for node in (0, 1):
        topology = ["--nnodes=2", "--nproc_per_node=2", f"--node_rank={node}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=dcscale-multinode", "--local_addr=127.0.0.1"]
        with open(logs / f"agent{node}.log", "w") as log:
            agents.append(subprocess.Popen(torchrun(topology, overrides), env=ENV, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
    ranks: list[dict[int, tuple[int, int]]] = [{}, {}]
    deadline = time.time() + TIMEOUT_S
    try:
        while any(a.poll() is None for a in agents):
            assert time.time() < deadline, f"two-agent run still going after {TIMEOUT_S} s"
            for seen, agent in zip(ranks, agents):
                if agent.poll() is None:
                    seen.update(worker_ranks(agent.pid))
            time.sleep(0.05)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    for node, agent in enumerate(agents):
        assert agent.returncode == 0, (logs / f"agent{node}.log").read_text()[-3000:]
    return ranks


def test_two_agents_of_two_processes_equal_one_agent_of_four(digits_train_shards, tmp_path):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    ranks = run_two_agents(tiny_run_overrides(digits_train_shards, two_nodes), tmp_path / "logs")
    # each agent ran two workers, local ranks 0 and 1, and together they hold global ranks 0-3
    assert [sorted(local for _, local in seen.values()) for seen in ranks] == [[0, 1], [0, 1]]
    assert sorted(rank for seen in ranks for rank, _ in seen.values()) == [0, 1, 2, 3]
    assert any(rank != local for seen in ranks for rank, local in seen.values())

    proc = subprocess.run(torchrun(["--standalone", "--nproc_per_node=4"],
                                   tiny_run_overrides(digits_train_shards, one_node)),
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert_same_result(one_node, two_nodes)
