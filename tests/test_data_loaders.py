"""The exact partition over ranks and workers, the extraction loader, the training dataset and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcscale.data.loaders import SeededDraws, extraction_loader, num_extraction_batches
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
        assert len(loader) >= -(-len(expected) // 32)
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


def test_training_draws_skip_and_count_undecodable_images(tmp_path):
    ss = ShardSet(_set_with_broken_image(tmp_path / "b", broken=(3,)))
    pseudo = np.arange(12)[::-1] % 4
    ds = SeededDraws(ss, pseudo, train_transform(4, 1, "small", 0.5, True), seed=0, cycle=0)
    image, label, index, position = ds[(5, 7)]
    assert image.dtype == torch.uint8 and label == pseudo[7] and index == 7 and position == 5
    assert ds[(0, 3)] is None
    draws = list(enumerate(range(12)))  # (position, global index) pairs, as WithPositions gives them
    loader = torch.utils.data.DataLoader(ds, batch_size=6, sampler=draws, num_workers=2, collate_fn=ds.collate)
    batches = list(loader)
    assert [b.skipped for b in batches] == [1, 0]
    assert batches[0].images.shape == (5, 1, 4, 4) and batches[0].images.dtype == torch.float32
    assert batches[0].indices.tolist() == [0, 1, 2, 4, 5]
    assert torch.equal(batches[0].labels, torch.as_tensor(pseudo[[0, 1, 2, 4, 5]]))
    empty = ds.collate([None, None])
    assert empty.skipped == 2 and len(empty.indices) == 0
    with pytest.raises(ValueError):
        SeededDraws(ss, pseudo[:5], None, seed=0, cycle=0)


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


# ---- the batch pipeline: tensor decode, batch geometry, seeded batch augmentation ---------------

def _encode(image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [(m, "PNG") for m in ("L", "LA", "RGB", "RGBA", "P", "I;16")]
                         + [("L", "JPEG"), ("RGB", "JPEG"), ("RGB", "WEBP")])
def test_tensor_decode_matches_pil_conversion(mode, fmt):
    """Fast path (8-bit PNG, JPEG) and PIL fallback (palette, 16-bit, WebP) give PIL's pixels."""
    from PIL import Image

    from dcscale.data.shardset import decode_uint8
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert("RGB").convert("P") if mode == "P" else rgba.convert(mode)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(5, 7), dtype=np.uint16))
    data = _encode(image, fmt)
    for channels, target in ((1, "L"), (3, "RGB")):
        expected = np.asarray(Image.open(__import__("io").BytesIO(data)).convert(target))
        got = decode_uint8(data, fmt.lower(), channels)
        assert got.dtype == torch.uint8 and got.shape == (channels, 5, 7)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy().reshape(expected.shape), expected)
    with pytest.raises(Exception):
        decode_uint8(b"\x89PNG\r\n\x1a\nthis is not a png", "png", 1)


def _mixed_size_set(root):
    """A folder-style shard set: RGB images of different sizes (no common image_shape)."""
    from dcscale.data.manifest import FORMAT_VERSION, Manifest, save_manifest
    from dcscale.data.writers import ShardSetWriter

    rng = np.random.default_rng(1)
    root.mkdir()
    writer = ShardSetWriter(root, samples_per_shard=4)
    sizes = [(10, 12), (12, 10), (9, 9), (10, 12), (16, 11), (10, 12), (10, 12), (7, 13)]
    for i, (h, w) in enumerate(sizes):
        writer.write(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), label=i % 2)
    stats = writer.close()
    save_manifest(Manifest(FORMAT_VERSION, stats.shards, stats.total, True, 2, ["a", "b"], "mixed", None, 3), root)
    return root


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_extraction_batches_equal_per_image_transform_for_mixed_sizes(tmp_path):
    ss = ShardSet(_mixed_size_set(tmp_path / "m"))
    tf = eval_transform(8, 3, resize=9)
    for batch_size, workers in ((3, 0), (8, 2)):  # batches that mix sizes, and ones that do not
        indices, images = _collect(extraction_loader(ss, tf, 0, 1, batch_size=batch_size, num_workers=workers))
        assert indices.tolist() == list(range(8)) and images.shape == (8, 3, 8, 8)
        single = torch.stack([tf(ss.read(i).image) for i in range(8)])
        torch.testing.assert_close(images, single, rtol=0, atol=1e-6)
    grey = eval_transform(8, 1)  # colour source forced to one channel
    _, images = _collect(extraction_loader(ss, grey, 0, 1, batch_size=4, num_workers=0))
    assert images.shape == (8, 1, 8, 8)


