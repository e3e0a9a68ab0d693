"""ShardSet: random access, `index` on webdataset-written tars, webdataset interop, and bad input
(missing/truncated shards, wrong counts, undecodable images)."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch.utils.data as torch_data
import webdataset as wds
from PIL import Image

from dcscale.data.build import index_tars
from dcscale.data.manifest import load_manifest
from dcscale.data.shardset import ShardSet
from dcscale.data.tarindex import split_key
from dcscale.data.writers import Encoded, ShardSetWriter
from dcscale.errors import DataError

RNG = np.random.default_rng(1)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(root, edit):
    raw = json.loads((root / "manifest.json").read_text())
    edit(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


# ---- random access ---------------------------------------------------------------------------------

def test_random_access_matches_sequential(digits_train_shards):
    ss = ShardSet(digits_train_shards)
    order = RNG.permutation(len(ss))[:300]
    sequential = [np.asarray(ss.read(i).image) for i in range(len(ss))]
    for i in order:
        sample = ss.read(int(i))
        assert sample.index == i
        np.testing.assert_array_equal(np.asarray(sample.image), sequential[i])
    assert ss.locate(199) == (0, 199) and ss.locate(200) == (1, 0) and ss.locate(len(ss) - 1) == (7, 36)
    with pytest.raises(IndexError):
        ss.read(len(ss))


def test_shardset_pickles_into_another_process(digits_train_shards):
    ss = ShardSet(digits_train_shards)
    ss.read(3)  # opens a descriptor, which must not travel
    clone = pickle.loads(pickle.dumps(ss))
    np.testing.assert_array_equal(np.asarray(clone.read(3).image), np.asarray(ss.read(3).image))
    np.testing.assert_array_equal(clone.labels(), ss.labels())


def test_sidecar_index_and_fallback_scan(digits_train_shards, tmp_path):
    fast = ShardSet(digits_train_shards)
    assert fast.used_index_file
    root = _copy(digits_train_shards, tmp_path / "d")
    (root / "index.npy").write_bytes((root / "index.npy").read_bytes()[:-8])  # stale: size differs
    scanned = ShardSet(root)
    assert not scanned.used_index_file
    np.testing.assert_array_equal(scanned.labels(), fast.labels())
    for i in (0, 199, 200, 1436):
        assert scanned.read_bytes(i) == fast.read_bytes(i)
    (root / "index.npy").unlink()
    assert not ShardSet(root).used_index_file


def test_lazy_verification(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")
    (root / "shard-000007.tar").unlink()
    lazy = ShardSet(root, verify=False)
    assert lazy.read(0).label is not None  # other shards still read
    with pytest.raises(DataError, match="shard-000007.tar"):
        lazy.read(len(lazy) - 1)


# ---- index existing webdataset tars --------------------------------------------------------------

def _write_with_shardwriter(directory, n=23, maxcount=10):
    """Tars written by webdataset's own ShardWriter, with arbitrary keys, extra members, some JPEGs."""
    directory.mkdir()
    samples = []
    with wds.ShardWriter(str(directory / "part-%04d.tar"), maxcount=maxcount, verbose=0) as sink:
        for j in range(n):
            array = RNG.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
            key = f"class{j % 3}/img_{j:03d}" if j % 2 else f"sample-{j}_x"
            sample = {"__key__": key, "cls": j % 3, "json": {"j": j}}
            if j % 5 == 4:
                sample["jpg"] = array  # lossy: compared by bytes, not pixels
            else:
                sample["png"] = array
            sink.write(sample)
            samples.append((key, array, j % 3, "jpg" if j % 5 == 4 else "png"))
    return samples


