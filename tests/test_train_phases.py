"""The cycle's phases across real gloo process groups (FileStore, 2 processes on CPU)."""

from __future__ import annotations

import os
import tempfile
import tracemalloc

import faiss
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import peak_rss_growth

from dcscale import dist
from dcscale.host import usable_cores
from dcscale.config import Config
from dcscale.errors import DcscaleError


def _lenet():
    """A random-init LeNet-5 for 32x32 grey images, the same at every call."""
    from dcscale.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, image_size=32, num_classes=10).eval()


def _cycle_outputs(shard_dir: str) -> dict:
    """Run extract -> reduce -> cluster -> assign for one random-init LeNet; return the arrays."""
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.config import ClusterConfig
    from dcscale.cycle import phases
    from dcscale.cycle.clustering import cluster_rows_to_labels

    env = dist.get_env()
    shards = ShardSet(shard_dir)
    model = _lenet()
    tf = eval_transform(32, 1)
    indices, feats, skipped = phases.extract_features(model.features, shards, tf, env, batch_size=64,
                                                      workers=1)
    # the cycle's one reduce -> cluster -> assign, on rows extracted at full width (as IA calls it)
    settings = dict(k=10, niter=10, pca_dim=16, pca_sample=None, max_points_per_centroid=None)
    exact = cluster_rows_to_labels(indices, feats, len(shards), ClusterConfig(**settings, max_train_rows=None), 3)
    labels, objective, centroids = exact.labels, exact.objective, exact.centroids
    capped_labels = cluster_rows_to_labels(indices, feats, len(shards),
                                           ClusterConfig(**settings, max_train_rows=600), 3).labels
    on_rank0 = cluster_rows_to_labels(indices, feats, len(shards),
                                      ClusterConfig(**settings, max_train_rows=None, kmeans="rank0"), 3)
    rank0_labels, rank0_objective = on_rank0.labels, on_rank0.objective
    return {"indices": indices, "feats": feats, "labels": labels, "centroids": centroids,
            "objective": np.array(objective), "skipped": np.array(skipped, dtype=np.int64),
            "capped_labels": capped_labels, "rank0_labels": rank0_labels,
            "rank0_objective": np.array(rank0_objective)}



def _collective_results() -> dict:
    """The row helpers on uneven (and empty) parts: results, and the peak memory each one took."""
    rank = dist.get_env().rank
    rows = np.full((300_000 - 100_000 * rank, 64), rank + 1, np.float32)  # 77 MB and 51 MB
    gathered, gather_growth = peak_rss_growth(lambda: dist.gather_rows_to_main(rows))
    del rows
    out = {"gather_growth": np.array(gather_growth)}
    if gathered is not None:
        out["gather_ok"] = np.array(gathered.shape == (500_000, 64) and (gathered[:300_000] == 1).all()
                                    and (gathered[300_000:] == 2).all())
        out["gather_bytes"] = np.array(gathered.nbytes)
    del gathered
    dist._PIECE_BYTES = 4 * 2**20  # pieces well below the result, so their bound shows
    labels = np.full(3_000_000 - rank, rank, np.int32)  # like the label slices: sizes differ by one
    everyone, all_gather_growth = peak_rss_growth(lambda: dist.all_gather_rows(labels))
    out["all_gather_growth"] = np.array(all_gather_growth)
    out["all_gather_bytes"] = np.array(everyone.nbytes)
    out["all_gather_ok"] = np.array(len(everyone) == 5_999_999 and (everyone[:3_000_000] == 0).all()
                                    and (everyone[3_000_000:] == 1).all())
    empty = dist.gather_rows_to_main(np.ones((0 if rank else 3, 2), np.float16))
    out["empty_part_ok"] = np.array(empty is None or (empty.shape == (3, 2) and empty.dtype == np.float16))
    # k-means over 2 x 400,000 rows (51 MB a rank), both ways: what each rank's memory grows by.
    from dcscale.cycle import phases

    z = np.random.default_rng(rank).standard_normal((400_000, 32)).astype(np.float32)
    indices = np.arange(400_000) + 400_000 * rank
    for mode in ("distributed", "rank0"):
        _, growth = peak_rss_growth(lambda: phases.cluster_rows(indices, z, 800_000, 100, 2, None, None, 0, mode))
        out[f"kmeans_growth_{mode}"] = np.array(growth)
    out["kmeans_rows_bytes"] = np.array(z.nbytes)
    return out


