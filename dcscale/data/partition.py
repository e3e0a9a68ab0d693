"""Exact partition of the global indices over ranks and their DataLoader workers.

Each rank owns one contiguous slice, so it reads its shards sequentially; slice sizes differ by at
most one and the slices cover every index exactly once (the k-means labels of rank r are
concatenated in rank order, so rank r must own exactly [r*N//W, (r+1)*N//W)). Within a rank,
`worker_range` splits a slice into contiguous balanced pieces, and `extraction_batches` lays the
workers' balanced shares out as interleaved batches, so the extraction loader returns batches in
global index order.
"""

from __future__ import annotations


def _split(length: int, parts: int, part: int) -> tuple[int, int]:
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    if not 0 <= part < parts:
        raise ValueError(f"part {part} out of range for {parts} parts")
    return part * length // parts, (part + 1) * length // parts


def rank_range(n: int, world_size: int, rank: int) -> range:
    """Global indices of `rank`: [rank*n//world_size, (rank+1)*n//world_size)."""
    if n < 0:
        raise ValueError(f"negative size {n}")
    start, stop = _split(n, world_size, rank)
    return range(start, stop)


def worker_range(rank_range: range, num_workers: int, worker_id: int) -> range:
    """Contiguous piece of a rank's range for one DataLoader worker (may be empty)."""
    if rank_range.step != 1:
        raise ValueError("worker_range needs a contiguous range")
    start, stop = _split(len(rank_range), num_workers, worker_id)
    return range(rank_range.start + start, rank_range.start + stop)


def extraction_batches(rank_range: range, num_workers: int, batch_size: int) -> list[tuple[int, range]]:
    """A rank's extraction pass as (worker id, batch) pairs, in the order a DataLoader returns them.

    Each worker reads a balanced share of the rank's samples (totals differ by at most one) in
    batches of at most `batch_size`. The batches are laid out round by round: round r holds worker
    0's r-th batch, then worker 1's, ... This is the DataLoader's own round-robin order over its
    workers, so batches come out in global index order whatever the number of workers (features
    arrive already sorted, and the pass is the same with 0, 2 or 8 workers). A worker's batches
    shrink, never grow, from round to round, so a worker that runs out has no batch later on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = max(1, num_workers)
    n = len(rank_range)
    rounds = -(-n // (workers * batch_size))  # enough rounds that no batch exceeds batch_size
    totals = [len(worker_range(range(n), workers, w)) for w in range(workers)]
    out, start = [], rank_range.start
    for r in range(rounds):
        for w, total in enumerate(totals):
            size = total // rounds + (1 if r < total % rounds else 0)
            if size:
                out.append((w, range(start, start + size)))
                start += size
    return out


def worker_batches(rank_range: range, num_workers: int, worker_id: int, batch_size: int) -> list[range]:
    """The batches one DataLoader worker reads in the extraction pass (see extraction_batches)."""
    return [b for w, b in extraction_batches(rank_range, num_workers, batch_size) if w == worker_id]
