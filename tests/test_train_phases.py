"""The cycle's phases across real gloo process groups (FileStore, 2 processes on CPU)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dcscale import dist


def _cycle_outputs(shard_dir: str, out_file: str | None = None) -> dict:
    """Run extract -> reduce -> cluster -> assign for one random-init LeNet; return the arrays."""
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.models import build_model
    from dcscale.train import phases

    env = dist.get_env()
    shards = ShardSet(shard_dir)
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1, image_size=32, num_classes=10).eval()
    tf = eval_transform(32, 1)
    indices, feats, skipped = phases.extract_features(model.features, shards, tf, env, batch_size=64,
                                                      workers=1)
    z, _ = phases.reduce_features(indices, feats, len(shards), pca_dim=16, pca_sample=None, seed=3)
    centroids, _ = phases.cluster_rows(indices, z, len(shards), k=10, niter=10,
                                       max_points_per_centroid=None, seed=3)
    labels, objective = phases.assign_labels(indices, z, centroids, len(shards))
    out = {"indices": indices, "feats": feats, "labels": labels, "centroids": centroids,
           "objective": np.array(objective), "skipped": np.array(skipped, dtype=np.int64)}
    if out_file:
        np.savez(out_file, **out)
    return out


def _worker(rank: int, world_size: int, store: str, shard_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world_size)
    dist.init_distributed("gloo", timeout_min=2, wait_timeout_min=2)
    try:
        _cycle_outputs(shard_dir, os.path.join(out_dir, f"rank{rank}.npz"))
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def two_rank_outputs(digits_train_shards, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    store = os.path.join(tempfile.mkdtemp(), "store")
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