def _worker(rank: int, world_size: int, store: str, shard_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world_size)
    dist.init_distributed("gloo", timeout_min=2, wait_timeout_min=2)
    try:
        out = _cycle_outputs(shard_dir)
        out.update(_collective_results())
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def two_rank_outputs(digits_train_shards, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    store = os.path.join(tempfile.mkdtemp(), "store")
    # Every block of 64 KiB or more is mapped on its own and unmapped when freed, so the workers' peak
    # resident memory is their peak live memory (not whatever glibc kept from earlier frees).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
        mp.start_processes(_worker, args=(2, store, str(digits_train_shards), str(out_dir)), nprocs=2,
                           start_method="spawn", join=True)
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank_outputs(digits_train_shards):
    dist.init_distributed("gloo")  # no environment: a plain single process
    return _cycle_outputs(str(digits_train_shards))


def test_sharded_extraction_equals_single_process_row_for_row(two_rank_outputs, one_rank_outputs):
    n = len(one_rank_outputs["indices"])
    r0, r1 = two_rank_outputs
    # Contiguous slices: rank 0 holds the first half, rank 1 the second, together every index once.
    assert r0["indices"][-1] < r1["indices"][0]
    joined_idx = np.concatenate([r0["indices"], r1["indices"]])
    np.testing.assert_array_equal(joined_idx, np.arange(n))
    np.testing.assert_array_equal(one_rank_outputs["indices"], np.arange(n))
    joined = np.concatenate([r0["feats"], r1["feats"]])
    np.testing.assert_allclose(joined, one_rank_outputs["feats"], rtol=1e-5, atol=1e-5)


def test_labels_identical_on_all_ranks_and_equal_to_single_process(two_rank_outputs, one_rank_outputs):
    r0, r1 = two_rank_outputs
    np.testing.assert_array_equal(r0["labels"], r1["labels"])
    np.testing.assert_array_equal(r0["centroids"], r1["centroids"])
    assert r0["labels"].dtype == np.int32 and len(r0["labels"]) == len(one_rank_outputs["labels"])
    assert (r0["labels"] >= 0).all() and r0["labels"].max() < 10
    np.testing.assert_array_equal(r0["labels"], one_rank_outputs["labels"])
    # The objective is the mean over all rows, summed across ranks: the same at any world size.
    assert float(r0["objective"]) == pytest.approx(float(one_rank_outputs["objective"]), rel=1e-5)
    assert float(r0["objective"]) == float(r1["objective"]) > 0


def test_capped_kmeans_rows_give_the_same_labels_at_any_world_size(two_rank_outputs, one_rank_outputs):
    r0, r1 = two_rank_outputs
    np.testing.assert_array_equal(r0["capped_labels"], one_rank_outputs["capped_labels"])
    np.testing.assert_array_equal(r0["capped_labels"], r1["capped_labels"])


def test_rank0_kmeans_gives_the_same_labels_at_any_world_size(two_rank_outputs, one_rank_outputs):
    r0, r1 = two_rank_outputs
    np.testing.assert_array_equal(r0["rank0_labels"], one_rank_outputs["rank0_labels"])
    np.testing.assert_array_equal(r0["rank0_labels"], r1["rank0_labels"])
    # Distributed Lloyd and faiss's own k-means: other random draws, the same quality.
    assert float(r0["objective"]) == pytest.approx(float(r0["rank0_objective"]), rel=0.05)


def test_distributed_kmeans_memory_does_not_grow_with_the_other_ranks_rows(two_rank_outputs):
    r0, r1 = two_rank_outputs
    rows = int(r0["kmeans_rows_bytes"])  # each rank's own rows (51 MB)
    for r in (r0, r1):  # only centroids, sums and one chunk: well under a rank's own rows
        assert r["kmeans_growth_distributed"] < 0.5 * rows
    # With kmeans: rank0, rank 0 receives rank 1's rows (and faiss its buffers): more than their size.
    assert r0["kmeans_growth_rank0"] > rows > 2 * r0["kmeans_growth_distributed"]


def test_rows_arrive_in_one_array_with_no_second_copy(two_rank_outputs):
    r0, r1 = two_rank_outputs
    assert r0["gather_ok"] and r0["empty_part_ok"] and r1["empty_part_ok"]
    assert r0["all_gather_ok"] and r1["all_gather_ok"]
    # Rank 0 holds the gathered rows once (padded parts, gloo staging and a concatenation: 2.4x before).
    assert r0["gather_growth"] < 1.2 * r0["gather_bytes"]
    for r in (r0, r1):  # the label all-gather: the result plus one bounded piece
        assert r["all_gather_growth"] < 1.5 * r["all_gather_bytes"]


# ---- single process -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    """400 digits images, two of them undecodable (indices 7 and 301)."""
    from test_train_run import _digits_with_broken_images

    return _digits_with_broken_images(tmp_path_factory.mktemp("broken") / "set", {7, 301})


def test_extraction_fills_one_array_and_leaves_out_undecodable_rows(broken_shards):
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle import phases

    dist.init_distributed("gloo")
    shards, tf = ShardSet(broken_shards), eval_transform(32, 1)

    def wide(images):  # 16,384 features per image, so that the features dwarf everything else
        return images.flatten(1).repeat(1, 16)

    def extract(dtype):
        return phases.extract_features(wide, shards, tf, dist.get_env(), batch_size=64, workers=0, dtype=dtype)

    _, feats32, _ = extract("float32")  # (also the first pass: one-time imports stay out of the count)
    tracemalloc.start()
    try:
        indices, feats16, skipped = extract("float16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(skipped) == [7, 301]
    np.testing.assert_array_equal(indices, np.delete(np.arange(400), [7, 301]))
    assert feats16.shape == (398, 16384) and feats16.dtype == np.float16
    assert peak < 1.2 * feats16.nbytes  # one array of the slice, not a list of batches plus a concatenation
    np.testing.assert_array_equal(feats16, feats32.astype(np.float16))


@pytest.mark.parametrize("mode, kmeans_fn, kmeans_threads", [
    ("rank0", "train_kmeans", lambda: usable_cores()),  # rank 0 alone: at most every core it may use
    ("distributed", "distributed_kmeans", lambda: max(1, usable_cores() // 2)),  # all ranks at once: a share
])
@pytest.mark.parametrize("small", [True, False])
def test_kmeans_and_assignment_threads(monkeypatch, mode, kmeans_fn, kmeans_threads, small):
    from dcscale.cycle import phases

    dist.init_distributed("gloo")
    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = faiss.omp_get_max_threads()
            return real(*args, **kwargs)
        monkeypatch.setattr(phases, name, call)

    spy(kmeans_fn, getattr(phases, kmeans_fn))
    spy("assign", phases.assign)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if not small:  # 300 x 8 x 5 counts as large: the threads the cores allow (fewer when some are busy)
        monkeypatch.setattr(phases, "fitting_threads", lambda rows, dim, k, cores: max(1, int(cores())))
    before = faiss.omp_get_max_threads()
    z = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    indices = np.arange(300)
    centroids, _, _ = phases.cluster_rows(indices, z, 300, 5, 5, None, None, seed=0, mode=mode)
    phases.share_labels(indices, *phases.assign_rows(z, centroids), 300)
    if small:  # a second thread would not pay: one
        assert seen == {kmeans_fn: 1, "assign": 1}
    else:
        assert 1 <= seen[kmeans_fn] <= kmeans_threads() and 1 <= seen["assign"] <= max(1, usable_cores() // 2)
    assert faiss.omp_get_max_threads() == before  # restored for the rest of the run


def _cluster_config(k: int, **cluster) -> Config:
    cfg = Config()
    cfg.cluster.k, cfg.cluster.pca_dim = k, 16
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    return cfg


@pytest.mark.parametrize("k, cluster, message", [
    (1438, {}, "cluster.k = 1438 is more than the 1437 images of {root}: at least 1 cluster(s) would stay "
               "empty; use at most 1437"),
    (10**9, {}, "cluster.k = 1000000000 needs about 245.9 GiB on every rank for k-means (1,000,000,000 "
                "centroids of 16 dims and their sums), more than this machine's {mem} GiB; lower cluster.k"),
    (10**9, {"kmeans": "rank0"}, "cluster.k = 1000000000 needs about 253.3 GiB on rank 0 for k-means "
                                 "(1,000,000,000 training rows and 1,000,000,000 centroids of 16 dims), more than "
                                 "this machine's {mem} GiB; lower cluster.k"),
    (50, {"max_train_rows": 20}, "cluster.max_train_rows = 20 is less than cluster.k = 50: every centroid "
                                 "needs training rows; raise it (or null for every row)"),
])
def test_clustering_settings_beyond_the_data_or_memory_fail_before_any_work(digits_train_shards, k, cluster,
                                                                            message):
    from dcscale.host import physical_memory_bytes
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle.clustering import check_clusterable

    shards = ShardSet(digits_train_shards)
    with pytest.raises(DcscaleError) as err:
        check_clusterable(_cluster_config(k, **cluster), _lenet(), shards)
    assert str(err.value) == message.format(root=shards.root, mem=f"{physical_memory_bytes() / 2**30:,.1f}")
    check_clusterable(_cluster_config(1437), _lenet(), shards)  # K = N is fine


def test_cluster_k_beyond_the_images_is_one_line_from_the_cli(digits_train_shards, tmp_path):
    from conftest import tiny_run_overrides
    from test_train_run import run_train

    proc = run_train(1, tiny_run_overrides(digits_train_shards, tmp_path / "run", **{"cluster.k": 5000}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dcscale: error: cluster.k = 5000 is more than the "
                                                           "1437 images of")
    assert not (tmp_path / "run" / "labels.npy").exists()


@pytest.mark.parametrize("broken, k, message", [
    (set(range(1, 400)), 2, "{root}: only 1 of its 400 images could be decoded; clustering needs at least 2"),
    (set(range(5, 400)), 10, "cluster.k = 10 is more than the 5 decodable images of {root} (395 could not be "
                             "decoded); use at most 5"),
])
def test_too_few_decodable_images_fail_after_extraction(tmp_path, broken, k, message):
    from test_train_run import _digits_with_broken_images

    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle.clustering import cluster_cycle

    env = dist.init_distributed("gloo")
    shards = ShardSet(_digits_with_broken_images(tmp_path / "set", broken))
    with pytest.raises(DcscaleError) as err:
        cluster_cycle(_lenet(), shards, eval_transform(32, 1), env, _cluster_config(k), cycle=0)
    assert str(err.value) == message.format(root=shards.root)
