"""Process-group set-up and the few collectives the DeepCluster cycle needs, in one place.

A run is one of: a single plain process (no process group at all), `torchrun` (RANK/WORLD_SIZE/
MASTER_ADDR in the environment), or a submitit task (the launcher exports the same variables from
submitit's distributed environment before calling the training run). NCCL on GPUs, gloo on CPU.

The array helpers move numpy rows between ranks. Rows are padded to the largest rank's count because
gather/all_gather need equal shapes; the padding is cut off again on arrival.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ENV = DistEnv()
_WAIT_GROUP = None  # gloo group with a long timeout, for ranks waiting on rank 0's k-means


def init_distributed(backend: str = "auto", timeout_min: float = 30.0,
                     wait_timeout_min: float = 180.0) -> DistEnv:
    """Join the process group described by the environment (or none, for a plain single process)."""
    global _ENV, _WAIT_GROUP
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        if not dist.is_initialized():  # (tests may have joined a FileStore group already)
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min),
                                    rank=rank, world_size=world_size,
                                    device_id=device if backend == "nccl" else None)
        backend = dist.get_backend()
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=wait_timeout_min))
    _ENV = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   backend=backend if world_size > 1 else None)
    return _ENV


def get_env() -> DistEnv:
    return _ENV


def is_main() -> bool:
    return _ENV.rank == 0


def barrier() -> None:
    if _ENV.distributed:
        dist.barrier()


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


def _row_counts(n_rows: int) -> list[int]:
    counts = torch.tensor([n_rows], dtype=torch.int64, device=_comm_device())
    out = [torch.zeros_like(counts) for _ in range(_ENV.world_size)]
    dist.all_gather(out, counts)
    return [int(c.item()) for c in out]


def _padded(x: np.ndarray, rows: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[0] < rows:
        pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
        t = torch.cat([t, pad])
    return t.to(_comm_device())


def gather_rows_to_main(x: np.ndarray) -> np.ndarray | None:
    """Concatenate every rank's rows (in rank order) on rank 0; other ranks get None."""
    if not _ENV.distributed:
        return x
    counts = _row_counts(x.shape[0])
    t = _padded(x, max(counts))
    parts = [torch.empty_like(t) for _ in counts] if _ENV.is_main else None
    dist.gather(t, parts, dst=0)
    if not _ENV.is_main:
        return None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


def all_gather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (in rank order) on every rank."""
    if not _ENV.distributed:
        return x
    counts = _row_counts(x.shape[0])
    t = _padded(x, max(counts))
    parts = [torch.empty_like(t) for _ in counts]
    dist.all_gather(parts, t)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


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


def broadcast_object(obj, src: int = 0):
    if not _ENV.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (loss totals, counts)."""
    if not _ENV.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a NaN loss somewhere)."""
    if not _ENV.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
