"""Streaming projection and the distributed PCA fit, across real gloo process groups (2 processes).

- Given the same PCA, the streamed rows (projected a chunk at a time as they come off the network)
  are bit for bit the rows of the previous path (the whole slice extracted, then projected), so the
  pseudo-labels are the same; `_reference_reduce` keeps that path (its PCA gathered to rank 0).
- The PCA fitted from per-rank sums equals the single-process fit (uneven shares, an empty one).
- A whole cycle's labels agree with the previous path's (NMI >= 0.99).
- Bad samples stop every rank with the same line; nothing hangs.
- A rank's peak memory while extracting and projecting is its reduced rows plus fixed buffers,
  never its slice at full width.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import numpy as np
import pytest
from conftest import peak_rss_growth
import torch
import torch.multiprocessing as mp

from dcscale import dist
from dcscale.cluster import pca as pca_mod
from dcscale.cluster.metrics import nmi_scores
from dcscale.cluster.pca import PCA, apply_pca, fit_pca, fit_pca_across_ranks
from dcscale.config import Config
from dcscale.errors import DcscaleError


def _lenet():
    from dcscale.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, image_size=32, num_classes=10).eval()


def _reference_reduce(indices, feats, n_total, pca_dim, pca_sample, seed):
    """The previous reduce step, kept as the reference: the sample's rows gathered to rank 0, fitted
    there, the PCA broadcast, the rank's whole slice projected."""
    from dcscale.cycle.phases import _rows_in, pca_sample_indices

    chosen = pca_sample_indices(n_total, pca_sample, seed)
    sample = dist.gather_rows_to_main(feats[_rows_in(indices, chosen)].astype(np.float32, copy=False))
    pca = fit_pca(sample, pca_dim) if dist.is_main() else None
    mean = dist.broadcast_array(pca.mean if pca else None)
    matrix = dist.broadcast_array(pca.matrix if pca else None)
    pca = PCA(mean=mean, matrix=matrix)
    return apply_pca(feats, pca), pca


def _cluster_config(**cluster) -> Config:
    cfg = Config()
    cfg.cluster.k, cfg.cluster.pca_dim, cfg.cluster.niter, cfg.cluster.pca_sample = 10, 16, 10, 700
    cfg.data.workers = 0
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    return cfg



WIDE = 32 * 1024  # features per image of `_wide`: a rank's slice at full width dwarfs everything else


def _wide(images):
    return images.flatten(1).repeat(1, 32)


def _same_rows_given_the_same_pca(shard_dir: str, broken_dir: str) -> dict:
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle import phases

    env, out, tf = dist.get_env(), {}, eval_transform(32, 1)
    model = _lenet()
    # chunks of 128 rows (not a multiple of the batch of 48): many chunk boundaries inside batches
    pca_mod.CHUNK_ROWS = phases.CHUNK_ROWS = 128
    for name, root in (("digits", shard_dir), ("broken", broken_dir)):
        shards = ShardSet(root)
        for dtype in ("float32", "float16"):
            indices, feats, skipped = phases.extract_features(model.features, shards, tf, env, 48, 0, dtype)
            z_ref, pca = _reference_reduce(indices, feats, len(shards), 16, 300, seed=3)
            new_indices, z, new_skipped, nonfinite = phases.extract_projected(model.features, shards, tf, env, 48, 0,
                                                                              pca, dtype, model.feature_dim)
            unreduced = phases.extract_projected(model.features, shards, tf, env, 48, 0, None, dtype)[1]
            out[f"{name}_{dtype}_same"] = np.array(
                np.array_equal(new_indices, indices) and new_skipped == skipped and nonfinite == 0
                and z.tobytes() == z_ref.tobytes() and unreduced.tobytes() == apply_pca(feats, None).tobytes())
            labels = []
            for rows in (z_ref, z):
                centroids, _, _ = phases.cluster_rows(indices, rows, len(shards), 10, 10, None, None, 3)
                labels.append(phases.share_labels(indices, *phases.assign_rows(rows, centroids), len(shards))[0])
            out[f"{name}_{dtype}_labels_same"] = np.array(np.array_equal(*labels))
    pca_mod.CHUNK_ROWS = phases.CHUNK_ROWS = 2048
    return out


