"""`dcscale shards`: every converter round-trips pixels exactly (PNG), writing is reproducible, and bad
input gives one clear line and exit code 2."""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dcscale.cli import main
from dcscale.data.build import build_cifar10, build_digits, build_folder, build_mnist, build_svhn
from dcscale.data.converters import digits_split_indices
from dcscale.data.manifest import load_manifest
from dcscale.data.shardset import ShardSet
from dcscale.errors import DataError

RNG = np.random.default_rng(0)


def _pixels(shardset: ShardSet) -> np.ndarray:
    return np.stack([np.asarray(shardset.read(i).image) for i in range(len(shardset))])


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
