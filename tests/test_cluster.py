"""Clustering pipeline: PCA whitening, L2 rows, faiss k-means, subsampling, empty clusters, NMI (both
normalisations, and in a training run's metrics)."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import metrics, tiny_run_overrides
from sklearn.metrics import normalized_mutual_info_score

from dcscale.cluster import (apply_pca, assign, cluster_stats, cycle_seed, fit_pca,
                             initial_alignment, l2_normalize, nmi, sample_row_indices, train_kmeans,
                             training_row_indices)
from dcscale.cluster.kmeans import faiss_threads, kmeans_memory_bytes, search_block
from dcscale.host import usable_cores
from dcscale.cluster.metrics import nmi_scores
from dcscale.config import ClusterConfig
from dcscale.cycle.clustering import cluster_rows_to_labels


def cluster_array(x, k, seed, **settings):
    """The cycle's one reduce -> cluster -> assign on an in-memory array, in one process."""
    return cluster_rows_to_labels(np.arange(len(x)), x, len(x), ClusterConfig(k=k, **settings), seed)


def blobs(n, d, centers, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d)) * 3
    truth = rng.integers(0, centers, n)
    return (means[truth] + spread * rng.standard_normal((n, d))).astype(np.float32), truth


def correlated(n, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * rng.uniform(0.05, 3, d)
    return (rng.standard_normal((n, d)) @ mix + 5).astype(np.float32)


def test_pca_whitening_unit_variance_on_sample():
    x = correlated(4000, 48)
    pca = fit_pca(x, 16)
    assert pca.matrix.shape == (48, 16) and pca.mean.shape == (48,)
    proj = (x - pca.mean) @ pca.matrix  # before the L2 step
    cov = np.cov(proj, rowvar=False, bias=True)
    assert np.allclose(np.diag(cov), 1.0, atol=1e-3)
    assert np.allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-3)  # decorrelated too


def test_pca_keeps_top_components():
    x = correlated(3000, 20, seed=1)
    pca = fit_pca(x, 5, eigen_power=0.0)  # no whitening: plain orthonormal projection
    var = np.var((x - pca.mean) @ pca.matrix, axis=0)
    evals = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1][:5]
    assert np.allclose(var, evals, rtol=1e-3)


def test_apply_pca_rows_are_unit_l2_and_pca_off():
    x = correlated(500, 32)
    z = apply_pca(x, fit_pca(x[:300], 8))  # fitted on a sample, applied to all
    assert z.shape == (500, 8) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert fit_pca(x, None) is None
    off = apply_pca(x, None)
    assert off.shape == (500, 32) and np.allclose(np.linalg.norm(off, axis=1), 1.0, atol=1e-5)
    assert np.allclose(off * np.linalg.norm(x, axis=1, keepdims=True), x, rtol=1e-4)
    assert not np.shares_memory(off, x)
    zero = apply_pca(np.zeros((3, 4), np.float32), None)
    assert np.all(np.isfinite(zero))