def test_eval_transform_is_close_to_the_pil_pipeline(digits_train_shards):
    from torchvision import transforms as T

    ss = ShardSet(digits_train_shards)
    pil = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    indices, images = next(iter(extraction_loader(ss, eval_transform(32, 1), 0, 1, 16, 0)))
    reference = torch.stack([pil(ss.read(i).image) for i in indices.tolist()])
    # float resize vs PIL's uint8 resize: within one grey level (2/255 after normalising)
    assert (images - reference).abs().max() <= 2 / 255 + 1e-6


def test_small_augment_is_a_reflect_padded_crop_and_flip():
    import torch.nn.functional as F

    from dcscale.data.transforms import TrainTransform

    tf = TrainTransform(8, 1, "small", hflip=True, mean=[0.0], std=[1 / 255])  # normalise = identity
    batch = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    uniforms = torch.rand(6, tf.n_uniforms, dtype=torch.float64)
    out = tf.augment(batch, uniforms)
    padded = F.pad(batch.float(), (1, 1, 1, 1), mode="reflect")  # padding = 8 // 8
    for b in range(6):
        dy, dx = (int(u * 3) for u in uniforms[b, -3:-1])
        expected = padded[b, :, dy:dy + 8, dx:dx + 8]
        if uniforms[b, -1] < 0.5:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[b], expected)


def test_imagenet_augment_crops_inside_and_resizes():
    from dcscale.data.transforms import TrainTransform

    tf = TrainTransform(8, 3, "imagenet", crop_scale_min=0.2, hflip=False, mean=[0.0] * 3, std=[1 / 255] * 3)
    images = [torch.full((3, 20, 30), 7, dtype=torch.uint8), torch.full((3, 9, 9), 200, dtype=torch.uint8)]
    out = tf.augment(tf.collate(images), torch.rand(2, tf.n_uniforms, dtype=torch.float64))
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[0], torch.full((3, 8, 8), 7.0))
    torch.testing.assert_close(out[1], torch.full((3, 8, 8), 200.0))


@pytest.mark.parametrize("augment", ["imagenet", "small"])
def test_per_batch_augment_gives_the_whole_batch_the_first_images_crop_and_flip(augment):
    from dcscale.data.transforms import TrainTransform

    identity = dict(mean=[0.0], std=[1 / 255])
    per_image = TrainTransform(8, 1, augment, crop_scale_min=0.1, hflip=True, **identity)
    per_batch = TrainTransform(8, 1, augment, crop_scale_min=0.1, hflip=True, per_batch=True, **identity)
    images = [torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8) for _ in range(5)]
    uniforms = torch.rand(5, per_batch.n_uniforms, dtype=torch.float64)
    out = per_batch.augment(per_batch.collate(images), uniforms)
    # torchvision transforms on a batch tensor (the Deep Dive's in-loop GPU transform): one draw for all
    first = uniforms[:1].expand(5, -1)
    torch.testing.assert_close(out, per_image.augment(per_image.collate(images), first))
    assert not torch.equal(out, per_image.augment(per_image.collate(images), uniforms))


def test_draw_uniforms_depend_only_on_key_and_position():
    from dcscale.data.transforms import draw_uniforms

    a = draw_uniforms((0, 1, 2), [5, 9, 100], 4)
    assert a.shape == (3, 4) and ((0 <= a) & (a < 1)).all()
    torch.testing.assert_close(draw_uniforms((0, 1, 2), [100, 5], 4), a[[2, 0]])  # batch-independent
    assert not torch.equal(draw_uniforms((0, 1, 3), [5], 4), a[:1])  # another epoch, other draws
    big = draw_uniforms((7, 0, 0), range(20000), 2)
    assert abs(big.mean().item() - 0.5) < 0.01


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_seeded_draws_are_the_same_in_any_batch_or_worker(tmp_path):
    from dcscale.data.loaders import SeededDraws

    ss = ShardSet(_set_with_broken_image(tmp_path / "b", broken=(3,)))
    pseudo = np.arange(12) % 4
    tf = train_transform(4, 1, "small", 0.5, True)
    draws = [(pos, (pos * 5) % 12) for pos in range(20)]

    def run(batch_size, workers, start=0):
        ds = SeededDraws(ss, pseudo, tf, seed=3, cycle=1)
        ds.epoch = 2
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=draws[start:], num_workers=workers,
                                             collate_fn=ds.collate)
        return list(loader)

    one = run(20, 0)[0]
    assert one.skipped == 2 and 3 not in one.indices.tolist() and one.images.shape == (18, 1, 4, 4)  # 3 drawn twice
    torch.testing.assert_close(one.labels, torch.as_tensor(pseudo[one.indices.numpy()]))
    split = run(6, 2)
    assert sum(b.skipped for b in split) == 2
    torch.testing.assert_close(torch.cat([b.images for b in split]), one.images)
    resumed = run(6, 0, start=6)  # a resumed epoch from draw position 6
    torch.testing.assert_close(torch.cat([b.images for b in resumed]), torch.cat([b.images for b in split[1:]]))
