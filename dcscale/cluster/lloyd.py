"""Distributed k-means: Lloyd's iterations over training rows that never leave their ranks.

Every rank searches its own rows against the current centroids (faiss, exact L2, on its GPU when it
has one) and sums them per cluster; the K x d sums, the K counts and the objective are all-reduced
once per iteration (8 K (d + 1) bytes, whatever N and W), and every rank then computes the same new
centroids. A rank holds its rows, the centroids and their sums: nothing grows with T on rank 0.

It is faiss's algorithm (faiss.Clustering) with its own random draws: K distinct training rows drawn
at random as the initial centroids, an empty cluster re-seeded by splitting a cluster drawn with
probability proportional to its size - 1 (the two halves pushed apart by 1/1024), and faiss's early
stop when the objective stops changing. The labels therefore differ from faiss's, not their quality
(tests/test_lloyd.py compares the objectives).

Reproducibility: the draws depend on the seed and on the global order of the training rows only;
the sums are float64, summed in row order within a rank, then across ranks. The same rows, seed and
world size give bit-identical centroids, whatever the thread count; another world size sums in another
order, which may move a float64 sum by an ulp (in practice the same labels).
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp

from dcscale import dist
from dcscale.cluster.kmeans import SEARCH_QUERY_BLOCK, KMeansResult, _as_rows, _converged, _flat_index

SPLIT_EPS = 1 / 1024  # faiss's: how far the two halves of a split cluster are pushed apart


def chunk_rows(d: int) -> int:
    """Rows per search-and-sum step: 4,096 (every faiss search call has a fixed cost: much smaller
    calls are several times slower), fewer from d = 512 on, to keep the float64 copy under 32 MB. It
    depends on d only, so that every world size searches alike."""
    return int(min(4096, max(1024, 2**21 // max(d, 1))))


def distributed_kmeans_memory_bytes(k: int, dim: int) -> int:
    """A rank's memory for distributed k-means, beyond its own rows: the centroids (and faiss's copy of
    them), the float64 sums, counts and objective, one chunk's float64 copy and search results, and
    faiss's distance block (SEARCH_QUERY_BLOCK queries x 1,024 centroids)."""
    return 2 * 4 * k * dim + 8 * (k * (dim + 1) + 1) + chunk_rows(dim) * (8 * dim + 12) + 4 * SEARCH_QUERY_BLOCK * 1024


def distributed_kmeans(rows: np.ndarray, k: int, niter: int = 20, seed: int = 0, *, gpu: bool | None = None,
                       device: int | None = None, on_iteration=None) -> KMeansResult:
    """k-means over the union of every rank's `rows` [t_r, d] (collective: every rank calls it, in
    rank order of the rows; a rank may have none). Returns the same KMeansResult on every rank.

    `device`: this rank's GPU for the searches (with a GPU build of faiss). `on_iteration(objective)` is
    called after every iteration. Fewer training rows than clusters are allowed: the initial centroids
    then repeat rows, and the surplus clusters stay empty (counted at assignment, never a crash).
    """
    rows = _as_rows(rows)
    t_local, d = rows.shape
    counts_by_rank = dist.row_counts(t_local)
    t, offset = sum(counts_by_rank), sum(counts_by_rank[:dist.get_env().rank])
    if t == 0:
        raise ValueError("k-means needs at least one training row")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    centroids = initial_centroids(rows, offset, t, k, seed)
    index = _flat_index(d, gpu, device)
    threshold = getattr(faiss.ClusteringParameters(), "early_stop_threshold", None)  # (faiss >= 1.12)
    step = chunk_rows(d)
    objectives: list[float] = []
    for it in range(int(niter)):
        index.reset()
        index.add(centroids)
        # One float64 buffer for the all-reduce: the K x d sums, then the K counts, then the objective.
        packed = np.zeros(k * (d + 1) + 1, np.float64)
        sums, counts = packed[:k * d].reshape(k, d), packed[k * d:k * (d + 1)]
        for lo in range(0, t_local, step):
            x = rows[lo:lo + step]
            sq_dist, nearest = index.search(x, 1)
            nearest = nearest[:, 0]
            packed[-1] += float(np.sum(sq_dist, dtype=np.float64))
            counts += np.bincount(nearest, minlength=k)
            # The per-cluster sums as one sparse product over the clusters present in the chunk (rows
            # added in order: deterministic; faster than np.add.at or index_add_, and no K x d temporary).
            present, member_of = np.unique(nearest, return_inverse=True)
            members = sp.csr_matrix((np.ones(len(x)), (member_of, np.arange(len(x)))), shape=(len(present), len(x)))
            sums[present] += members @ x.astype(np.float64)
        dist.all_reduce_array_(packed)
        objective = float(packed[-1])
        objectives.append(objective)
        sizes = counts.astype(np.int64)
        filled = sizes > 0
        centroids[filled] = (sums[filled] / sizes[filled, None]).astype(np.float32)
        split_empty_clusters(centroids, sizes, np.random.default_rng([int(seed), it, 0x5B17]))
        if on_iteration is not None:
            on_iteration(objective)
        if it > 0 and threshold is not None and _converged(objectives[-2], objective, threshold):
            break
    # Every rank computed the same centroids from the same reduced sums; rank 0's are made the only
    # ones anyway, so that no all-reduce implementation could leave ranks an ulp apart.
    centroids = dist.broadcast_array(centroids)
    return KMeansResult(centroids=centroids, objective=objectives[-1], iteration_objectives=objectives, n_train=t)


def initial_centroids(rows: np.ndarray, offset: int, t: int, k: int, seed: int) -> np.ndarray:
    """K training rows drawn at random (by global position: the same draw at any world size), every
    rank filling in those it holds; rows repeat cyclically when there are fewer than K."""
    rng = np.random.default_rng([int(seed), 0x1217])
    picks = rng.choice(t, size=k, replace=False) if t >= k else np.resize(rng.permutation(t), k)
    centroids = np.zeros((k, rows.shape[1]), np.float32)
    mine = (picks >= offset) & (picks < offset + len(rows))
    centroids[mine] = rows[picks[mine] - offset]
    return dist.all_reduce_array_(centroids)  # each row has one non-zero contribution: an exact sum


def split_empty_clusters(centroids: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed every empty cluster from a cluster drawn with probability proportional to its size - 1
    (faiss's rule): the empty one takes a copy pushed 1/1024 one way, the donor is pushed the other way,
    and they share its rows' count. In place; returns how many were split. O(K) per empty cluster."""
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32) * SPLIT_EPS
    split = 0
    for empty in np.flatnonzero(sizes == 0):
        weights = np.cumsum(np.maximum(sizes - 1, 0))
        if weights[-1] == 0:  # no cluster has two rows to give (fewer distinct rows than clusters)
            break
        donor = int(np.searchsorted(weights, rng.random() * weights[-1], side="right"))
        centroids[empty] = centroids[donor] * (1 + signs)
        centroids[donor] *= 1 - signs
        sizes[empty] = sizes[donor] // 2
        sizes[donor] -= sizes[empty]
        split += 1
    return split
