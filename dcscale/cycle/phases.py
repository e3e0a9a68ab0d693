"""The phases of one DeepCluster cycle across ranks: extract -> reduce -> cluster -> assign -> train.

Each phase takes explicit inputs and returns explicit outputs; `dcscale.cycle.clustering` calls them in
order. Data flow (see docs/design.md): every rank works on its own contiguous slice of the shard set. With
PCA on, a cycle first extracts only its share of the PCA sample and reduces it to float64 sums (one
all-reduce; no row crosses the network), the eigensolver runs once on rank 0 and the D x d matrix is
broadcast; then every rank extracts its slice and projects each chunk of rows as it comes off the
network, so a rank never holds its slice at full width (`extract_projected`). k-means all-reduces
K x (d + 1) sums per iteration (cluster.kmeans: distributed; with "rank0" the training rows, at most
cluster.max_train_rows, travel to rank 0 and the centroids back); the N-long label array is
all-gathered.
"""

from __future__ import annotations

import numpy as np
import torch

from dcscale import dist
from dcscale.cluster.kmeans import (assign, faiss_threads, fitting_threads, search_block, train_kmeans,
                                    training_row_indices)
from dcscale.cluster.lloyd import distributed_kmeans
from dcscale.cluster.pca import CHUNK_ROWS, PCA, apply_pca, fit_pca_across_ranks
from dcscale.data.loaders import extraction_loader
from dcscale.data.partition import rank_range
from dcscale.cycle.compute import ForwardSettings
from dcscale.progress import Progress, progress


def _feature_batches(model_fn, loader, compute: ForwardSettings, shown):
    """(global indices [b] as numpy, features [b, D] on the model's device) per non-empty batch."""
    for batch_indices, images in loader:
        if len(batch_indices) == 0:
            continue
        with compute.autocast():
            out = model_fn(compute.batch(images))
        yield batch_indices.numpy(), out
        shown.update(len(batch_indices))


