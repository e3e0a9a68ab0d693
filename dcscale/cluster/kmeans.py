"""faiss k-means: training on (optionally subsampled) rows, and assignment of every row.

GPU faiss on all visible GPUs when the installed faiss has GPUs, CPU faiss otherwise; same calls.
Training rows are chosen up front by `training_row_indices` (so that in a distributed run only
those rows travel to rank 0), hence faiss's own subsampling is switched off here.

Reproducibility: with the same rows and seed, faiss's CPU k-means and assignment give bit-identical
results whatever the number of OpenMP threads (each thread owns a fixed range of centroids when
summing, every query row is searched on its own; tests/test_cluster.py checks 1 vs 2 threads), so
`faiss_threads` can give these phases whatever cores are free (`fitting_threads`). GPU faiss is deterministic for a
given GPU count but may differ from CPU in the last bits.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np


_ASSIGN_CHUNK = 65536  # query rows per search call: bounds the per-call outputs and faiss's query buffers (4 MB)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [K, d] float32
    objective: float  # faiss's objective of the last iteration: sum of squared distances of the training rows
    iteration_objectives: list[float] = field(default_factory=list)
    n_train: int = 0  # rows k-means was trained on (after padding, see train_kmeans)


def cycle_seed(run_seed: int, cycle: int) -> int:
    """A fresh, reproducible k-means seed for every cycle (fits faiss's 32-bit int seed)."""
    state = np.random.SeedSequence([int(run_seed), int(cycle), 0x6B6D]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


def training_row_indices(n_total: int, k: int, max_points_per_centroid: int | None, seed: int,
                         max_rows: int | None = None) -> np.ndarray | None:
    """Sorted global indices of the rows k-means trains on: a uniform sample of the smaller of
    k * max_points_per_centroid (faiss-style) and max_rows rows, or None for all rows (the original
    algorithm, and whenever there are no more rows than that). The sample depends on the seed and
    the size only, so it is the same on every rank and at every world size."""
    caps = [c for c in (None if max_points_per_centroid is None else k * max_points_per_centroid, max_rows)
            if c is not None]
    if not caps or n_total <= min(caps):
        return None
    rng = np.random.default_rng([int(seed), 0x5EED])
    return np.sort(rng.choice(n_total, size=min(caps), replace=False))


def kmeans_memory_bytes(n_train: int, k: int, dim: int) -> int:
    """Rank 0's memory for k-means, roughly: the float32 training rows (repeated up to k when there
    are fewer), three copies of the k centroids (faiss's, the index's, the result) and faiss's
    per-row buffers (int64 label, float32 distance, float32 squared norm)."""
    rows = max(n_train, k)
    return 4 * rows * dim + 3 * 4 * k * dim + 16 * rows


# n x d x K (rows x width x centroids: one iteration's distance work) below which faiss's k-means and
# search run on one thread: a second thread gains nothing there on a quiet machine and loses several
# times over when another process holds a core (OpenMP's threads spin at every barrier); see
# docs/threads.md for the measurements.
ONE_THREAD_WORK = 1_000_000_000


def fitting_threads(rows: int, dim: int, k: int, cores) -> int:
    """faiss threads for k-means or a search of `rows` x `dim` against `k` centroids: one for a small
    problem, else `cores()` (the cores this process may keep busy now; only asked when needed, as it
    may take a measurement). Thread counts never change faiss's results (see above)."""
    if rows * dim * k < ONE_THREAD_WORK:
        return 1
    return max(1, int(cores()))


@contextmanager
def faiss_threads(n: int):
    """Run faiss with `n` OpenMP threads inside the block, and restore the previous count after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


SEARCH_QUERY_BLOCK = 1024  # faiss's default 4,096 makes every CPU search call allocate a 16 MB distance block


@contextmanager
def search_block(rows: int = SEARCH_QUERY_BLOCK):
    """Inside the block, faiss's CPU searches compute distances `rows` queries at a time (x 1,024
    centroids: a 4 MB block instead of 16 MB, allocated per search call); restored after. The block
    size does not change any distance (tests/test_cluster.py)."""
    before = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = int(rows)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_query_bs = before


def use_gpu() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: dict[int, object] = {}  # one scratch-memory pool per GPU, reused every cycle


def _flat_index(d: int, gpu: bool | None, device: int | None = None) -> faiss.Index:
    """Exact L2 index: on CPU; on one GPU (`device`); or replicated on all visible GPUs when faiss has
    them and no device is named (rank 0's k-means training, as faiss.Kmeans does)."""
    index = faiss.IndexFlatL2(d)
    if not (use_gpu() if gpu is None else gpu):
        return index
    if device is None:
        return faiss.index_cpu_to_all_gpus(index)
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[device], device, index)


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {x.shape}")
    return x


def train_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, *, gpu: bool | None = None,
                 verbose: bool = False, on_iteration=None) -> KMeansResult:
    """Train k-means with faiss on the rows of x [T, d] (random initial centroids, as the original).

    Empty clusters during training are re-seeded by faiss's splitting. When there are fewer rows
    than clusters (K close to or above N), the rows are repeated to reach K so that faiss can run;
    the surplus centroids then duplicate others and end up empty at assignment, where they are
    counted (never a crash). `on_iteration(objective)` is called after every iteration.
    """
    x = _as_rows(x)
    t, d = x.shape
    if t == 0:
        raise ValueError("k-means needs at least one training row")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if t < k:
        x = np.ascontiguousarray(np.resize(x, (k, d)))  # repeats rows cyclically
        t = k
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    clus = faiss.Clustering(d, k)
    clus.niter = 1  # one iteration per train() call, so that progress can be shown (see below)
    clus.seed = int(seed)
    clus.verbose = verbose
    # Rows are already subsampled (training_row_indices): faiss must take them all, and must not
    # warn about few points per centroid (K near N is a legitimate, handled case).
    clus.max_points_per_centroid = t // k + 1  # k * this > t: no faiss subsampling
    clus.min_points_per_centroid = 1
    index = _flat_index(d, gpu)
    stats = clus.iteration_stats
    # The first call draws the initial centroids, later calls start from the centroids they find;
    # faiss re-seeds empty clusters with a generator it creates anew every iteration, and its early
    # stop is repeated here: bit for bit the same as one call with niter iterations.
    threshold = getattr(clus, "early_stop_threshold", None)  # (faiss >= 1.12)
    for i in range(int(niter)):
        clus.train(x, index)
        objective = stats.at(stats.size() - 1).obj
        if on_iteration is not None:
            on_iteration(float(objective))
        if i > 0 and threshold is not None and _converged(stats.at(stats.size() - 2).obj, objective, threshold):
            break
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32, copy=False)
    objectives = [float(stats.at(i).obj) for i in range(stats.size())]
    return KMeansResult(centroids=centroids, objective=objectives[-1] if objectives else float("nan"),
                        iteration_objectives=objectives, n_train=t)


