"""Uniform-cluster distributed sampler: uniformity, equal per-rank counts, determinism, resume."""

import math

import numpy as np
import pytest

from dcscale.data.sampler import UniformClusterSampler, uniform_cluster_draw


def skewed_labels(seed=0):
    """10 clusters whose sizes differ 100 to 1 (2000 ... 20), two empty ids and some unlabelled."""
    sizes = [2000, 1200, 800, 500, 300, 150, 100, 60, 40, 20]
    ids = [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]  # 3 and 8 empty
    labels = np.concatenate([np.full(s, c) for s, c in zip(sizes, ids)] + [np.full(37, -1)])
    return np.random.default_rng(seed).permutation(labels), ids


def draws_by_rank(labels, world, seed=0, epoch=0):
    return [list(UniformClusterSampler(labels, world_size=world, rank=r, seed=seed, epoch=epoch))
            for r in range(world)]


def test_uniform_over_nonempty_clusters_despite_100_to_1_sizes():
    labels, ids = skewed_labels()
    ranks = draws_by_rank(labels, world=4)
    drawn = np.concatenate(ranks)
    counts = np.bincount(labels[drawn], minlength=12)
    share = counts[ids] / drawn.size
    assert np.all(np.abs(share - 1 / len(ids)) < 0.02 / len(ids))  # within 2% of 1/K'
    assert counts[3] == counts[8] == 0
    assert np.all(labels[drawn] >= 0)  # unlabelled never drawn
    n_valid = int((labels >= 0).sum())
    assert abs(drawn.size - n_valid) <= len(ids) + 4  # about N' draws in all


def test_small_clusters_with_replacement_large_without():
    labels, _ = skewed_labels()
    draw = uniform_cluster_draw(labels, seed=1, epoch=0)
    quota = math.ceil((labels >= 0).sum() / 10)
    big = draw[labels[draw] == 0]  # 2000 members >= quota: no repeats
    assert big.size == quota and np.unique(big).size == quota
    small = draw[labels[draw] == 11]  # 20 members < quota: all drawn from, with repeats
    assert small.size == quota and set(small) <= set(np.flatnonzero(labels == 11))


@pytest.mark.parametrize("world", [1, 3, 7])
def test_equal_counts_per_rank_and_union_is_global_draw(world):
    labels, _ = skewed_labels()
    ranks = draws_by_rank(labels, world, seed=5)
    per_rank = UniformClusterSampler(labels, world_size=world, rank=0, seed=5).per_rank
    assert all(len(r) == per_rank for r in ranks)
    assert all(len(UniformClusterSampler(labels, world_size=world, rank=r, seed=5)) == per_rank
               for r in range(world))
    draw = uniform_cluster_draw(labels, 5, 0)
    interleaved = np.array(ranks).T.ravel()  # strided shares: global position i*world + r
    assert np.array_equal(interleaved[:draw.size], draw)
    assert interleaved.size - draw.size < world  # padding only to a multiple of the world size


def test_deterministic_and_epoch_dependent():
    labels, _ = skewed_labels()
    a = draws_by_rank(labels, 2, seed=3, epoch=1)
    b = draws_by_rank(labels, 2, seed=3, epoch=1)
    assert a == b
    assert draws_by_rank(labels, 2, seed=3, epoch=2) != a
    assert draws_by_rank(labels, 2, seed=4, epoch=1) != a
    s = UniformClusterSampler(labels, world_size=2, rank=1, seed=3)
    s.set_epoch(1)
    assert list(s) == a[1]


def test_offset_resume():
    labels, _ = skewed_labels()
    full = list(UniformClusterSampler(labels, world_size=3, rank=2, seed=9, epoch=4))
    resumed = UniformClusterSampler(labels, world_size=3, rank=2, seed=9, epoch=4, start=123)
    assert len(resumed) == len(full) - 123
    assert list(resumed) == full[123:]
    resumed.set_start(0)
    assert list(resumed) == full
    resumed.set_start(len(full))
    assert list(resumed) == [] and len(resumed) == 0
    with pytest.raises(ValueError):
        resumed.set_start(len(full) + 1)


def test_degenerate_inputs():
    none = UniformClusterSampler(np.full(10, -1), world_size=2, rank=1, seed=0)
    assert len(none) == 0 and list(none) == []
    one = UniformClusterSampler(np.array([4]), world_size=3, rank=2, seed=0)
    assert list(one) == [0]  # padded: every rank still gets one item
    with pytest.raises(ValueError):
        UniformClusterSampler(np.zeros(5), world_size=2, rank=2, seed=0)
