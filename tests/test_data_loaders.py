"""The exact partition over ranks and workers, the extraction loader, the training dataset and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcscale.data.loaders import ClusterTrainDataset, collate_skip_none, extraction_loader, num_extraction_batches
from dcscale.data.partition import extraction_batches, rank_range, worker_batches, worker_range
from dcscale.data.shardset import ShardSet
from dcscale.data.transforms import eval_transform, train_transform
from dcscale.errors import ConfigError
from test_data_shardset import _set_with_broken_image

CASES = [(0, 1, 1), (1, 4, 3), (7, 3, 5), (10, 1, 0), (100, 7, 3), (1437, 3, 4), (1000, 8, 16), (5, 8, 2),
         (123457, 13, 6)]


@pytest.mark.parametrize("n, world, workers", CASES)
def test_partition_covers_every_index_once(n, world, workers):
    seen = []
    rank_sizes = []
    for rank in range(world):
        rr = rank_range(n, world, rank)
        assert rr.start == rank * n // world and rr.stop == (rank + 1) * n // world
        rank_sizes.append(len(rr))
        pieces = [worker_range(rr, max(workers, 1), w) for w in range(max(workers, 1))]
        sizes = [len(p) for p in pieces]
        assert max(sizes) - min(sizes) <= 1
        for piece in pieces:
            seen.extend(piece)
    assert max(rank_sizes) - min(rank_sizes) <= 1
    assert seen == list(range(n))  # contiguous, in order, each exactly once


@pytest.mark.parametrize("n, world, workers", CASES)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_extraction_batches_in_index_order_and_balanced(n, world, workers, batch_size):
    for rank in range(world):
        rr = rank_range(n, world, rank)
        batches = extraction_batches(rr, workers, batch_size)
        assert [i for _, b in batches for i in b] == list(rr)  # index order, each exactly once
        assert all(0 < len(b) <= batch_size for _, b in batches)
        per_worker = [worker_batches(rr, workers, w, batch_size) for w in range(max(workers, 1))]
        totals = [sum(map(len, bs)) for bs in per_worker]
        assert max(totals) - min(totals) <= 1  # balanced to within one sample
        for bs in per_worker:  # shrinking batches: a worker that stops has nothing later
            assert all(len(a) >= len(b) for a, b in zip(bs, bs[1:]))
        # the DataLoader's round-robin over workers (skipping exhausted ones) gives this order
        queues = [list(bs) for bs in per_worker]
        round_robin = []
        while any(queues):
            for q in queues:
                if q:
                    round_robin.append(q.pop(0))
        assert round_robin == [b for _, b in batches]


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError):
        rank_range(10, 2, 2)
    with pytest.raises(ValueError):
        worker_range(range(10), 0, 0)


def _collect(loader):
    indices, images = [], []
    for idx, img in loader:
        indices.append(idx)
        images.append(img)
    return torch.cat(indices), torch.cat(images)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world, workers", [(1, 0), (3, 2), (2, 5)])
def test_extraction_loader_covers_rank_slice(digits_test_shards, world, workers):
    # digits test: 360 samples in 2 shards, so (2, 5) has more workers than shards
    ss = ShardSet(digits_test_shards)
    transform = eval_transform(8, 1)
    everything = []
    for rank in range(world):
        loader = extraction_loader(ss, transform, rank, world, batch_size=32, num_workers=workers)
        indices, images = _collect(loader)
        expected = rank_range(len(ss), world, rank)
        assert indices.tolist() == list(expected) and loader.skipped == []  # in index order
        assert images.shape == (len(expected), 1, 8, 8) and images.dtype == torch.float32
        for row in (0, len(indices) - 1):
            torch.testing.assert_close(images[row], transform(ss.read(int(indices[row])).image))
        again, _ = _collect(loader)
        assert torch.equal(indices, again)  # deterministic order
        assert len(loader) >= -(-len(expected) // 32) and loader.num_batches == len(loader)
        everything.extend(indices.tolist())
    assert sorted(everything) == list(range(len(ss)))


def test_extraction_loader_reports_skipped_from_workers(tmp_path):
    ss = ShardSet(_set_with_broken_image(tmp_path / "b", broken=(2, 5, 11)))
    loader = extraction_loader(ss, eval_transform(4, 1), rank=0, world_size=1, batch_size=4, num_workers=2)
    indices, images = _collect(loader)
    assert sorted(loader.skipped) == [2, 5, 11]
    assert indices.tolist() == [i for i in range(12) if i not in (2, 5, 11)]
    assert images.shape[0] == 9
    assert num_extraction_batches(12, 4, 2) == 4


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_with_empty_ranges(tmp_path):
    ss = ShardSet(_set_with_broken_image(tmp_path / "b", broken=()))
    loader = extraction_loader(ss, eval_transform(4, 1), rank=3, world_size=4, batch_size=2, num_workers=5)
    indices, _ = _collect(loader)  # 3 samples for 5 workers: two workers have nothing to do
    assert indices.tolist() == [9, 10, 11]


def test_train_dataset_and_collate(tmp_path):
    ss = ShardSet(_set_with_broken_image(tmp_path / "b", broken=(3,)))
    pseudo = np.arange(12)[::-1] % 4
    ds = ClusterTrainDataset(ss, pseudo, train_transform(4, 1, "small", 0.5, True))
    image, label, index = ds[7]
    assert image.shape == (1, 4, 4) and label == pseudo[7] and index == 7
    assert ds[3] is None
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, collate_fn=collate_skip_none)
    batches = list(loader)
    assert [b.skipped for b in batches] == [1, 0]
    assert batches[0].images.shape == (5, 1, 4, 4)
    assert batches[0].indices.tolist() == [0, 1, 2, 4, 5]
    assert torch.equal(batches[0].labels, torch.as_tensor(pseudo[[0, 1, 2, 4, 5]]))
    empty = collate_skip_none([None, None])
    assert empty.skipped == 2 and len(empty.indices) == 0
    with pytest.raises(ValueError):
        ClusterTrainDataset(ss, pseudo[:5], None)


@pytest.mark.parametrize("augment", ["imagenet", "small", "none"])
def test_transforms_shapes(digits_train_shards, augment):
    ss = ShardSet(digits_train_shards)
    image = ss.read(0).image
    grey = train_transform(8, 1, augment, 0.3, True)(image)
    assert grey.shape == (1, 8, 8)
    rgb = train_transform(16, 3, augment, 0.3, False)(image)  # grey source forced to RGB, upscaled
    assert rgb.shape == (3, 16, 16)
    assert eval_transform(6, 3, resize=8)(image).shape == (3, 6, 6)


def test_eval_transform_normalises():
    from PIL import Image

    out = eval_transform(2, 1)(Image.new("L", (2, 2), color=255))
    torch.testing.assert_close(out, torch.ones(1, 2, 2))  # (1 - 0.5) / 0.5
    with pytest.raises(ConfigError, match="data.mean"):
        eval_transform(2, 3, mean=[0.5], std=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="train.augment"):
        train_transform(2, 1, "bogus")