def _numpy_peak_bytes(fn):
    """fn's result and the peak bytes numpy allocated while it ran (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reduce_holds_only_the_result_besides_the_features(dtype):
    # float16 features exist to halve memory: the reduce step must not upcast them whole, nor build
    # full-size squares for the norms.
    x = correlated(200_000, 64, seed=3)
    pca = fit_pca(x[:5000], 16)
    feats = x.astype(dtype)
    z, peak = _numpy_peak_bytes(lambda: apply_pca(feats, pca))
    assert z.dtype == np.float32 and np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert peak < 1.25 * z.nbytes  # the result plus a chunk's worth
    np.testing.assert_array_equal(z, apply_pca(feats.astype(np.float32), pca))  # chunked = whole
    off, peak = _numpy_peak_bytes(lambda: apply_pca(feats, None))
    assert off.dtype == np.float32 and peak < 1.25 * off.nbytes
    rows = x.copy()
    same, peak = _numpy_peak_bytes(lambda: l2_normalize(rows))
    assert same is rows and peak < 0.25 * rows.nbytes  # in place


def test_pca_rank_deficient_sample_stays_finite():
    x = np.repeat(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32), 10, axis=0)
    z = apply_pca(x, fit_pca(x, 8))
    assert np.all(np.isfinite(z))
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca(x, 17)


def test_kmeans_reproducible_for_a_seed():
    x, _ = blobs(3000, 16, 20)
    a = train_kmeans(x, 20, niter=10, seed=7)
    b = train_kmeans(x, 20, niter=10, seed=7)
    c = train_kmeans(x, 20, niter=10, seed=8)
    assert np.array_equal(a.centroids, b.centroids) and a.objective == b.objective
    assert not np.array_equal(a.centroids, c.centroids)
    assert len(a.iteration_objectives) == 10 and a.objective == a.iteration_objectives[-1]
    assert a.iteration_objectives[-1] <= a.iteration_objectives[0]


def test_kmeans_and_assignment_same_result_for_any_thread_count():
    # Rank 0 runs k-means on every core it has: labels must not depend on the machine's core count.
    import faiss
    x, _ = blobs(20_000, 16, 30, seed=2)
    before = faiss.omp_get_max_threads()
    results = []
    for threads in (1, 2, 3):
        with faiss_threads(threads):
            assert faiss.omp_get_max_threads() == threads
            km = train_kmeans(x, 30, niter=8, seed=4)
            results.append((km.centroids, *assign(x, km.centroids)))
        assert faiss.omp_get_max_threads() == before  # restored
    for centroids, labels, dists in results[1:]:
        assert np.array_equal(centroids, results[0][0])
        assert np.array_equal(labels, results[0][1]) and np.array_equal(dists, results[0][2])
    assert usable_cores() >= 1


def test_smaller_search_blocks_change_no_distance():
    import faiss
    x, _ = blobs(20_000, 16, 30, seed=2)
    centroids = train_kmeans(x, 2000, niter=3, seed=4).centroids  # more centroids than one 1,024 block
    default = assign(x, centroids)
    before = faiss.cvar.distance_compute_blas_query_bs
    with search_block():
        assert faiss.cvar.distance_compute_blas_query_bs == 1024
        small = assign(x, centroids)
    assert faiss.cvar.distance_compute_blas_query_bs == before  # restored
    np.testing.assert_array_equal(small[0], default[0])
    np.testing.assert_array_equal(small[1], default[1])


def test_kmeans_recovers_blobs_and_objective_matches_assignment():
    x, truth = blobs(2000, 8, 5, spread=0.05)
    km = train_kmeans(x, 5, niter=20, seed=0)
    labels, dists = assign(x, km.centroids)
    assert labels.dtype == np.int64 and dists.dtype == np.float32
    assert nmi(truth, labels) > 0.95
    brute = ((x - km.centroids[labels]) ** 2).sum(1)
    assert np.allclose(dists, brute, rtol=1e-3, atol=1e-4)
    assert np.array_equal(labels, ((x[:, None] - km.centroids[None]) ** 2).sum(-1).argmin(1))


def test_cycle_seeds_are_fresh_and_reproducible():
    seeds = [cycle_seed(0, c) for c in range(50)]
    assert len(set(seeds)) == 50 and seeds == [cycle_seed(0, c) for c in range(50)]
    assert cycle_seed(1, 0) != cycle_seed(0, 0)
    assert all(0 <= s < 2**31 for s in seeds)


def test_training_rows_subsample_and_assignment_covers_every_point():
    assert training_row_indices(1000, 10, None, 0) is None
    assert training_row_indices(1000, 10, 100, 0) is None  # not more rows than k * mppc
    rows = training_row_indices(5000, 10, 50, seed=3)
    assert rows.size == 500 and np.all(np.diff(rows) > 0) and rows[-1] < 5000
    assert np.array_equal(rows, training_row_indices(5000, 10, 50, seed=3))
    x, _ = blobs(5000, 8, 10)
    res = cluster_array(x, 10, 3, niter=10, pca_dim=None, max_points_per_centroid=50)
    assert res.labels.shape == (5000,) and res.labels.min() >= 0 and res.labels.max() < 10
    assert cluster_stats(res.labels, 10)["sizes"].sum() == 5000
    # trained on the 500 rows alone: other centroids than those of every row
    every = cluster_array(x, 10, 3, niter=10, pca_dim=None)
    assert not np.array_equal(res.centroids, every.centroids)


def test_total_training_rows_cap():
    # The smaller of max_rows and k * max_points_per_centroid wins; fewer rows than the cap: all rows.
    rows = training_row_indices(5000, 10, None, seed=3, max_rows=700)
    assert rows.size == 700 and np.all(np.diff(rows) > 0) and rows[-1] < 5000
    assert np.array_equal(rows, training_row_indices(5000, 10, None, seed=3, max_rows=700))
    assert training_row_indices(5000, 10, 50, seed=3, max_rows=700).size == 500
    assert training_row_indices(5000, 10, 100, seed=3, max_rows=700).size == 700
    assert training_row_indices(5000, 10, None, seed=3, max_rows=5000) is None
    # A per-centroid cap alone draws the same rows as before the total cap existed.
    assert np.array_equal(training_row_indices(5000, 10, 50, 3, max_rows=None), training_row_indices(5000, 10, 50, 3))
    # The default leaves the paper's settings exact: ImageNet-1k at K=10,000, FMNIST at K=5.
    default = ClusterConfig().max_train_rows
    assert training_row_indices(1_281_167, 10_000, None, 0, default) is None
    assert training_row_indices(60_000, 5, None, 0, default) is None
    assert training_row_indices(100_000_000, 10_000, None, 0, default).size == default
    x, _ = blobs(5000, 8, 10)
    capped = cluster_array(x, 10, 3, niter=5, pca_dim=None, max_train_rows=700)
    assert capped.labels.min() >= 0 and len(capped.labels) == 5000  # the assignment still covers every row


def test_kmeans_memory_estimate():
    # the rows (float32), three copies of the centroids and faiss's 16 bytes of per-row buffers
    assert kmeans_memory_bytes(1000, 10, 8) == 4 * 1000 * 8 + 3 * 4 * 10 * 8 + 16 * 1000
    assert kmeans_memory_bytes(5, 10, 8) == kmeans_memory_bytes(10, 10, 8)  # rows repeated up to k


def test_many_duplicates_do_not_crash_and_empties_are_counted():
    base = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    x = np.repeat(base, 250, axis=0)  # 1000 rows, 4 distinct points
    km = train_kmeans(x, 40, niter=10, seed=0)
    labels, _ = assign(x, km.centroids)
    stats = cluster_stats(labels, 40)
    assert stats["nonempty"] == 4 and stats["empty"] == 36
    assert np.all(np.isfinite(km.centroids))


@pytest.mark.parametrize("k", [49, 50, 51, 120])
def test_k_near_or_above_n(k):
    x = np.random.default_rng(1).standard_normal((50, 5)).astype(np.float32)
    res = cluster_array(x, k, 0, niter=5, pca_dim=4)
    stats = cluster_stats(res.labels, k)
    assert res.labels.shape == (50,)
    assert stats["nonempty"] + stats["empty"] == k
    assert stats["nonempty"] <= 50
    if k > 50:
        assert stats["empty"] >= k - 50


@pytest.mark.parametrize("mode", ["distributed", "rank0"])
def test_clustering_an_array_with_pca_sample(mode):
    x, truth = blobs(3000, 40, 8, spread=0.2)
    res = cluster_array(x, 8, 1, niter=20, pca_dim=16, pca_sample=1000, kmeans=mode)
    assert res.centroids.shape == (8, 16)
    assert res.labels.dtype == np.int32 and nmi(truth, res.labels) > 0.9
    assert 0 <= res.objective < 2
    assert len(res.local_labels) == len(res.sq_dist) == 3000


def test_nmi_matches_sklearn_and_ignores_missing():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 500), rng.integers(0, 7, 500)
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b))
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)  # label permutation
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    masked_a = a.copy()
    masked_a[:100] = -1
    assert nmi(masked_a, b) == pytest.approx(normalized_mutual_info_score(a[100:], b[100:]))
    assert initial_alignment(masked_a, b) == nmi(masked_a, b)
    assert np.isnan(nmi([-1, -1], [0, 1]))


def test_nmi_arithmetic_and_geometric_equal_sklearns():
    # The two normalisations the papers used: arithmetic (sklearn >= 0.22, the Deep Dive) and
    # geometric (sklearn <= 0.20, the original DeepCluster), on labelings of different entropies.
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 10, 3000)
    clusters = np.where(rng.random(3000) < 0.7, truth * 5 + rng.integers(0, 5, 3000), rng.integers(0, 50, 3000))
    for average in ("arithmetic", "geometric"):
        expected = normalized_mutual_info_score(truth, clusters, average_method=average)
        assert nmi(truth, clusters, average) == pytest.approx(expected, abs=1e-12)
        assert initial_alignment(truth, clusters, average) == nmi(truth, clusters, average)
    scores = nmi_scores(truth, clusters)
    assert scores == {"arithmetic": nmi(truth, clusters), "geometric": nmi(truth, clusters, "geometric")}
    assert nmi(truth, clusters) == pytest.approx(normalized_mutual_info_score(truth, clusters))  # the default
    assert scores["geometric"] > scores["arithmetic"] + 0.01  # K=50 against 10 classes: entropies differ
    masked = truth.copy()
    masked[:500] = -1  # no label: ignored by both
    assert nmi_scores(masked, clusters)["geometric"] == pytest.approx(
        normalized_mutual_info_score(truth[500:], clusters[500:], average_method="geometric"), abs=1e-12)
    assert nmi_scores([3, 3, 3], [7, 7, 7]) == {"arithmetic": 1.0, "geometric": 1.0}  # sklearn's limit case
    assert nmi_scores([0, 0, 1], [4, 4, 4]) == {"arithmetic": 0.0, "geometric": 0.0}
    with pytest.raises(ValueError, match="expected one of arithmetic, geometric"):
        nmi(truth, clusters, "max")


def test_training_metrics_carry_both_nmis(digits_train_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dcscale.cli import main
    from dcscale.data.shardset import ShardSet

    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(digits_train_shards, run_dir, **{"cluster.k": 30})
    assert main(["train", "--config", str(Path(__file__).parent / "train_test.yaml"), *overrides]) == 0
    rows = metrics(run_dir)
    assert rows[0]["nmi_prev"] is None and rows[0]["nmi_prev_geometric"] is None
    assert rows[1]["nmi_prev_geometric"] >= rows[1]["nmi_prev"] > 0
    truth, labels = ShardSet(digits_train_shards).labels(), np.load(run_dir / "labels.npy")
    last = rows[-1]
    assert last["nmi_gt"] == pytest.approx(normalized_mutual_info_score(truth, labels), abs=1e-12)
    assert last["nmi_gt_geometric"] == pytest.approx(
        normalized_mutual_info_score(truth, labels, average_method="geometric"), abs=1e-12)
    assert last["nmi_gt_geometric"] > last["nmi_gt"]  # 30 clusters against 10 classes
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for key in ("nmi_gt", "nmi_gt_geometric", "nmi_prev", "nmi_prev_geometric"):
        values = [e.value for e in events.Scalars(f"cluster/{key}")]
        assert values == pytest.approx([r[key] for r in rows if r[key] is not None], rel=1e-6)


def test_cluster_stats():
    stats = cluster_stats(np.array([0, 0, 0, 2, 2, 5, -1]), 6)
    assert stats["empty"] == 3 and stats["nonempty"] == 3
    assert (stats["min"], stats["median"], stats["max"]) == (1, 2.0, 3)
    assert stats["sizes"].tolist() == [3, 0, 2, 0, 0, 1]


def test_pca_sample_indices():
    assert sample_row_indices(100, None, 0) is None and sample_row_indices(100, 100, 0) is None
    idx = sample_row_indices(1000, 100, 0)
    assert idx.size == 100 and np.unique(idx).size == 100 and np.all(np.diff(idx) > 0)