def _cycle_against_the_previous_path(shard_dir: str) -> dict:
    """A whole cycle (`cluster_cycle`) and the previous path's labels for the same config and seed."""
    from dcscale.cluster.kmeans import cycle_seed
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle import phases
    from dcscale.cycle.clustering import cluster_cycle

    env, tf, cfg = dist.get_env(), eval_transform(32, 1), _cluster_config()
    shards, model = ShardSet(shard_dir), _lenet()
    labels, _, _, _ = cluster_cycle(model, shards, tf, env, cfg, cycle=0)
    seed = cycle_seed(cfg.seed, 0)
    indices, feats, _ = phases.extract_features(model.features, shards, tf, env, cfg.data.extract_batch_size, 0)
    z, _ = _reference_reduce(indices, feats, len(shards), 16, 700, seed)
    centroids, _, _ = phases.cluster_rows(indices, z, len(shards), 10, 10, cfg.cluster.max_points_per_centroid,
                                       cfg.cluster.max_train_rows, seed)
    previous, _ = phases.share_labels(indices, *phases.assign_rows(z, centroids), len(shards))
    return {"cycle_labels": labels, "previous_labels": previous}


def _fits_across_ranks() -> dict:
    """fit_pca_across_ranks on uneven shares (and an empty one) of fixed samples, by every solver."""
    rank, out = dist.get_env().rank, {}
    rng = np.random.default_rng(0)
    gapped = (rng.standard_normal((1500, 400)) * np.r_[np.linspace(6, 3, 16), np.linspace(1, .5, 384)] + 5)
    gapped = gapped.astype(np.float32)
    for split in (200, 1500):  # rank 0 holds rows [:split], rank 1 the rest (at 1500: none)
        share = gapped[:split] if rank == 0 else gapped[split:]
        for solver in ("full", "subset", "randomized"):
            fitted = fit_pca_across_ranks(share, 16, solver=solver)
            again = fit_pca_across_ranks(share, 16, solver=solver)
            out[f"{split}_{solver}_matrix"], out[f"{split}_{solver}_mean"] = fitted.matrix, fitted.mean
            out[f"{split}_{solver}_deterministic"] = np.array(
                np.array_equal(fitted.matrix, again.matrix) and np.array_equal(fitted.mean, again.mean))
    return out


def _bad_samples(broken_dir: str, shard_dir: str) -> dict:
    """The one line every rank stops with, for each bad sample (or 'ok')."""
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle.clustering import cluster_cycle

    env, tf, out = dist.get_env(), eval_transform(32, 1), {}
    model = _lenet()
    cases = {
        # 400 images, 395 undecodable: rank 1's share of the sample decodes nothing
        "undecodable": (ShardSet(broken_dir), _cluster_config(k=2, pca_sample=300), model),
        "nonfinite": (ShardSet(shard_dir), _cluster_config(pca_sample=500), _NaNOnRank1(model)),
    }
    for name, (shards, cfg, net) in cases.items():
        try:
            cluster_cycle(net, shards, tf, env, cfg, cycle=4)
            out[name] = np.array("ok")
        except DcscaleError as err:
            out[name] = np.array(str(err))
    return out


class _NaNOnRank1(torch.nn.Module):
    """The LeNet, whose features are NaN for the images of rank 1's slice with an even index."""

    def __init__(self, net):
        super().__init__()
        self.net, self.feature_dim = net, net.feature_dim

    def features(self, images):
        out = self.net.features(images)
        if dist.get_env().rank == 1:
            out[::2] = float("nan")
        return out


def _memory(shard_dir: str) -> dict:
    """Peak RSS growth of the streamed extraction (PCA to 16 dims) and of the full-width one."""
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.cycle import phases

    env, tf, shards = dist.get_env(), eval_transform(32, 1), ShardSet(shard_dir)
    pca_mod.CHUNK_ROWS = phases.CHUNK_ROWS = 64
    rng = np.random.default_rng(0)
    pca = PCA(mean=np.zeros(WIDE, np.float32), matrix=rng.standard_normal((WIDE, 16)).astype(np.float32))
    phases.extract_projected(_wide, shards, tf, env, 16, 0, pca)  # one-time imports and buffers stay out
    dist.barrier()
    (indices, z, _, _), streamed = peak_rss_growth(lambda: phases.extract_projected(_wide, shards, tf, env, 16, 0, pca))
    del z
    dist.barrier()
    (_, feats, _), full_width = peak_rss_growth(lambda: phases.extract_features(_wide, shards, tf, env, 16, 0))
    pca_mod.CHUNK_ROWS = phases.CHUNK_ROWS = 2048
    return {"streamed_growth": np.array(streamed), "full_width_growth": np.array(full_width),
            "rows": np.array(len(indices)), "feats_bytes": np.array(feats.nbytes)}


