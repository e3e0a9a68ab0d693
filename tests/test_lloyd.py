"""Distributed k-means (cluster.kmeans: distributed): quality against faiss's own k-means, random draws,
empty-cluster splitting, early stop, thread-count and world-size reproducibility over real gloo groups."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.datasets import load_digits

from dcscale import dist
from dcscale.cluster.kmeans import assign, faiss_threads, train_kmeans
from dcscale.cluster.lloyd import SPLIT_EPS, distributed_kmeans, split_empty_clusters


def digits_rows() -> np.ndarray:
    x = load_digits().data.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def single_process():
    dist.init_distributed("gloo")  # no environment: one process, no process group


@pytest.mark.parametrize("k", [10, 100])
def test_same_quality_as_faiss_kmeans(k):
    x = digits_rows()
    ours = [assign(x, distributed_kmeans(x, k, 20, seed).centroids)[1].mean() for seed in range(3)]
    theirs = [assign(x, train_kmeans(x, k, 20, seed).centroids)[1].mean() for seed in range(3)]
    # Other random draws, the same algorithm: the mean squared distances agree within a few percent.
    assert np.mean(ours) == pytest.approx(np.mean(theirs), rel=0.03)
    labels, _ = assign(x, distributed_kmeans(x, k, 20, 0).centroids)
    assert len(np.unique(labels)) == k  # no cluster left empty


def test_seeded_and_independent_of_the_thread_count():
    x = digits_rows()
    with faiss_threads(1):
        one = distributed_kmeans(x, 30, 10, seed=5)
    with faiss_threads(2):
        two = distributed_kmeans(x, 30, 10, seed=5)
    np.testing.assert_array_equal(one.centroids, two.centroids)
    assert one.iteration_objectives == two.iteration_objectives
    other = distributed_kmeans(x, 30, 10, seed=6)
    assert not np.array_equal(one.centroids, other.centroids)


def test_objective_falls_and_the_run_stops_when_it_no_longer_changes():
    x = digits_rows()
    result = distributed_kmeans(x, 10, 200, seed=0)
    objectives = result.iteration_objectives
    assert len(objectives) < 200  # faiss's early stop: converged long before 200 iterations
    assert objectives[-1] == objectives[-2]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objectives, objectives[1:]))  # Lloyd never goes up
    assert result.objective == objectives[-1] and result.n_train == len(x)


def test_fewer_rows_than_clusters_leaves_the_surplus_empty_without_a_crash():
    x = digits_rows()[:50]
    result = distributed_kmeans(x, 80, 5, seed=0)
    labels, dists = assign(x, result.centroids)
    assert result.centroids.shape == (80, 64)
    assert len(np.unique(labels)) == 50 and np.allclose(dists, 0, atol=1e-6)  # every row its own centroid


def test_an_empty_cluster_is_split_from_a_cluster_with_rows_to_spare():
    push = np.array([SPLIT_EPS, -SPLIT_EPS], np.float32)  # even dimensions one way, odd ones the other
    centroids = np.array([[9, 9], [1, 2], [3, 4]], np.float32)
    sizes = np.array([0, 10, 1])
    # Only cluster 1 has rows to spare (a one-row cluster has none): it is the donor.
    assert split_empty_clusters(centroids, sizes, np.random.default_rng(0)) == 1
    assert sizes.tolist() == [5, 5, 1]
    np.testing.assert_allclose(centroids[0], np.array([1, 2]) * (1 + push), rtol=1e-7)
    np.testing.assert_allclose(centroids[1], np.array([1, 2]) * (1 - push), rtol=1e-7)
    np.testing.assert_array_equal(centroids[2], [3, 4])
    # Many empty clusters: every one filled, the rows' count kept, no two centroids alike.
    centroids = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    sizes = np.array([0] * 15 + [40, 30, 1, 1, 1])
    assert split_empty_clusters(centroids, sizes, np.random.default_rng(0)) == 15
    assert (sizes > 0).all() and sizes.sum() == 73
    assert len(np.unique(centroids, axis=0)) == 20
    # Nobody has two rows: nothing can be split, and nothing breaks.
    assert split_empty_clusters(np.zeros((3, 2), np.float32), np.array([0, 1, 1]), np.random.default_rng(0)) == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one training row"):
        distributed_kmeans(np.zeros((0, 4), np.float32), 3)
    with pytest.raises(ValueError, match="niter"):
        distributed_kmeans(np.ones((5, 4), np.float32), 3, niter=0)


# ---- two gloo processes ---------------------------------------------------------------------------

SPLITS = {"uneven": 300, "rank 1 empty": 1797}  # rank 0's rows of the 1,797; rank 1 has the rest


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    dist.init_distributed("gloo", timeout_min=2, wait_timeout_min=2)
    try:
        x = digits_rows()
        out = {}
        for name, cut in SPLITS.items():
            mine = x[:cut] if rank == 0 else x[cut:]
            result = distributed_kmeans(mine, 40, 15, seed=2)
            out[name] = result.centroids
            out[name + " objectives"] = np.array(result.iteration_objectives)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.shutdown()


def test_two_ranks_give_the_single_process_centroids(tmp_path):
    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.start_processes(_worker, args=(2, store, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    x = digits_rows()
    single = distributed_kmeans(x, 40, 15, seed=2)
    for name in SPLITS:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # the same centroids on every rank
        # The initial rows are drawn by global position, the sums are float64: the same clustering.
        np.testing.assert_allclose(ranks[0][name], single.centroids, atol=1e-6)
        np.testing.assert_array_equal(assign(x, ranks[0][name])[0], assign(x, single.centroids)[0])
        np.testing.assert_allclose(ranks[0][name + " objectives"], single.iteration_objectives, rtol=1e-9)
