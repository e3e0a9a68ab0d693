"""Process-group set-up and the few collectives the DeepCluster cycle needs, in one place.

A run is one of: a single plain process (no process group at all), `torchrun` (RANK/WORLD_SIZE/
MASTER_ADDR in the environment), or a submitit task (the launcher exports the same variables from
submitit's distributed environment before calling the training run). NCCL on GPUs, gloo on CPU.

The array helpers move numpy rows between ranks, each into one preallocated result array: rank 0
receives every rank's rows point to point (gloo) straight into their place; all-gathers run in bounded
pieces (gloo stages a collective's whole output in a temporary of its own) and pad every rank's
rows to the largest count, compacting in place on arrival. So a result costs its own size once,
not once more for the padded parts and again for a concatenated copy.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dcscale.errors import DcscaleError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group
    threads: int = 1  # torch intra-op threads of this process
    threads_from: str = ""  # where that count came from, for the start-up line

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ENV = DistEnv()
_WAIT_GROUP = None  # gloo group with a long timeout, for ranks waiting on rank 0's k-means


def check_backend(backend: str) -> None:
    """NCCL runs on CUDA GPUs only: fail with one line instead of deep inside the process group."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise DcscaleError("dist.backend = 'nccl' needs CUDA GPUs and torch sees none here: use 'gloo' or 'auto'")