def test_index_shardwriter_tars(tmp_path):
    wds_dir = tmp_path / "wds"
    samples = _write_with_shardwriter(wds_dir)
    tars = sorted(wds_dir.glob("*.tar"))
    before = {t: t.read_bytes() for t in tars}
    for out in (wds_dir, tmp_path / "elsewhere"):
        manifest = index_tars([wds_dir], out)
        assert [s.count for s in manifest.shards] == [10, 10, 3]
        assert manifest.total == 23 and manifest.has_labels and manifest.num_classes == 3
        assert manifest.image_shape == [3, 7, 9]
        ss = ShardSet(out)
        # global order = webdataset's own iteration order; bytes identical
        stream = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
        assert [s["__key__"] for s in stream] == [k for k, *_ in samples]
        for i, (key, array, label, ext) in enumerate(samples):
            data, read_ext, read_label = ss.read_bytes(i)
            assert data == stream[i][ext] and read_ext == ext and read_label == label
            if ext == "png":
                np.testing.assert_array_equal(np.asarray(ss.read(i).image), array)
        np.testing.assert_array_equal(ss.labels(), [s[2] for s in samples])
    assert load_manifest(tmp_path / "elsewhere").shards[0].name == "../wds/part-0000.tar"
    assert {t: t.read_bytes() for t in tars} == before  # never rewritten


def test_index_rejects_compressed_and_imageless(tmp_path):
    gz = tmp_path / "gz"
    gz.mkdir()
    with wds.TarWriter(str(gz / "a.tar"), compress=True) as sink:
        sink.write({"__key__": "k", "png": np.zeros((2, 2), np.uint8)})
    with pytest.raises(DataError, match="compressed"):
        index_tars([gz / "a.tar"], tmp_path / "o1")
    with wds.TarWriter(str(tmp_path / "noimg.tar")) as sink:
        sink.write({"__key__": "k", "txt": "hello"})
    with pytest.raises(DataError, match="sample 'k' has no image"):
        index_tars([tmp_path / "noimg.tar"], tmp_path / "o2")


def test_key_rule_matches_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in ("a/b/img_01.seg.png", "000000001.cls", "x.y/z.jpg", "noext", "dir/.hidden"):
        assert split_key(name) == base_plus_ext(name)


# ---- interop: dcscale tars read by webdataset ---------------------------------------------------------

def test_webdataset_reads_dcscale_tars(digits_test_shards):
    ss = ShardSet(digits_test_shards)
    urls = [str(digits_test_shards / s.name) for s in ss.manifest.shards]
    stream = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(stream) == len(ss)
    for i, sample in enumerate(stream):
        data, ext, label = ss.read_bytes(i)
        assert sample["__key__"] == f"{i:09d}" and set(sample) >= {"png", "cls"}
        assert sample["png"] == data and int(sample["cls"]) == label
    decoded = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "cls")))
    np.testing.assert_array_equal(np.asarray(decoded[0].convert("L")), np.asarray(ss.read(0).image))


# ---- bad input ----------------------------------------------------------------------------------------