def _worker(rank: int, world_size: int, store: str, shard_dir: str, few_broken: str, broken_dir: str,
            out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    dist.init_distributed("gloo", timeout_min=2, wait_timeout_min=2)
    try:
        out = _memory(shard_dir)
        out.update(_same_rows_given_the_same_pca(shard_dir, few_broken))
        out.update(_cycle_against_the_previous_path(shard_dir))
        out.update(_fits_across_ranks())
        out.update(_bad_samples(broken_dir, shard_dir))
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    """400 digits images: (two undecodable, all but the first 5 undecodable)."""
    from test_train_run import _digits_with_broken_images

    root = tmp_path_factory.mktemp("broken")
    return (_digits_with_broken_images(root / "few", {7, 301}),
            _digits_with_broken_images(root / "most", set(range(5, 400))))


@pytest.fixture(scope="module")
def ranks(digits_train_shards, broken_shards, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    store = os.path.join(tempfile.mkdtemp(), "store")
    # blocks of 64 KiB or more are mapped on their own and unmapped when freed: the peak resident
    # memory is the peak live memory
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
        mp.start_processes(_worker, args=(2, store, str(digits_train_shards), *map(str, broken_shards), str(out_dir)),
                           nprocs=2, start_method="spawn", join=True)
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("case", ["digits_float32", "broken_float32", "digits_float16", "broken_float16"])
def test_given_the_same_pca_the_streamed_rows_and_labels_are_the_previous_ones(ranks, case):
    for out in ranks:
        assert out[f"{case}_same"], "streamed rows differ from extract + project"
        assert out[f"{case}_labels_same"]


def test_a_cycle_gives_the_previous_paths_labels(ranks):
    a, b = ranks
    np.testing.assert_array_equal(a["cycle_labels"], b["cycle_labels"])  # the same on every rank
    assert nmi_scores(a["previous_labels"], a["cycle_labels"])["arithmetic"] >= 0.99


@pytest.mark.parametrize("split", [200, 1500])
@pytest.mark.parametrize("solver", ["full", "subset", "randomized"])
def test_the_pca_fitted_from_per_rank_sums_is_the_single_process_fit(ranks, split, solver):
    rng = np.random.default_rng(0)
    gapped = (rng.standard_normal((1500, 400)) * np.r_[np.linspace(6, 3, 16), np.linspace(1, .5, 384)] + 5)
    reference = fit_pca(gapped.astype(np.float32), 16, solver=solver)
    a, b = ranks
    for key in ("matrix", "mean"):
        np.testing.assert_array_equal(a[f"{split}_{solver}_{key}"], b[f"{split}_{solver}_{key}"])
    assert a[f"{split}_{solver}_deterministic"]
    np.testing.assert_allclose(a[f"{split}_{solver}_mean"], reference.mean, rtol=1e-6)
    np.testing.assert_allclose(a[f"{split}_{solver}_matrix"], reference.matrix, rtol=1e-4, atol=1e-5)


def test_a_one_process_fit_across_ranks_is_exactly_fit_pca():
    dist.init_distributed("gloo")  # no environment: a plain single process
    x = np.random.default_rng(1).standard_normal((500, 300)).astype(np.float32) * np.linspace(4, .1, 300) + 1
    for solver in ("full", "subset", "randomized"):
        a, b = fit_pca(x.astype(np.float32), 20, solver=solver), fit_pca_across_ranks(x.astype(np.float32), 20,
                                                                                        solver=solver)
        assert a.matrix.tobytes() == b.matrix.tobytes() and a.mean.tobytes() == b.mean.tobytes()


def test_bad_samples_stop_every_rank_with_the_same_line(ranks):
    a, b = ranks
    for case in ("undecodable", "nonfinite"):
        assert str(a[case]) == str(b[case]), case
    assert re.fullmatch(r"cycle 4: only \d of the 300 images of the PCA sample could be decoded; a PCA to "
                        r"cluster.pca_dim = 16 dims needs at least 16", str(a["undecodable"])), str(a["undecodable"])
    assert str(a["nonfinite"]).startswith("cycle 4: ") and "of the 500 images of the PCA sample gave NaN" in str(
        a["nonfinite"])


def test_a_rank_never_holds_its_slice_at_full_width(ranks):
    for out in ranks:
        rows = int(out["rows"])
        full_width = 4 * WIDE * rows  # b D N/W
        assert int(out["feats_bytes"]) == full_width and out["full_width_growth"] >= full_width  # (the old path)
        # the reduced rows, one chunk of raw rows and its centred copy (apply_pca's float32 temporary), a
        # few batches at full width (the model's output and its copies), plus 8 MB for images and allocator
        bound = 4 * 16 * rows + 2 * 4 * WIDE * 64 + 3 * 4 * WIDE * 16 + 8 * 2**20
        assert out["streamed_growth"] <= bound, (out["streamed_growth"], bound, full_width)
        assert bound < full_width / 2.5


def test_pca_sample_beyond_the_data_or_below_pca_dim(digits_train_shards, caplog):
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle.clustering import check_clusterable

    dist.init_distributed("gloo")
    shards, model = ShardSet(digits_train_shards), _lenet()
    with pytest.raises(DcscaleError) as err:
        check_clusterable(_cluster_config(pca_sample=10), model, shards)
    assert str(err.value) == ("cluster.pca_sample = 10 are too few rows to fit a PCA to cluster.pca_dim = 16 dims: "
                              "the sample needs at least 16 rows; raise cluster.pca_sample or lower pca_dim")
    with caplog.at_level(logging.INFO, logger="dcscale"):
        check_clusterable(_cluster_config(pca_sample=5000), model, shards)
    assert f"cluster.pca_sample = 5000 is more than the 1437 images of {shards.root}: the PCA is fitted on all" \
        in caplog.text


class _Counted:
    """A model whose feature calls count the images they are given."""

    def __init__(self, model):
        self.model, self.feature_dim, self.images = model, model.feature_dim, 0

    def eval(self):
        self.model.eval()
        return self

    def features(self, x):
        self.images += len(x)
        return self.model.features(x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_sample_of_every_image_is_extracted_once(digits_train_shards, dtype):
    """pca_sample >= N: the sample's pass is the cycle's only pass (its rows are projected, not
    extracted again), and the rows are those of the second pass it saves, bit for bit; a smaller
    sample still costs S images more."""
    from dcscale.cycle import phases
    from dcscale.cycle.clustering import cluster_cycle, fit_cycle_pca
    from dcscale.cycle.compute import ForwardSettings
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform

    env, tf, shards = dist.get_env(), eval_transform(32, 1), ShardSet(digits_train_shards)
    n = len(shards)
    for sample, passes in ((None, n), (n, n), (n - 100, 2 * n - 100)):
        model = _Counted(_lenet())
        cfg = _cluster_config(pca_sample=sample, feature_dtype=dtype)
        labels, _, metrics, _ = cluster_cycle(model, shards, tf, env, cfg, cycle=0)
        assert model.images == passes, sample
        assert (labels >= 0).all() and metrics["ips_extract"] < 1e6  # a rate of the pass, not of the projection
    cfg, model = _cluster_config(pca_sample=None, feature_dtype=dtype), _lenet()
    extraction = (model.features, shards, tf, env, cfg.data.extract_batch_size, 0)
    pca, whole = fit_cycle_pca(extraction, cfg, model.feature_dim, ForwardSettings(env.device), seed=5, cycle=0)
    indices, z, skipped, nonfinite = phases.project_sample(*whole, pca)
    again = phases.extract_projected(*extraction, pca, dtype, model.feature_dim)
    assert np.array_equal(indices, again[0]) and z.tobytes() == again[1].tobytes()
    assert skipped == again[2] and nonfinite == again[3] == 0
