"""One clustering pass of a cycle across ranks: extract -> reduce (PCA) -> cluster -> assign, with the
checks that stop a bad setting before any work (`check_clusterable`) and after extraction
(`check_decodable`). Training runs it every cycle; its reduce -> cluster -> assign is
`cluster_rows_to_labels`, which IA (and anyone with rows of their own) calls on rows already extracted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dcscale import dist
from dcscale.cluster.kmeans import cycle_seed, kmeans_memory_bytes
from dcscale.cluster.lloyd import distributed_kmeans_memory_bytes
from dcscale.cluster.metrics import cluster_stats
from dcscale.cluster.pca import PCA, fit_pca_across_ranks
from dcscale.config import ClusterConfig, Config
from dcscale.cycle import phases
from dcscale.cycle.compute import ForwardSettings
from dcscale.cycle.images import MONTAGE_PER_ROW, montage_clusters
from dcscale.data.shardset import ShardSet
from dcscale.errors import DcscaleError
from dcscale.host import physical_memory_bytes, release_freed_memory

log = logging.getLogger("dcscale")


FAISS_MIN_POINTS_PER_CENTROID = 39  # below this faiss itself warns that k-means has too few points


def degenerate_settings(cfg: Config, n_images: int) -> list[str]:
    """Settings that run but make the clustering meaningless: one warning line each."""
    c, warnings = cfg.cluster, []
    # (pca_sample below pca_dim is an error: check_clusterable)
    if c.max_points_per_centroid is not None and c.max_points_per_centroid < FAISS_MIN_POINTS_PER_CENTROID:
        warnings.append(f"cluster.max_points_per_centroid = {c.max_points_per_centroid}: k-means trains on at most "
                        f"{c.max_points_per_centroid} row(s) per centroid"
                        + (" (each centroid is one image)" if c.max_points_per_centroid == 1 else "")
                        + f", too few to mean much (faiss advises at least {FAISS_MIN_POINTS_PER_CENTROID}); "
                        f"use null for no cap")
    return warnings


def check_clusterable(cfg: Config, model, shards: ShardSet) -> None:
    """Fail before any work on settings that could only fail after a whole extraction pass."""
    c, n = cfg.cluster, len(shards)
    if n == 0:
        raise DcscaleError(f"{shards.root}: the shard set is empty")
    if c.labels == "ground_truth":
        classes = shards.manifest.num_classes
        if not shards.manifest.has_labels or classes is None:
            raise DcscaleError(f"cluster.labels = 'ground_truth' needs a labelled shard set with a class count; "
                               f"{shards.root} has none")
        if c.k != classes:
            raise DcscaleError(f"cluster.labels = 'ground_truth': cluster.k = {c.k} must be the {classes} classes "
                               f"of {shards.root} (the head predicts them); set cluster.k={classes}")
    if c.pca_dim is not None and c.pca_dim > model.feature_dim:
        raise DcscaleError(f"cluster.pca_dim = {c.pca_dim} is more than the {model.feature_dim} "
                           f"feature dimensions of {cfg.model.arch}; use at most {model.feature_dim}, or null")
    if c.pca_dim is not None:
        n_sample = n if c.pca_sample is None else min(c.pca_sample, n)
        if n_sample < c.pca_dim:
            what = f"cluster.pca_sample = {c.pca_sample}" if c.pca_sample is not None and c.pca_sample < n else \
                f"the {n} images of {shards.root}"
            raise DcscaleError(f"{what} are too few rows to fit a PCA to cluster.pca_dim = {c.pca_dim} dims: the "
                               f"sample needs at least {c.pca_dim} rows; raise cluster.pca_sample or lower pca_dim")
        # said only for a value the user chose: the default (100,000) exceeds every small set
        if c.pca_sample is not None and c.pca_sample > n and c.pca_sample != ClusterConfig().pca_sample \
                and dist.is_main():
            log.info("cluster.pca_sample = %d is more than the %d images of %s: the PCA is fitted on all of them",
                     c.pca_sample, n, shards.root)
    dim = model.feature_dim if c.pca_dim is None else c.pca_dim
    have = physical_memory_bytes()
    if c.kmeans == "rank0":  # rank 0 holds the training rows
        n_train = n if c.max_train_rows is None else min(n, c.max_train_rows)
        if c.max_points_per_centroid is not None:
            n_train = min(n_train, c.k * c.max_points_per_centroid)
        need = kmeans_memory_bytes(n_train, c.k, dim)
        if need > have:
            raise DcscaleError(f"cluster.k = {c.k} needs about {need / 2**30:,.1f} GiB on rank 0 for k-means "
                               f"({max(n_train, c.k):,} training rows and {c.k:,} centroids of {dim} dims), more "
                               f"than this machine's {have / 2**30:,.1f} GiB; lower cluster.k")
    elif (need := distributed_kmeans_memory_bytes(c.k, dim)) > have:
        raise DcscaleError(f"cluster.k = {c.k} needs about {need / 2**30:,.1f} GiB on every rank for k-means "
                           f"({c.k:,} centroids of {dim} dims and their sums), more than this machine's "
                           f"{have / 2**30:,.1f} GiB; lower cluster.k")
    if c.k > n:
        raise DcscaleError(f"cluster.k = {c.k} is more than the {n} images of {shards.root}: at least "
                           f"{c.k - n} cluster(s) would stay empty; use at most {n}")
    if c.max_train_rows is not None and c.max_train_rows < c.k:
        raise DcscaleError(f"cluster.max_train_rows = {c.max_train_rows} is less than cluster.k = {c.k}: "
                           f"every centroid needs training rows; raise it (or null for every row)")


def check_decodable(cfg: Config, shards: ShardSet, n_decoded: int) -> None:
    """After extraction (n_decoded summed over ranks, so every rank decides alike): enough images to
    cluster."""
    n = len(shards)
    if n_decoded < 2:
        raise DcscaleError(f"{shards.root}: only {n_decoded} of its {n} images could be decoded; clustering "
                           f"needs at least 2")
    if cfg.cluster.k > n_decoded:
        raise DcscaleError(f"cluster.k = {cfg.cluster.k} is more than the {n_decoded} decodable images of "
                           f"{shards.root} ({n - n_decoded} could not be decoded); use at most {n_decoded}")


@dataclass
class Clustering:
    """What `cluster_rows_to_labels` gives every rank."""
    labels: np.ndarray  # int32 [N]: every row's cluster, -1 for the indices no rank held (undecodable)
    objective: float  # mean squared distance of every row to its centroid (comparable across cycles)
    centroids: np.ndarray  # float32 [K, d]
    local_labels: np.ndarray  # this rank's rows' clusters, in the order of its `indices`
    sq_dist: np.ndarray  # this rank's rows' squared distances to their centroids
    t_kmeans: float  # seconds of k-means (the rest of the call is the assignment)
    kmeans_iterations: int  # Lloyd iterations run (fewer than cluster.niter when the early stop fired)


def cluster_rows_to_labels(indices: np.ndarray, rows: np.ndarray, n_total: int, cluster: ClusterConfig, seed: int,
                           *, reduced: bool = False) -> Clustering:
    """Reduce -> cluster -> assign over rows already extracted: every rank passes its own rows [n_r, D]
    and their global indices (sorted, within its `rank_range` of `n_total`; a collective). Without
    `reduced`, the rows are first reduced as a cycle does (PCA to `cluster.pca_dim` fitted across
    ranks on the sample `cluster.pca_sample` drawn with `seed`, whitening, L2); with it they are taken
    as they are (a training cycle projects them while extracting). One process, an in-memory array:
    `cluster_rows_to_labels(np.arange(len(x)), x, len(x), ClusterConfig(k=100), seed=0).labels`.
    """
    if not reduced:
        rows, _ = phases.reduce_features(indices, rows, n_total, cluster.pca_dim, cluster.pca_sample, seed)
    t0 = time.perf_counter()
    centroids, _, iterations = phases.cluster_rows(indices, rows, n_total, cluster.k, cluster.niter,
                                       cluster.max_points_per_centroid, cluster.max_train_rows, seed, cluster.kmeans)
    release_freed_memory()
    t_kmeans = time.perf_counter() - t0
    local_labels, sq_dist = phases.assign_rows(rows, centroids)
    labels, objective = phases.share_labels(indices, local_labels, sq_dist, n_total)
    return Clustering(labels, objective, centroids, local_labels, sq_dist, t_kmeans, iterations)


def cluster_cycle(model, shards, eval_tf, env, cfg: Config, cycle: int,
                  montage: bool = False) -> tuple[np.ndarray, int, dict, tuple | None]:
    """Extract -> reduce -> cluster -> assign. Returns (labels [N], skipped image count, metrics, and
    with `montage` (the montage's (cluster, role) rows, on rank 0 their images nearest to the centroids))."""
    seed = cycle_seed(cfg.seed, cycle)
    n_total = len(shards)
    model.eval()
    compute = ForwardSettings.from_config(cfg, env.device)
    extraction = (model.features, shards, eval_tf, env, cfg.data.extract_batch_size, cfg.data.workers)
    t0 = time.perf_counter()
    pca = projected = None
    if cfg.cluster.pca_dim is not None:  # the PCA first, from the sample's rows alone: then every row is reduced
        pca, whole_sample = fit_cycle_pca(extraction, cfg, model.feature_dim, compute, seed, cycle)
        if whole_sample is not None:  # the sample is every image: project its rows, no second pass
            projected = phases.project_sample(*whole_sample, pca)
        del whole_sample
        release_freed_memory()  # (the sample's rows)
    one_pass = projected is not None
    t1 = time.perf_counter()
    if projected is None:
        projected = phases.extract_projected(*extraction, pca, cfg.cluster.feature_dtype, model.feature_dim, compute)
    indices, z, skipped, nonfinite = projected
    del projected
    n_skipped, n_nonfinite = (int(v) for v in dist.all_reduce_sum([len(skipped), nonfinite]))
    t2 = time.perf_counter()  # after a collective: extraction ends when the slowest rank's does
    check_decodable(cfg, shards, n_total - n_skipped)
    if n_nonfinite:
        raise DcscaleError(f"cycle {cycle}: {n_nonfinite} image(s) gave NaN or infinite features at extraction "
                           f"(train.precision = {cfg.train.precision} may overflow, or the weights diverged); "
                           f"stopping before clustering them")
    result = cluster_rows_to_labels(indices, z, n_total, cfg.cluster, seed, reduced=True)
    labels, objective, t_kmeans, iterations = result.labels, result.objective, result.t_kmeans, result.kmeans_iterations
    del z  # the last use of the reduced rows: the montage needs only the distances
    rows = None
    if montage:  # its images, from the distances just computed: each rank's nearest few per shown cluster
        shown = montage_clusters(cluster_stats(labels, cfg.cluster.k)["sizes"], cfg.seed)
        rows = shown, phases.nearest_rows(indices, result.local_labels, result.sq_dist, [c for c, _ in shown],
                                          MONTAGE_PER_ROW)
    del indices, result
    release_freed_memory()  # training starts from the labels alone
    t4 = time.perf_counter()
    if n_skipped and env.is_main:
        log.warning("cycle %d: %d undecodable image(s) skipped (label -1, never drawn)", cycle, n_skipped)
    # Phase times are rank 0's, in the order they ran: t_pca is the sample's pass and the PCA fit,
    # t_extract the pass over every row with its projection (only the projection when the sample was
    # every image: then images/s counts the one pass, from t0); images/s counts the whole shard set.
    return labels, n_skipped, {
        "objective": objective,
        "t_pca": t1 - t0, "t_extract": t2 - t1, "t_kmeans": t_kmeans, "t_assign": t4 - t2 - t_kmeans,
        "kmeans_iterations": iterations,
        "ips_extract": n_total / max(t2 - (t0 if one_pass else t1), 1e-9),
    }, rows


def fit_cycle_pca(extraction: tuple, cfg: Config, feature_dim: int, compute: ForwardSettings, seed: int,
                  cycle: int) -> tuple[PCA, tuple | None]:
    """The cycle's PCA from its sample's rows, fitted across ranks (a collective): a sample that
    cannot be fitted stops every rank with the same line. Returns (the PCA, and when the sample is
    every image, this rank's (indices, rows, skipped) of it, else None)."""
    c = cfg.cluster
    indices, sample, skipped, n_rows, n_bad, n_chosen = phases.extract_pca_sample(
        *extraction, c.feature_dtype, feature_dim, compute, c.pca_sample, seed)
    shards = extraction[1]
    whole = n_chosen == len(shards)
    if whole:  # the sample is every image: the checks of the extraction pass, as early
        check_decodable(cfg, shards, n_rows)
    if n_bad:
        raise DcscaleError(f"cycle {cycle}: {n_bad} of the {n_rows} images of the PCA sample gave NaN or infinite "
                           f"features (train.precision = {cfg.train.precision} may overflow, or the weights "
                           f"diverged); stopping before the PCA")
    if n_rows < max(c.pca_dim, 2):
        raise DcscaleError(f"cycle {cycle}: only {n_rows} of the {n_chosen} images of the PCA sample could be "
                           f"decoded; a PCA to cluster.pca_dim = {c.pca_dim} dims needs at least {max(c.pca_dim, 2)}")
    return fit_pca_across_ranks(sample, c.pca_dim), ((indices, sample, skipped) if whole else None)
