"""Uniform-cluster distributed sampler: exact quotas, equal per-rank counts, determinism, resume, and
a rank's share computed without the global draw (bounded memory)."""

import tracemalloc

import numpy as np
import pytest

import dcscale.data.sampler as sampler_module
from dcscale.data.sampler import UniformClusterSampler, keyed_permutation

SIZES = [2000, 1200, 800, 500, 300, 150, 100, 60, 40, 20]  # 100 to 1


def skewed_labels(seed=0, id_scale=1):
    """10 clusters whose sizes differ 100 to 1, two empty ids (3 and 8) and 37 unlabelled (-1).
    id_scale=7000 spreads the ids past 65535 (the wide-label path of the label scan)."""
    ids = [c * id_scale for c in (0, 1, 2, 4, 5, 6, 7, 9, 10, 11)]
    labels = np.concatenate([np.full(s, c) for s, c in zip(SIZES, ids)] + [np.full(37, -1)])
    return np.random.default_rng(seed).permutation(labels), ids


def shares(labels, world, seed=0, epoch=0):
    return [UniformClusterSampler(labels, world_size=world, rank=r, seed=seed, epoch=epoch).rank_indices()
            for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("id_scale", [1, 7000])
def test_every_nonempty_cluster_gets_exactly_its_quota_over_all_ranks(world, id_scale):
    labels, ids = skewed_labels(id_scale=id_scale)
    sampler = UniformClusterSampler(labels, world_size=world, rank=0, seed=2)
    quota = -(-int((labels >= 0).sum()) // len(ids))
    assert sampler.quota == quota and sampler.total == quota * len(ids)
    union = np.stack(shares(labels, world, seed=2)).T.ravel()[:sampler.total]  # the global draw, unpadded
    assert np.all(labels[union] >= 0)  # unlabelled never drawn
    counts = {c: int(n) for c, n in zip(*np.unique(labels[union], return_counts=True))}
    assert counts == {c: quota for c in ids}  # empty ids 3 and 8 (scaled) get nothing
    for c, size in zip(ids, SIZES):
        drawn = union[labels[union] == c]
        if size >= quota:  # without replacement
            assert np.unique(drawn).size == quota
        else:  # with replacement, from the cluster's members only
            assert np.unique(drawn).size < quota and set(drawn) <= set(np.flatnonzero(labels == c))


def test_big_clusters_draw_all_their_members_over_epochs():
    labels, _ = skewed_labels()
    biggest = np.flatnonzero(labels == 0)  # 2000 members, quota 517 a epoch
    drawn = np.concatenate([s.rank_indices() for s in
                            (UniformClusterSampler(labels, world_size=1, rank=0, seed=1, epoch=e) for e in range(12))])
    per_member = np.bincount(drawn, minlength=labels.size)[biggest]
    assert (per_member > 0).mean() > 0.9  # not a fixed subset: 12 x 517 draws reach nearly every member
    assert per_member.max() <= 12  # at most once a epoch


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_equal_counts_per_rank_and_the_union_is_the_global_draw(world):
    labels, _ = skewed_labels()
    ranks = shares(labels, world, seed=5)
    per_rank = UniformClusterSampler(labels, world_size=world, rank=0, seed=5).per_rank
    assert all(r.size == per_rank for r in ranks)
    assert all(len(UniformClusterSampler(labels, world_size=world, rank=r, seed=5)) == per_rank
               for r in range(world))
    # the draw does not depend on the rank or the world size: rank r holds positions r, r + W, ... of
    # the one global order (the single-rank share), padded by repeating its first items
    draw = shares(labels, 1, seed=5)[0]
    interleaved = np.stack(ranks).T.ravel()
    assert np.array_equal(interleaved[:draw.size], draw)
    assert interleaved.size - draw.size < world
    assert np.array_equal(interleaved[draw.size:], draw[:interleaved.size - draw.size])


def test_deterministic_and_epoch_dependent():
    labels, _ = skewed_labels()
    a = [list(r) for r in shares(labels, 2, seed=3, epoch=1)]
    assert a == [list(r) for r in shares(labels, 2, seed=3, epoch=1)]
    assert a != [list(r) for r in shares(labels, 2, seed=3, epoch=2)]
    assert a != [list(r) for r in shares(labels, 2, seed=4, epoch=1)]
    s = UniformClusterSampler(labels, world_size=2, rank=1, seed=3)
    s.set_epoch(1)
    assert list(s) == a[1]


def test_chunked_scan_and_draw_give_the_same_share(monkeypatch):
    """The share is the same however the labels and draws are cut into chunks (the label scan
    carries each cluster's member count across chunk boundaries)."""
    labels, _ = skewed_labels(seed=4)
    whole = shares(labels, 3, seed=7)
    monkeypatch.setattr(sampler_module, "_CHUNK", 97)
    assert all(np.array_equal(a, b) for a, b in zip(shares(labels, 3, seed=7), whole))


def test_offset_resume():
    labels, _ = skewed_labels()
    full = list(UniformClusterSampler(labels, world_size=3, rank=2, seed=9, epoch=4))
    for start in (0, 1, 123, len(full) - 1, len(full)):
        resumed = UniformClusterSampler(labels, world_size=3, rank=2, seed=9, epoch=4, start=start)
        assert len(resumed) == len(full) - start
        assert list(resumed) == full[start:]
    resumed.set_start(5)
    assert list(resumed) == full[5:]
    with pytest.raises(ValueError):
        resumed.set_start(len(full) + 1)


@pytest.mark.parametrize("size", [1, 2, 3, 64, 1000, 10007])
def test_keyed_permutation_is_a_bijection(size):
    x = np.arange(size, dtype=np.uint64)
    assert np.array_equal(np.sort(keyed_permutation(x, size, 11)), x)


def test_keyed_permutation_shuffles():
    """Statistics that an identity, a shift or a block-preserving map would fail."""
    n = 10007
    x = np.arange(n, dtype=np.uint64)
    y = keyed_permutation(x, n, 5).astype(np.int64)
    x = x.astype(np.int64)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.05
    assert np.count_nonzero(y == x) < 10  # about one fixed point expected
    # 10 x 10 grid of (x decile, y decile): each cell expects n / 100; chi-square with 81 dof
    cells = np.bincount((x * 10 // n) * 10 + (y * 10 // n), minlength=100)
    expected = n / 100
    assert ((cells - expected) ** 2 / expected).sum() < 140  # p < 1e-4 under a uniform permutation
    assert np.count_nonzero(keyed_permutation(x.astype(np.uint64), n, 6) == y) < 10  # another key, another permutation
    # per-element sizes and keys (the within-cluster permutations): each row is its own bijection
    sizes = np.repeat(np.array([5, 300], dtype=np.uint64), [5, 300])
    keys = np.repeat(np.array([1, 2], dtype=np.uint64), [5, 300])
    within = np.concatenate([np.arange(5), np.arange(300)]).astype(np.uint64)
    y = keyed_permutation(within, sizes, keys)
    assert sorted(y[:5]) == list(range(5)) and sorted(y[5:]) == list(range(300))


def test_global_order_mixes_clusters():
    """Labels grouped by cluster must not come out grouped: consecutive draws change cluster."""
    labels = np.repeat(np.arange(100), 50)
    draw = UniformClusterSampler(labels, world_size=1, rank=0, seed=0).rank_indices()
    same_cluster_next = np.mean(labels[draw][1:] == labels[draw][:-1])
    assert same_cluster_next < 0.05  # 0.01 expected; a cluster-major order gives 0.98


def test_share_memory_is_bounded_by_the_rank_share():
    """1M labels, K = 10,000, 2 ranks: the old global draw peaked at ~58 MB per rank; the share
    itself is 2 MB (int32), and the label scan's temporaries a few MB."""
    labels = np.random.default_rng(0).integers(0, 10_000, 1_000_000).astype(np.int32)
    tracemalloc.start()
    try:
        share = UniformClusterSampler(labels, world_size=2, rank=1, seed=0).rank_indices()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert share.size == 500_000 and share.dtype == np.int32
    assert peak < 20 * 2**20, f"{peak / 2**20:.1f} MB"


def test_iterating_the_share_holds_one_chunk_of_python_ints():
    """The DataLoader iterates the sampler: the share as one Python list would take ~36 bytes per draw
    (18 MB here, 9x the int32 share); a chunk at a time stays within a few MB."""
    labels = np.random.default_rng(0).integers(0, 10_000, 1_000_000).astype(np.int32)
    sampler = UniformClusterSampler(labels, world_size=2, rank=1, seed=0)
    share = sampler.rank_indices()
    tracemalloc.start()
    try:
        drawn = 0
        for position, index in enumerate(sampler):
            drawn += 1
            if position == 400_000:
                assert index == share[position]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert drawn == share.size
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MB"


def test_degenerate_inputs():
    none = UniformClusterSampler(np.full(10, -1), world_size=2, rank=1, seed=0)
    assert len(none) == 0 and list(none) == []
    one = UniformClusterSampler(np.array([4]), world_size=3, rank=2, seed=0)
    assert list(one) == [0]  # padded: every rank still gets one item
    with pytest.raises(ValueError):
        UniformClusterSampler(np.zeros(5), world_size=2, rank=2, seed=0)