def _converged(previous: float, objective: float, threshold: float) -> bool:
    """faiss's early stop (Clustering::train_encoded): the objective's relative change, in float32,
    at most the threshold (0 by default: the objective did not change)."""
    if previous == 0:
        return False
    change = np.float32(abs(np.float32(previous) - np.float32(objective))) / np.float32(abs(previous))
    return float(change) <= threshold


def assign(x: np.ndarray, centroids: np.ndarray, *, gpu: bool | None = None,
           device: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (labels int64 [n], squared distances float32 [n]).

    Every rank assigns its own rows: `device` keeps the index on that rank's GPU (replicating it on
    all GPUs from every rank would put W x W faiss contexts on a node)."""
    x = _as_rows(x)
    centroids = _as_rows(centroids)
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"rows have {x.shape[1]} dims, centroids {centroids.shape[1]}")
    index = _flat_index(centroids.shape[1], gpu, device)
    index.add(centroids)
    labels = np.empty(x.shape[0], dtype=np.int64)
    dists = np.empty(x.shape[0], dtype=np.float32)
    for lo in range(0, x.shape[0], _ASSIGN_CHUNK):
        d, i = index.search(x[lo:lo + _ASSIGN_CHUNK], 1)
        labels[lo:lo + _ASSIGN_CHUNK] = i[:, 0]
        dists[lo:lo + _ASSIGN_CHUNK] = d[:, 0]
    # Rounding can make a tiny squared distance slightly negative.
    np.maximum(dists, 0.0, out=dists)
    return labels, dists