def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest.json in"):
        ShardSet(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ShardSet(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        ShardSet(tmp_path)


def test_missing_shard(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")
    (root / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match=r"shard not found: .*shard-000003\.tar"):
        ShardSet(root)


def test_truncated_shard(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")
    shard = root / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(DataError, match=r"shard-000002\.tar.*truncated"):
        ShardSet(root)
    # without the recorded size, the header scan itself finds the cut
    _edit_manifest(root, lambda raw: [s.pop("size") for s in raw["shards"]])
    with pytest.raises(DataError, match=r"shard-000002\.tar.*truncated"):
        ShardSet(root)
    # cut exactly at a member boundary: the end-of-archive marker is missing
    shard.write_bytes(data[: 512 * 10])
    with pytest.raises(DataError, match=r"shard-000002\.tar.*truncated"):
        ShardSet(root)


def test_counts_disagree_with_tars(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")

    def shift(raw):
        raw["shards"][0]["count"] -= 1
        raw["shards"][1]["count"] += 1

    _edit_manifest(root, shift)
    with pytest.raises(DataError, match=r"shard-000000\.tar: holds 200 samples but .*manifest.json says 199"):
        ShardSet(root)
    _edit_manifest(root, lambda raw: raw.update(total=5))
    with pytest.raises(DataError, match=r"manifest.json: total is 5"):
        ShardSet(root)


def _set_with_broken_image(root, broken=(5,), n=12):
    writer = ShardSetWriter(root, samples_per_shard=5)
    root.mkdir()
    for i in range(n):
        if i in broken:
            writer.write(Encoded(data=b"\x89PNG\r\n\x1a\nthis is not a png", ext="png", shape=(1, 4, 4)), label=i % 2)
        else:
            writer.write(np.full((4, 4), i, dtype=np.uint8), label=i % 2)
    stats = writer.close()
    from dcscale.data.manifest import FORMAT_VERSION, Manifest, save_manifest

    save_manifest(Manifest(FORMAT_VERSION, stats.shards, stats.total, True, 2, ["a", "b"], "test",
                           [1, 4, 4], 1), root)
    return root


def test_undecodable_image_is_skipped_and_counted(tmp_path, caplog):
    ss = ShardSet(_set_with_broken_image(tmp_path / "b"))
    with caplog.at_level(logging.WARNING):
        assert ss.read(5) is None
        assert ss.read(5) is None
    assert ss.decode_errors == 2
    warnings = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1 and "000000005" in warnings[0].getMessage() and "shard-000001.tar" in warnings[0].getMessage()
    assert ss.read(6).image.getpixel((0, 0)) == 6  # neighbours unaffected, index 5 stays reserved
    np.testing.assert_array_equal(ss.labels(), np.arange(12) % 2)


def test_labels_are_cached_and_cheap(digits_train_shards):
    ss = ShardSet(digits_train_shards)
    assert ss._labels is None, "opening (and checking) a shard set must not keep its N labels on every rank"
    first = ss.labels()
    assert first.dtype == np.int32 and len(first) == len(ss) and ss.labels() is first
    assert [ss.read(i).label for i in (0, 700, 1436)] == first[[0, 700, 1436]].tolist()


def test_image_modes(tmp_path):
    # RGB and grey images in one set: image_shape unknown, channels fall back to 3
    root = tmp_path / "m"
    root.mkdir()
    writer = ShardSetWriter(root, samples_per_shard=10)
    writer.write(np.zeros((4, 4, 3), np.uint8), None)
    writer.write(Image.new("L", (4, 4)), None)
    stats = writer.close()
    assert stats.shapes == {(3, 4, 4), (1, 4, 4)}


# ---- bounded per-process resources -----------------------------------------------------------------

def _open_tars(root) -> int:
    """Descriptors this process holds on the shard set's tars."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile (listdir's own descriptor)
            pass
    return sum(link.startswith(str(root)) and link.endswith(".tar") for link in links)


def test_open_descriptors_are_bounded(digits_train_shards):
    everything = ShardSet(digits_train_shards)
    order = RNG.permutation(len(everything))[:400]  # every one of the 8 shards, many times over
    capped = ShardSet(digits_train_shards, max_open_files=3)
    most = 0
    for i in order:
        assert capped.read_bytes(int(i)) == everything.read_bytes(int(i))
        most = max(most, _open_tars(digits_train_shards.resolve()))
    assert most == 3 + 8  # `everything` keeps its 8 open, `capped` at most 3
    everything.close()
    capped.close()
    assert _open_tars(digits_train_shards.resolve()) == 0


class _ReadAndCount(torch_data.Dataset):
    def __init__(self, shardset):
        self.shardset = shardset

    def __len__(self):
        return len(self.shardset)

    def __getitem__(self, i):
        return self.shardset.read_bytes(i)[0], _open_tars(self.shardset.root.resolve())


def test_open_descriptors_are_bounded_in_forked_dataloader_workers(digits_train_shards):
    ss = ShardSet(digits_train_shards, max_open_files=2)
    ss.read_bytes(0), ss.read_bytes(1436)  # the parent holds two, which the forked workers inherit
    loader = torch_data.DataLoader(_ReadAndCount(ss), batch_size=None, num_workers=2,
                                   sampler=RNG.permutation(len(ss)).tolist(),
                                   multiprocessing_context="fork")
    counts = []
    for i, (data, count) in zip(loader.sampler, loader):
        assert data == ss.read_bytes(i)[0]
        counts.append(count)
    assert max(counts) <= 2 and len(counts) == len(ss)


def test_index_rows_are_read_on_demand(tmp_path):
    """Opening a shard set and reading a slice of it holds none of the sidecar index (54 bytes per
    sample), whatever the shard set's size."""
    import tracemalloc

    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData

    png = Encoded(data=_png_bytes(np.zeros((2, 2), np.uint8)), ext="png", shape=(1, 2, 2))
    root = tmp_path / "big"
    write_shard_set(SourceData(samples=((png, i % 7) for i in range(10000)), num_samples=10000,
                               class_names=list("abcdefg"), description="test"), root)
    tracemalloc.start()
    ss = ShardSet(root, verify=False)
    for i in range(7000, 7100):
        assert ss.read_bytes(i)[2] == i % 7
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ss.used_index_file and peak < 100_000  # the whole index: 10000 x 54 bytes
    np.testing.assert_array_equal(ss.labels(), np.arange(10000) % 7)


def test_manifest_class_count_must_cover_the_labels(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")
    _edit_manifest(root, lambda raw: raw.update(num_classes=5, class_names=list("abcde")))
    with pytest.raises(DataError, match=r"manifest.json: num_classes is 5 but sample \d+ \(.*shard-0000\d\d\.tar "
                                        r"sample '\d+'\) has label [5-9]$"):
        ShardSet(root)
    (root / "index.npy").unlink()  # the same check on labels read from the tars
    with pytest.raises(DataError, match="num_classes is 5 but sample"):
        ShardSet(root)


# ---- the tar header parser ------------------------------------------------------------------------------

def _tar_flavours(directory):
    """Tars in every format tarfile writes, with long, prefixed and non-ASCII names, directories,
    links, metadata members and empty members."""
    import tarfile

    png = _png_bytes(np.zeros((3, 3), np.uint8))
    paths = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        long_dir = "d" * 90 + "/" + "e" * 60  # a ustar prefix
        members = [("a/b/k0.png", png), ("a/b/k0.cls", b"3"), (f"{long_dir}/k1.png", png * 3),
                   (f"{long_dir}/k1.cls", b"12"), ("__meta__/info.json", b"{}"), ("k2.PNG", b""),
                   ("ünï/kö.jpg", bytes(512))]
        if fmt != tarfile.USTAR_FORMAT:
            members.append(("x" * 200 + ".png", png))  # GNU long name / pax path
        path = directory / f"format{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for kind, name in ((tarfile.DIRTYPE, "somedir"), (tarfile.SYMTYPE, "alink")):
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = "y" * (150 if fmt != tarfile.USTAR_FORMAT else 50)
                tar.addfile(info)
        paths.append(path)
    return paths


def test_header_parser_reads_tars_as_tarfile_does(tmp_path):
    import mmap
    import tarfile

    from dcscale.data import tarindex

    tars = _tar_flavours(tmp_path)
    _write_with_shardwriter(tmp_path / "wds")  # webdataset's own: a pax header per member
    tars += sorted((tmp_path / "wds").glob("*.tar"))
    for path in tars:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            parsed = list(tarindex._members(buf, path))
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
        assert parsed == expected and expected
        stream = list(wds.WebDataset([str(path)], shardshuffle=False))
        assert [s["__key__"] for s in stream] == [k.decode() for k in tarindex.scan_tar(path).keys]


def test_corrupt_header_is_an_error(digits_train_shards, tmp_path):
    root = _copy(digits_train_shards, tmp_path / "d")
    shard = root / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 40 + 3] ^= 0x20  # a name byte of a header in the middle: the checksum no longer fits
    shard.write_bytes(bytes(data))
    (root / "index.npy").unlink()
    with pytest.raises(DataError, match=r"shard-000001\.tar: corrupt tar header at byte 20480"):
        ShardSet(root)