def choose_threads(local_processes: int) -> tuple[int, str]:
    """This process's torch threads: OMP_NUM_THREADS when the user set it, else its share of the cores.

    Unset, torch takes every core in every process, so processes on one machine oversubscribe it. Losses
    depend on the thread count (it changes the order of float sums), so it is printed at start-up.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    threads, why = core_share(local_processes)
    torch.set_num_threads(threads)
    return threads, why


def local_processes() -> int:
    """How many processes of this run share this machine (torchrun and the submitit launcher set
    LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def core_share(local_processes: int) -> tuple[int, str]:
    """(cores, why): the cores one of `local_processes` processes on this machine may keep busy at
    once. Under SLURM the node is already split between tasks (SLURM_CPUS_PER_TASK); otherwise the
    cores this process may run on are divided among the machine's processes."""
    from dcscale.host import usable_cores

    cores = usable_cores()
    task_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if task_cpus.isdigit() and int(task_cpus) > 0:
        return max(min(cores, int(task_cpus)), 1), f"SLURM_CPUS_PER_TASK={task_cpus}"
    return max(cores // max(local_processes, 1), 1), f"{cores} core(s) / {local_processes} process(es)"


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) clock ticks of the given CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle += ticks[3] + ticks[4]
            total += sum(ticks)
    return idle, total


def free_cores(interval_s: float = 0.1) -> int:
    """The cores of this process's CPU set that are idle now: the set's idle time over `interval_s`,
    rounded (at least 1). What another job, another helper or this run's own busy ranks take is
    thereby left to them; a rank sleeping in a gloo collective is idle (tools/bench_threads.py wait:
    0.2% of a core). Without /proc/stat, every usable core."""
    from dcscale.host import usable_cores

    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return usable_cores()
    before = _cpu_ticks(cpus)
    time.sleep(interval_s)
    after = _cpu_ticks(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return usable_cores()
    idle_share = (after[0] - before[0]) / (after[1] - before[1])
    return max(1, min(len(cpus), round(idle_share * len(cpus))))


def free_core_share(local_processes: int) -> int:
    """The cores one of `local_processes` processes that work at once may keep busy now: its share
    (`core_share`), and no more than its share of the cores that are idle (`free_cores`)."""
    return min(core_share(local_processes)[0], max(1, free_cores() // max(local_processes, 1)))


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun and the
    submitit job; unset: a single process). Without torch, so `dcscale train` reads them first; a
    value that is not an integer, or a rank outside the world, is one line instead of a wait."""
    def integer(name: str, default: int) -> int:
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise DcscaleError(f"{name}={text!r} in the environment: expected an integer") from None

    world_size = integer("WORLD_SIZE", 1)
    rank = integer("RANK", 0)
    local_rank = integer("LOCAL_RANK", rank)
    if world_size < 1:
        raise DcscaleError(f"WORLD_SIZE={world_size} in the environment: expected an integer >= 1")
    if not 0 <= rank < world_size:
        raise DcscaleError(f"RANK={rank} in the environment is outside WORLD_SIZE={world_size}: expected a rank "
                           f"from 0 to {world_size - 1}")
    if local_rank < 0:
        raise DcscaleError(f"LOCAL_RANK={local_rank} in the environment: expected an integer >= 0")
    return rank, world_size, local_rank


def init_distributed(backend: str = "auto", timeout_min: float = 30.0,
                     wait_timeout_min: float = 180.0, rendezvous_timeout_s: float = 60.0) -> DistEnv:
    """Join the process group described by the environment (or none, for a plain single process), and
    set this process's thread count (`choose_threads`).

    The rendezvous (every rank reaching MASTER_ADDR:MASTER_PORT) has a timeout of its own,
    `rendezvous_timeout_s`: a world that cannot form (a rank that never starts, a wrong address) is
    one line within a minute, not a silent wait of `timeout_min`, which bounds the collectives."""
    global _ENV, _WAIT_GROUP
    rank, world_size, local_rank = process_env()
    threads, threads_from = choose_threads(local_processes())
    check_backend(backend)
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        if not dist.is_initialized():  # (tests may have joined a FileStore group already)
            store = rendezvous(rank, world_size, rendezvous_timeout_s)
            try:
                dist.init_process_group(backend=backend, store=store, timeout=datetime.timedelta(minutes=timeout_min),
                                        rank=rank, world_size=world_size,
                                        device_id=device if backend == "nccl" else None)
            except (RuntimeError, dist.DistError) as err:  # e.g. gloo's full mesh: a peer left meanwhile
                raise DcscaleError(f"rank {rank} of {world_size}: the process group did not form "
                                   f"({_first_line(err)})") from None
            store.set_timeout(datetime.timedelta(minutes=timeout_min))  # later store waits: as collectives
        backend = dist.get_backend()
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=wait_timeout_min))
        start_wait_watch(rank)
    _ENV = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   backend=backend if world_size > 1 else None, threads=threads, threads_from=threads_from)
    return _ENV


def rendezvous(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The TCP store every rank meets at (MASTER_ADDR:MASTER_PORT; rank 0, or torchrun's agent, serves
    it), joined within `timeout_s` by all `world_size` ranks, else one line saying who is missing."""
    addr = os.environ.get("MASTER_ADDR", "").strip()
    port_text = os.environ.get("MASTER_PORT", "").strip()
    if not addr or not port_text:
        missing = " and ".join(v for v, t in (("MASTER_ADDR", addr), ("MASTER_PORT", port_text)) if not t)
        raise DcscaleError(f"WORLD_SIZE={world_size} but {missing} not set: the ranks cannot meet (set both, or run "
                           f"through launch/torchrun.sh or launch/slurm.py, which set them)")
    if not port_text.isdigit() or not 0 < int(port_text) < 2**16:
        raise DcscaleError(f"MASTER_PORT={port_text!r} in the environment: expected a port number from 1 to 65535")
    from torch.distributed.rendezvous import _create_c10d_store  # (what env:// uses; it knows torchrun's store)

    who = "every other rank to join" if rank == 0 else f"rank 0 at {addr}:{port_text}"
    deadline = time.monotonic() + timeout_s
    if rank != 0 and not _port_answers(addr, int(port_text), deadline):
        # (checked here: torch's client logs a C++ stack trace for a server that never comes)
        raise DcscaleError(f"rank {rank} of {world_size}: rendezvous failed after waiting up to {timeout_s:g} s for "
                           f"{who} (nothing answers there); check that all {world_size} ranks started, with the "
                           f"same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (dist.rendezvous_timeout_s sets the wait)")
    left = max(deadline - time.monotonic(), 1.0)
    try:
        return _create_c10d_store(addr, int(port_text), rank, world_size, datetime.timedelta(seconds=left))
    except (RuntimeError, OSError, dist.DistError) as err:
        raise DcscaleError(f"rank {rank} of {world_size}: rendezvous failed after waiting up to {timeout_s:g} s for "
                           f"{who} ({_first_line(err)}); check that all {world_size} ranks started, with the same "
                           f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE (dist.rendezvous_timeout_s sets the wait)") from None


def _port_answers(addr: str, port: int, deadline: float) -> bool:
    """Whether something accepts TCP connections at addr:port before `deadline` (time.monotonic())."""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(min(deadline - time.monotonic(), 2.0), 0.1)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _first_line(err: Exception) -> str:
    """An error's telling line, without torch's '[file.cpp:123]' prefixes."""
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", ln).strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("Exception raised from", "frame #"))]
    return lines[0] if lines else type(err).__name__


# ---- a line while a collective waits ----------------------------------------------------------------------

WAIT_WARN_ENV = "DCSCALE_WAIT_WARN_S"  # seconds between "still waiting" lines (default 300)
_WAITING: list = [None]  # (what, since) of the collective this process is blocked in, or None
_WATCH_STARTED = False


def wait_warning_interval() -> float:
    text = os.environ.get(WAIT_WARN_ENV, "")
    try:
        value = float(text) if text else 300.0
    except ValueError:
        raise DcscaleError(f"{WAIT_WARN_ENV}={text!r} in the environment: expected a number of seconds > 0") from None
    if not (value > 0 and value == value and value != float("inf")):
        raise DcscaleError(f"{WAIT_WARN_ENV}={text!r} in the environment: expected a number of seconds > 0")
    return value


def start_wait_watch(rank: int) -> None:
    """A daemon thread that logs one line every `wait_warning_interval()` seconds while this rank is
    blocked in a collective (`watched`): a slow, stopped or dead peer is visible long before the
    collective times out. It costs one clock read per collective and a wake-up a second."""
    global _WATCH_STARTED
    if _WATCH_STARTED:
        return
    _WATCH_STARTED = True
    interval = wait_warning_interval()

    def watch() -> None:
        log = logging.getLogger("dcscale")  # (the CLI's handler: one "dcscale: WARNING: ..." line)
        warned_for, next_at = None, 0.0
        while True:
            time.sleep(min(1.0, interval / 4))
            waiting = _WAITING[0]
            if waiting is None:
                continue
            what, since = waiting
            if waiting is not warned_for:
                warned_for, next_at = waiting, since + interval
            now = time.monotonic()
            if now >= next_at:
                log.warning("rank %d waiting for %s since %.0f s (another rank has not reached it yet: slow, "
                            "stopped or gone)", rank, what, now - since)
                next_at += interval

    threading.Thread(target=watch, name="dcscale-wait-watch", daemon=True).start()


@contextlib.contextmanager
def waiting(what: str):
    """Around code that may block on other ranks (a collective, DDP's gradient all-reduce): a wait there
    is reported by the watch thread. Nested: the outermost names the wait."""
    if not _ENV.distributed or _WAITING[0] is not None:
        yield
        return
    _WAITING[0] = (what, time.monotonic())
    try:
        yield
    finally:
        _WAITING[0] = None


def watched(what: str):
    """Decorator: the collective's waits are seen by the watch thread (`waiting`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with waiting(what):
                return fn(*args, **kwargs)
        return call
    return wrap


def get_env() -> DistEnv:
    return _ENV


def is_main() -> bool:
    return _ENV.rank == 0


@watched("a barrier")
def barrier() -> None:
    if _ENV.distributed:
        dist.barrier()


@watched("rank 0 (k-means wait)")
def wait_for_main() -> None:
    """Block until every rank arrives, with the long k-means timeout (a CPU-side gloo barrier, so
    NCCL's watchdog never sees the wait)."""
    if _ENV.distributed:
        dist.barrier(group=_WAIT_GROUP)


def shutdown() -> None:
    global _WAIT_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _WAIT_GROUP = None


def _comm_device() -> torch.device:
    return _ENV.device if _ENV.backend == "nccl" else torch.device("cpu")


@watched("a row-count all-gather")
def row_counts(n_rows: int) -> list[int]:
    """Every rank's `n_rows`, in rank order (one small all-gather)."""
    if not _ENV.distributed:
        return [int(n_rows)]
    counts = torch.tensor([n_rows], dtype=torch.int64, device=_comm_device())
    out = [torch.zeros_like(counts) for _ in range(_ENV.world_size)]
    dist.all_gather(out, counts)
    return [int(c.item()) for c in out]


_PIECE_BYTES = 64 * 2**20  # all-gather output per collective call: bounds gloo's staging copy


@watched("rows gathered to rank 0")
def gather_rows_to_main(x: np.ndarray) -> np.ndarray | None:
    """Every rank's rows (in rank order) in one array on rank 0; other ranks get None.

    Host rows, so they go point to point over the CPU (gloo) group whatever the backend: no GPU
    staging, and no NCCL communicator for each pair of ranks."""
    if not _ENV.distributed:
        return x
    counts = row_counts(x.shape[0])
    x = np.ascontiguousarray(x)
    if not _ENV.is_main:
        if len(x):
            dist.send(torch.from_numpy(x), dst=0, group=_WAIT_GROUP)
        return None
    out = np.empty((sum(counts), *x.shape[1:]), dtype=x.dtype)
    out[:counts[0]] = x
    offset = counts[0]
    for src, count in enumerate(counts[1:], start=1):
        if count:
            dist.recv(torch.from_numpy(out[offset:offset + count]), src=src, group=_WAIT_GROUP)
        offset += count
    return out


@watched("an all-gather of rows")
def all_gather_rows(x: np.ndarray) -> np.ndarray:
    """Every rank's rows (in rank order) in one array on every rank."""
    if not _ENV.distributed:
        return x
    counts = row_counts(x.shape[0])
    world, most = _ENV.world_size, max(counts)
    x = np.ascontiguousarray(x)
    out = np.empty((world * most, *x.shape[1:]), dtype=x.dtype)  # rank r's rows at r * most
    row_bytes = max(x.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)), 1)
    piece = max(1, _PIECE_BYTES // (world * row_bytes))
    for lo in range(0, most, piece):
        hi = min(lo + piece, most)
        mine = _rows_padded(x, lo, hi).to(_comm_device())
        views = [out[r * most + lo:r * most + hi] for r in range(world)]
        if _comm_device().type == "cpu":
            dist.all_gather([torch.from_numpy(v) for v in views], mine)
        else:
            staged = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(staged, mine)
            for v, t in zip(views, staged):
                v[...] = t.cpu().numpy()
    offset = 0
    for r, count in enumerate(counts):  # compact: the rows move down over the padding, in place
        if offset != r * most:
            out[offset:offset + count] = out[r * most:r * most + count]
        offset += count
    return out[:offset]


def _rows_padded(x: np.ndarray, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of x, zero rows past its end (a view when x has them all)."""
    if hi <= len(x):
        return torch.from_numpy(x[lo:hi])
    t = torch.zeros((hi - lo, *x.shape[1:]), dtype=torch.from_numpy(x[:0]).dtype)
    if lo < len(x):
        t[:len(x) - lo] = torch.from_numpy(x[lo:])
    return t


@watched("a broadcast")
def broadcast_array(x: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Send rank `src`'s array (any shape and dtype) to every rank."""
    if not _ENV.distributed:
        return x
    meta = broadcast_object((x.shape, x.dtype.str) if _ENV.rank == src else None, src=src)
    shape, dtype = meta
    if _ENV.rank == src:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(_comm_device())
    else:
        t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, device=_comm_device())
    dist.broadcast(t, src=src)
    return t.cpu().numpy()


@watched("a broadcast")
def broadcast_object(obj, src: int = 0):
    if not _ENV.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def rank0_decides(decide):
    """Run `decide()` on rank 0 only; it returns (shared, local). Every rank gets `shared` (small
    and picklable), rank 0 also `local` (None elsewhere). A DcscaleError on rank 0 is raised on every
    rank, so no rank is left waiting in a collective for one that stopped."""
    outcome = None
    local = None
    if is_main():
        try:
            shared, local = decide()
            outcome = ("ok", shared)
        except DcscaleError as err:
            outcome = ("error", str(err))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise DcscaleError(value)
    return value, local


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (loss totals, counts)."""
    return all_reduce_array_(np.array(values, dtype=np.float64)).tolist()


@watched("an all-reduce")
def all_reduce_array_(x: np.ndarray) -> np.ndarray:
    """Sum every rank's `x` (C-contiguous; same shape and dtype on every rank) into `x` itself, on every
    rank, and return it: no copy of the array on CPU."""
    if not _ENV.distributed:
        return x
    t = torch.from_numpy(x)
    if _comm_device().type == "cpu":
        dist.all_reduce(t)
    else:
        on_device = t.to(_comm_device())
        dist.all_reduce(on_device)
        t.copy_(on_device.cpu())
    return x


def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum every rank's tensor `t` (same shape and dtype everywhere) into `t` itself, on every rank,
    staged through the process group's device when `t` lives elsewhere."""
    if not _ENV.distributed:
        return t
    if t.device == _comm_device():
        dist.all_reduce(t)
        return t
    staged = t.to(_comm_device())
    dist.all_reduce(staged)
    return t.copy_(staged)


@watched("an all-reduce")
def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a NaN loss somewhere)."""
    if not _ENV.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
