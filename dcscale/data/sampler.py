"""Distributed sampler drawing uniformly over the non-empty pseudo-label clusters.

Every rank computes the same global draw from (seed, epoch) and takes a strided share of it, so:
- each non-empty cluster gets exactly `quota = ceil(N' / K')` draws (N' labelled points, K'
  non-empty clusters): without replacement when the cluster has at least `quota` members, with
  replacement when it is smaller;
- the draws are shuffled by one global permutation, padded (by repeating its first items, like
  torch's DistributedSampler) to a multiple of the world size W;
- rank r takes positions r, r+W, r+2W, ... (strided: at any step the W ranks read W consecutive
  items of the global order), so every rank yields exactly `per_rank` indices (no DDP hang) and the
  union over ranks is the global draw;
- `start` skips the first `start` indices of this rank's share, to resume mid-epoch exactly.

Unlike the original DeepCluster sampler (which mixes positions in its reassigned dataset with
dataset indices), the draw is uniform over clusters: each cluster's share is exactly 1/K' of the
draw before padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def uniform_cluster_draw(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The global, shuffled draw of dataset indices (identical on every rank for equal inputs).
    Labels < 0 are excluded; clusters without members get nothing."""
    labels = np.asarray(labels).ravel()
    valid = np.flatnonzero(labels >= 0)
    index_dtype = np.int32 if labels.size < 2**31 else np.int64  # halves memory at 100M images
    if valid.size == 0:
        return np.empty(0, dtype=index_dtype)
    rng = np.random.default_rng([int(seed), int(epoch)])
    lab = labels[valid].astype(np.int64, copy=False)
    # Group members by cluster, in a random order within each cluster: shuffle, then a stable sort
    # by label (vectorised; no Python loop over clusters, fast for K in the 100k).
    shuffled = valid[rng.permutation(valid.size)]
    members = shuffled[np.argsort(labels[shuffled], kind="stable")]
    all_sizes = np.bincount(lab)
    all_starts = np.concatenate([[0], np.cumsum(all_sizes)[:-1]])
    nonempty = all_sizes > 0
    sizes, starts = all_sizes[nonempty], all_starts[nonempty]
    quota = math.ceil(valid.size / sizes.size)
    big = sizes >= quota
    offsets = np.empty((sizes.size, quota), dtype=np.int64)
    # Large clusters: their first `quota` members in random order (without replacement).
    offsets[big] = np.arange(quota)[None, :]
    # Small clusters: `quota` uniform draws with replacement.
    small_sizes = sizes[~big]
    offsets[~big] = (rng.random((small_sizes.size, quota)) * small_sizes[:, None]).astype(np.int64)
    draw = members[(starts[:, None] + offsets).ravel()]
    return rng.permutation(draw).astype(index_dtype, copy=False)


class UniformClusterSampler(Sampler[int]):
    """torch Sampler of global dataset indices for one rank (see the module docstring).

    len(sampler) is the number of indices still to come on this rank (per_rank - start).
    """

    def __init__(self, labels: np.ndarray, *, world_size: int, rank: int, seed: int, epoch: int = 0,
                 start: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.labels = np.asarray(labels).ravel()
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = int(epoch)
        valid = self.labels[self.labels >= 0]
        self.num_labelled = int(valid.size)
        self.num_clusters = int(np.count_nonzero(np.bincount(valid.astype(np.int64)))) if valid.size else 0  # K'
        self.quota = math.ceil(self.num_labelled / self.num_clusters) if self.num_clusters else 0
        self.total = self.quota * self.num_clusters  # draws before padding
        self.per_rank = math.ceil(self.total / self.world_size)
        self._cache: tuple[int, np.ndarray] | None = None
        self.start = 0
        self.set_start(start)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside [0, {self.per_rank}] for this rank")
        self.start = int(start)

    def rank_indices(self) -> np.ndarray:
        """This rank's full share for the current epoch (ignores `start`)."""
        if self._cache is None or self._cache[0] != self.epoch:
            draw = uniform_cluster_draw(self.labels, self.seed, self.epoch)
            padded_len = self.per_rank * self.world_size
            if padded_len > draw.size:
                draw = np.concatenate([draw, np.resize(draw, padded_len - draw.size)])
            self._cache = (self.epoch, draw[self.rank::self.world_size])
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
