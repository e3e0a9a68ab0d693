"""Clustering pipeline: PCA whitening, L2 rows, faiss k-means, subsampling, empty clusters, NMI."""

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcscale.cluster import (apply_pca, assign, cluster_features, cluster_stats, cycle_seed, fit_pca,
                             initial_alignment, nmi, sample_row_indices, train_kmeans, training_row_indices)


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


def test_kmeans_same_result_for_any_thread_count():
    import faiss
    x, _ = blobs(2000, 16, 30, seed=2)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = train_kmeans(x, 30, niter=8, seed=4)
        faiss.omp_set_num_threads(2)
        two = train_kmeans(x, 30, niter=8, seed=4)
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(one.centroids, two.centroids)


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
    res = cluster_features(x, 10, niter=10, seed=3, pca_dim=None, max_points_per_centroid=50)
    assert res.n_train == 500
    assert res.labels.shape == (5000,) and res.labels.min() >= 0 and res.labels.max() < 10
    assert res.stats["sizes"].sum() == 5000


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
    res = cluster_features(x, k, niter=5, seed=0, pca_dim=4)
    assert res.labels.shape == (50,)
    assert res.stats["nonempty"] + res.stats["empty"] == k
    assert res.stats["nonempty"] <= 50
    if k > 50:
        assert res.stats["empty"] >= k - 50


def test_cluster_features_pipeline_with_pca_sample():
    x, truth = blobs(3000, 40, 8, spread=0.2)
    res = cluster_features(x, 8, niter=20, seed=1, pca_dim=16, pca_sample=1000)
    assert res.centroids.shape == (8, 16)
    assert nmi(truth, res.labels) > 0.9
    assert 0 <= res.assignment_objective < 2
    assert np.isfinite(res.objective)


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


def test_cluster_stats():
    stats = cluster_stats(np.array([0, 0, 0, 2, 2, 5, -1]), 6)
    assert stats["empty"] == 3 and stats["nonempty"] == 3
    assert (stats["min"], stats["median"], stats["max"]) == (1, 2.0, 3)
    assert stats["sizes"].tolist() == [3, 0, 2, 0, 0, 1]


def test_pca_sample_indices():
    assert sample_row_indices(100, None, 0) is None and sample_row_indices(100, 100, 0) is None
    idx = sample_row_indices(1000, 100, 0)
    assert idx.size == 100 and np.unique(idx).size == 100 and np.all(np.diff(idx) > 0)