@torch.no_grad()
def extract_features(model_fn, shardset, transform, env: dist.DistEnv, batch_size: int, workers: int,
                     dtype: str = "float32", feature_dim: int | None = None,
                     compute: ForwardSettings | None = None, rows=None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Run this rank's contiguous slice (or `rows`: a sorted subset of it) through `model_fn`
    (batch -> [B, D] features), under `compute`'s autocast and memory format (default: fp32).

    Returns (global indices int64 [n_r], features [n_r, D] in `dtype`, skipped global indices); the
    features of decoded images only, in index order.
    """
    compute = compute or ForwardSettings(env.device)
    # The transform's float work (resize, crop, normalise) runs on env.device, on whole batches.
    loader = extraction_loader(shardset, transform, rank=env.rank, world_size=env.world_size,
                               batch_size=batch_size, num_workers=workers,
                               pin_memory=torch.device(env.device).type == "cuda", device=env.device, indices=rows)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    # One array for the whole slice, filled in order (batches come in index order) and cut to the
    # decoded rows at the end: a view, so the features are never copied a second time.
    slice_rows = len(loader.indices)
    indices = np.empty(slice_rows, np.int64)
    feats = None  # allocated at the first batch, which tells the feature width
    filled = 0
    # rank 0's slice stands for every rank's (they are the same size)
    with Progress("extract" if rows is None else "pca sample", slice_rows, "images", env.is_main) as shown:
        for batch_indices, out in _feature_batches(model_fn, loader, compute, shown):
            if feats is None:
                feats = np.empty((slice_rows, out.shape[1]), np_dtype)
            here = slice(filled, filled + len(batch_indices))
            indices[here] = batch_indices
            torch.from_numpy(feats[here]).copy_(out)  # to the host and to `dtype` (from bf16/fp16 too) in one copy
            filled += len(batch_indices)
    skipped = list(getattr(loader, "skipped", []))
    if feats is None:
        # A rank with nothing decodable still takes part in the gathers, with rows of the right width.
        return np.zeros(0, np.int64), np.zeros((0, feature_dim or 0), np_dtype), skipped
    return indices[:filled], feats[:filled], skipped


@torch.no_grad()
def extract_projected(model_fn, shardset, transform, env: dist.DistEnv, batch_size: int, workers: int,
                      pca: PCA | None, dtype: str = "float32", feature_dim: int | None = None,
                      compute: ForwardSettings | None = None) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """`extract_features` with the reduction streamed in: the rows are projected with `pca` (None: kept
    D-wide) and L2-normalised a chunk of CHUNK_ROWS at a time as they come off the network, so the
    rank holds its reduced rows (4 d n_r bytes) and one chunk of raw features, never b D n_r.

    The chunks are the ones `apply_pca` cuts the whole slice into (CHUNK_ROWS decoded rows each, from
    the slice's first), so the rows are exactly those of extract_features + apply_pca.
    Returns (global indices [n_r], float32 rows [n_r, d], skipped global indices, the number of rows
    with a NaN or infinite feature).
    """
    compute = compute or ForwardSettings(env.device)
    loader = extraction_loader(shardset, transform, rank=env.rank, world_size=env.world_size,
                               batch_size=batch_size, num_workers=workers,
                               pin_memory=torch.device(env.device).type == "cuda", device=env.device)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    slice_rows = len(loader.indices)
    indices = np.empty(slice_rows, np.int64)
    raw = z = None  # allocated at the first batch, which tells the feature width
    done = pending = nonfinite = 0  # rows projected into z; rows waiting in `raw`

    def project_pending():
        nonlocal done, pending, nonfinite
        nonfinite += nonfinite_rows(raw[:pending])
        apply_pca(raw[:pending], pca, out=z[done:done + pending])
        done, pending = done + pending, 0

    with Progress("extract", slice_rows, "images", env.is_main) as shown:
        for batch_indices, out in _feature_batches(model_fn, loader, compute, shown):
            if raw is None:
                raw = np.empty((CHUNK_ROWS, out.shape[1]), np_dtype)
                z = np.empty((slice_rows, out.shape[1] if pca is None else pca.out_dim), np.float32)
            indices[done + pending:done + pending + len(batch_indices)] = batch_indices
            taken = 0
            while taken < len(batch_indices):
                m = min(CHUNK_ROWS - pending, len(batch_indices) - taken)
                torch.from_numpy(raw[pending:pending + m]).copy_(out[taken:taken + m])  # to the host, to `dtype`
                pending, taken = pending + m, taken + m
                if pending == CHUNK_ROWS:
                    project_pending()
        if pending:
            project_pending()
    skipped = list(getattr(loader, "skipped", []))
    if z is None:
        width = (feature_dim or 0) if pca is None else pca.out_dim
        return np.zeros(0, np.int64), np.zeros((0, width), np.float32), skipped, 0
    return indices[:done], z[:done], skipped, nonfinite


def pca_sample_indices(n_total: int, pca_sample: int | None, seed: int) -> np.ndarray:
    """The sorted global indices of a cycle's PCA sample: min(pca_sample, N) rows drawn with the
    cycle's seed, the same on every rank and at every world size."""
    rng = np.random.default_rng(seed)
    n_sample = n_total if pca_sample is None else min(pca_sample, n_total)
    return np.sort(rng.choice(n_total, size=n_sample, replace=False))


@torch.no_grad()
def extract_pca_sample(model_fn, shardset, transform, env: dist.DistEnv, batch_size: int, workers: int,
                       dtype: str, feature_dim: int, compute: ForwardSettings | None, pca_sample: int | None,
                       seed: int) -> tuple[np.ndarray, np.ndarray, list[int], int, int, int]:
    """This rank's share of the cycle's PCA sample, extracted before the pass over every row (their
    images are read and run through the network again in that pass: S/N of an extraction pass more,
    unless the sample is every image: see `project_sample`).
    A collective. Returns (this rank's sample: global indices, decoded rows float32 [S_r, D], skipped
    indices; over all ranks: the decoded rows, the rows with a NaN or infinite feature, the rows drawn)."""
    n_total = len(shardset)
    chosen = pca_sample_indices(n_total, pca_sample, seed)
    mine = rank_range(n_total, env.world_size, env.rank)
    lo, hi = np.searchsorted(chosen, [mine.start, mine.stop])
    indices, sample, skipped = extract_features(model_fn, shardset, transform, env, batch_size, workers, dtype,
                                                feature_dim, compute, rows=chosen[lo:hi])
    n_rows, n_bad = (int(v) for v in dist.all_reduce_sum([len(sample), nonfinite_rows(sample)]))
    return indices, sample.astype(np.float32, copy=False), skipped, n_rows, n_bad, len(chosen)


def project_sample(indices: np.ndarray, sample: np.ndarray, skipped: list[int], pca: PCA,
                   ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """`extract_projected`'s result when the PCA sample is the rank's whole slice (pca_sample >= N):
    its rows are already off the network, so they are projected instead of extracted a second time.
    The same rows, chunked alike (float16 rows upcast exactly), so the same bits. The slice is held at
    full width here, which the sample's bound (4 D S/W bytes) already allows."""
    z = apply_pca(sample, pca)
    return indices, z, skipped, nonfinite_rows(sample)


def nonfinite_rows(feats: np.ndarray, chunk_rows: int = 16384) -> int:
    """Rows with a NaN or infinite value (fp16 overflow, diverged weights), counted a chunk at a time:
    such rows would make the PCA and k-means silently meaningless."""
    return sum(int(np.count_nonzero(~np.isfinite(feats[a:a + chunk_rows]).all(axis=1)))
               for a in range(0, len(feats), chunk_rows))


def _rows_in(indices: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Positions in this rank's `indices` (sorted) of the globally chosen indices (sorted) it holds;
    memory in the number chosen, not in the rank's rows."""
    if len(indices) == 0:
        return np.zeros(0, np.int64)
    lo, hi = np.searchsorted(chosen, [indices[0], indices[-1] + 1])
    candidates = chosen[lo:hi]
    positions = np.searchsorted(indices, candidates)
    return positions[indices[positions] == candidates]


def reduce_features(indices: np.ndarray, feats: np.ndarray, n_total: int, pca_dim: int | None,
                    pca_sample: int | None, seed: int) -> tuple[np.ndarray, PCA | None]:
    """PCA (fitted across ranks on a global random sample of the rows held) + whitening + L2, on every
    rank, for features already extracted at full width (`clustering.cluster_rows_to_labels`; a training
    cycle streams instead: `clustering.fit_cycle_pca`, `extract_projected`).

    Returns new float32 rows; `feats` is left as it was, for the caller to drop (or reuse).
    """
    pca = None
    if pca_dim is not None:
        chosen = pca_sample_indices(n_total, pca_sample, seed)
        pca = fit_pca_across_ranks(feats[_rows_in(indices, chosen)].astype(np.float32, copy=False), pca_dim)
    return apply_pca(feats, pca), pca


def cluster_rows(indices: np.ndarray, z: np.ndarray, n_total: int, k: int, niter: int,
                 max_points_per_centroid: int | None, max_train_rows: int | None,
                 seed: int, mode: str = "distributed") -> tuple[np.ndarray, float, int]:
    """k-means over the (possibly subsampled) training rows of every rank; the centroids on every rank.

    Returns (centroids [K, d], the training objective, the iterations run: fewer than `niter` when
    faiss's early stop fired). `mode` (cluster.kmeans):
    - "distributed": every rank runs Lloyd's iterations on its own training rows, on its share of its
      node's cores (or its GPU), and only K x (d + 1) sums are all-reduced per iteration;
    - "rank0": the training rows are gathered to rank 0 and faiss's own k-means runs there on the
      cores that are free (one for a small problem; faiss's thread count is restored after); the other
      ranks wait on a long-timeout barrier meanwhile.
    """
    chosen = training_row_indices(n_total, k, max_points_per_centroid, seed, max_train_rows)
    local = z if chosen is None else z[_rows_in(indices, chosen)]
    if mode == "distributed":
        with faiss_threads(assign_threads(len(local), local.shape[1], k)), search_block(), \
                Progress("k-means", niter, "iterations", dist.is_main()) as shown:
            result = distributed_kmeans(local, k, niter, seed, device=faiss_device(),
                                        on_iteration=lambda obj: shown.update(1, objective=obj))
        return result.centroids, float(result.objective), len(result.iteration_objectives)
    if mode != "rank0":
        raise ValueError(f"unknown k-means mode {mode!r}: 'distributed' or 'rank0'")
    train_rows = dist.gather_rows_to_main(np.ascontiguousarray(local, dtype=np.float32))
    del local
    if dist.is_main():
        # the cores that are free: the other ranks sleep in the wait below (a gloo wait takes no CPU)
        threads = fitting_threads(len(train_rows), train_rows.shape[1], k, dist.free_cores)
        with faiss_threads(threads), search_block(), Progress("k-means", niter, "iterations") as shown:
            result = train_kmeans(train_rows, k, niter, seed, on_iteration=lambda obj: shown.update(1, objective=obj))
        centroids, objective = result.centroids, (float(result.objective), len(result.iteration_objectives))
    else:
        centroids, objective = None, None
    del train_rows
    dist.wait_for_main()
    centroids = dist.broadcast_array(centroids)
    objective, iterations = dist.broadcast_object(objective)
    return centroids, objective, iterations


def faiss_device() -> int | None:
    """This rank's GPU for its faiss searches (k-means iterations, assignment), or None on a CPU."""
    device = dist.get_env().device
    return device.index if device.type == "cuda" else None


def assign_threads(rows: int, dim: int, k: int) -> int:
    """faiss threads for each rank's search of rows x dim against k centroids (distributed k-means,
    assignment): one for a small problem, else its share of its node's cores (all ranks search at
    once), no more than its share of those idle now (dist.free_core_share)."""
    return fitting_threads(rows, dim, k, lambda: dist.free_core_share(dist.local_processes()))


def assign_rows(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows' nearest centroids and squared distances to them (no communication)."""
    threads = assign_threads(len(z), z.shape[1] if z.ndim == 2 else 0, len(centroids))
    with faiss_threads(threads), search_block():
        return assign(np.ascontiguousarray(z, dtype=np.float32), centroids, device=faiss_device())


def share_labels(indices: np.ndarray, local_labels: np.ndarray, sq_dist: np.ndarray,
                 n_total: int) -> tuple[np.ndarray, float]:
    """The full N-long int32 label array on every rank, from every rank's assigned rows.

    Each rank owns the contiguous slice rank_range(N, W, r), so only its int32 labels travel (N x 4
    bytes in all). Samples that could not be decoded keep label -1 and are never drawn for training.
    Also returns the k-means objective over every row (mean squared distance to its centroid), which,
    unlike faiss's training objective, compares across cycles and across exact vs subsampled training.
    """
    env = dist.get_env()
    mine = rank_range(n_total, env.world_size, env.rank)
    slice_labels = np.full(len(mine), -1, dtype=np.int32)
    slice_labels[indices - mine.start] = local_labels
    labels = dist.all_gather_rows(slice_labels)
    dist_sum, rows = dist.all_reduce_sum([float(np.sum(sq_dist, dtype=np.float64)), len(sq_dist)])
    return labels, dist_sum / max(rows, 1)


def nearest_rows(indices: np.ndarray, local_labels: np.ndarray, sq_dist: np.ndarray, clusters,
                 per_cluster: int) -> dict[int, list[int]] | None:
    """{cluster: the global indices of its `per_cluster` rows nearest to its centroid, nearest first}
    for the given clusters, on rank 0 (None elsewhere); ties go to the lower index.

    From the assignment's distances: no pass over the data. Each rank sends only its own nearest
    few per cluster, so len(clusters) x per_cluster x W rows travel, whatever N.
    """
    wanted = np.flatnonzero(np.isin(local_labels, np.asarray(list(clusters), dtype=np.int64)))
    mine = _nearest_first(local_labels[wanted], sq_dist[wanted].astype(np.float64), indices[wanted], per_cluster)
    gathered = dist.gather_rows_to_main(mine)
    if gathered is None:
        return None
    best = _nearest_first(gathered[:, 0].astype(np.int64), gathered[:, 1], gathered[:, 2].astype(np.int64),
                          per_cluster)
    out: dict[int, list[int]] = {int(c): [] for c in clusters}
    for cluster, _, index in best:
        out[int(cluster)].append(int(index))
    return out


def _nearest_first(clusters: np.ndarray, sq_dist: np.ndarray, indices: np.ndarray, per_cluster: int) -> np.ndarray:
    """Rows [cluster, squared distance, global index] (float64: indices stay exact up to 2^53), the
    `per_cluster` nearest of each cluster, ordered by (cluster, distance, index)."""
    order = np.lexsort((indices, sq_dist, clusters))
    clusters, sq_dist, indices = clusters[order], sq_dist[order], indices[order]
    place = np.arange(len(clusters)) - np.searchsorted(clusters, clusters)  # rank within its cluster
    keep = place < per_cluster
    return np.stack([clusters[keep], sq_dist[keep], indices[keep]], axis=1).astype(np.float64)


def train_steps(ddp_model, loader, optimizers, env: dist.DistEnv, start_step: int, on_step,
                totals: dict, compute: ForwardSettings | None = None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """SGD over the uniform-cluster batches from `start_step` on, forwards under `compute`'s autocast
    and memory format (default: fp32); with a `scaler` (fp16) the loss is scaled for the backward pass
    and steps whose gradients overflow are skipped (the scaler then lowers its scale).

    `on_step(step, totals)` runs after every step (checkpointing, logging). Stops the run if the loss
    is NaN or infinite on any rank. Returns this rank's running totals (loss sum, correct, seen),
    continued from `totals`.
    """
    compute = compute or ForwardSettings(env.device)
    criterion = torch.nn.CrossEntropyLoss()
    ddp_model.train()
    totals = dict(totals)
    step = start_step
    # Undecodable images never reach here: extraction gave them label -1 and the sampler skips -1.
    for batch in progress(loader, len(loader), "train", env.is_main, unit="steps"):
        images = compute.batch(batch.images)
        targets = batch.labels.to(env.device, non_blocking=True)
        with dist.waiting("a training step (DDP's collectives)"):  # a stopped peer is reported while it waits
            with compute.autocast():
                logits = ddp_model(images)
            loss = criterion(logits.float(), targets)  # (the loss in fp32 whatever the precision)
            if dist.any_rank(not torch.isfinite(loss).item()):
                raise NonFiniteLoss(step)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                for opt in optimizers:
                    opt.step()
            else:
                scaler.scale(loss).backward()
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
        totals["loss_sum"] += float(loss.item()) * len(targets)
        totals["correct"] += int((logits.argmax(1) == targets).sum().item())
        totals["seen"] += len(targets)
        step += 1
        on_step(step, totals)
    return totals


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step
