"""The sidecar index is checked shard by shard: an open reads none of index.npy, a process checks a
shard's block of rows against its digest the first time it reads that shard, and a block that does
not match is replaced by a header scan of that shard's tar (one warning). Sets built before the
per-shard digests keep their whole-file check (or none), as before."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dcscale.data.build import build_digits, index_tars
from dcscale.data.shardset import ShardSet
from dcscale.errors import DataError

SAMPLES_PER_SHARD = 100  # digits train: 1437 samples -> 15 shards
DAMAGED_SHARD = 3
NEW_KEYS = ("index_shard_digests", "index_shard_digests_sha256", "index_shard_counts_sha256", "index_label_range")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index-checksum") / "train"
    build_digits(out, split="train", samples_per_shard=SAMPLES_PER_SHARD)
    return out


@pytest.fixture(scope="module")
def truth(built):
    """Every sample's (image bytes, label) and the labels, read from the intact set."""
    shards = ShardSet(built)
    return [shards.read_bytes(i) for i in range(len(shards))], shards.labels().copy()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_rows(root: Path, edit) -> None:
    """Edit index.npy in place (same size and header, same shard layout)."""
    rows = np.load(root / "index.npy")
    edit(rows)
    with open(root / "index.npy", "r+b") as f:
        np.save(f, rows, allow_pickle=False)


def _shard_rows(root: Path, shard_id: int) -> range:
    starts = np.cumsum([0] + [s["count"] for s in json.loads((root / "manifest.json").read_text())["shards"]])
    return range(int(starts[shard_id]), int(starts[shard_id + 1]))


def _swap_two_rows(rows, labels, inside: range):
    """Two samples of different classes in `inside` swap rows: each image now carries the other's label."""
    a = inside.start
    b = next(i for i in inside if labels[i] != labels[a])
    rows[[a, b]] = rows[[b, a]]
    rows["shard"][[a, b]] = rows["shard"][a]


def _bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _index_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "index.npy" in r.getMessage() or "index.sha256" in r.getMessage()]


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="counts bytes read through /proc/self/io")
def test_an_open_reads_none_of_the_index(built, tmp_path):
    index_size = (built / "index.npy").stat().st_size
    ShardSet(built).labels()  # (imports, caches: the measured opens below read only what an open reads)
    before = _bytes_read()
    shards = ShardSet(built)  # verify=True: every tar's size, the manifest's class count against the labels
    opened = _bytes_read() - before
    # the manifest, the index header and 32 bytes a shard of digests: no row of the index
    assert shards.used_index_file and opened < index_size / 4, (opened, index_size)

    # Nothing an open reads grows with the shards but the manifest and the digests (100k shards would
    # otherwise be 200k reads of rows at every open of every rank): the same images in 4x as many shards.
    finer = tmp_path / "finer"
    build_digits(finer, split="train", samples_per_shard=SAMPLES_PER_SHARD // 4)
    ShardSet(finer).labels()
    before = _bytes_read()
    assert ShardSet(finer).num_shards > 3 * shards.num_shards
    opened_finer = _bytes_read() - before

    def listing_bytes(root):
        return sum((root / name).stat().st_size for name in ("manifest.json", "index.sha256"))

    grown = (opened_finer - opened) - (listing_bytes(finer) - listing_bytes(built))
    assert abs(grown) < 32, (opened_finer, opened)  # under one row (~54 bytes); the rows were 2 a shard

    before = _bytes_read()
    shards.read_bytes(_shard_rows(built, DAMAGED_SHARD).start + 5)
    one_shard = _bytes_read() - before  # that shard's block of rows, once, and the image
    assert one_shard < 2 * index_size / 15, (one_shard, index_size)

    # a legacy set (only the whole file's sha256 in the manifest) still hashes the whole index at every open
    legacy = _copy(built, tmp_path / "legacy")
    raw = json.loads((legacy / "manifest.json").read_text())
    for key in NEW_KEYS:
        raw["extra"].pop(key)
    (legacy / "manifest.json").write_text(json.dumps(raw))
    before = _bytes_read()
    ShardSet(legacy)
    assert _bytes_read() - before >= 2 * index_size  # the checksum, then the label column


@pytest.mark.parametrize("damage", ["two rows swapped", "a label changed", "a label out of range"])
def test_damaged_rows_are_found_when_their_shard_is_read(built, truth, tmp_path, caplog, damage):
    samples, labels = truth
    root = _copy(built, tmp_path / "set")
    inside = _shard_rows(root, DAMAGED_SHARD)
    victim = inside.start + 7

    def edit(rows):
        if damage == "two rows swapped":
            _swap_two_rows(rows, labels, inside)
        else:
            rows["label"][victim] = (labels[victim] + 1) % 10 if damage == "a label changed" else 99

    _edit_rows(root, edit)
    caplog.clear()
    shards = ShardSet(root)  # verify=True: nothing of shard 3's rows is read yet
    for i in range(inside.start):  # shards 0..2
        assert shards.read_bytes(i) == samples[i]
    assert _index_warnings(caplog) == [] and shards.used_index_file

    for i in inside:  # what a user gets is what the tars hold
        assert shards.read_bytes(i) == samples[i]
    assert shards.read(victim).label == labels[victim]
    (warning,) = _index_warnings(caplog)  # once for the shard, however many of its samples are read
    assert "shard 3 (shard-000003.tar)" in warning and "do not match their checksum" in warning
    assert "reading that tar's headers instead" in warning and "\n" not in warning
    assert np.array_equal(shards.labels(), labels) and len(_index_warnings(caplog)) == 1
    for i in range(inside.stop, len(shards)):  # the other shards still read through the index
        assert shards.read_bytes(i) == samples[i]
    assert shards._scanned_instead == {DAMAGED_SHARD}


def test_the_label_column_checks_every_shard_as_it_streams_by(built, truth, tmp_path, caplog):
    samples, labels = truth
    root = _copy(built, tmp_path / "set")
    _edit_rows(root, lambda rows: _swap_two_rows(rows, labels, _shard_rows(root, DAMAGED_SHARD)))
    caplog.clear()
    shards = ShardSet(root)
    assert np.array_equal(shards.labels(), labels)  # shard 3's labels from its tar
    (warning,) = _index_warnings(caplog)
    assert "shard 3 " in warning
    assert shards._index_file.mismatched_shards() == [DAMAGED_SHARD]
    for i in _shard_rows(root, DAMAGED_SHARD):  # checked once: no second warning, no second hash
        assert shards.read_bytes(i) == samples[i]
    assert len(_index_warnings(caplog)) == 1


def test_sets_built_before_the_digests_open_as_before(built, truth, tmp_path, caplog):
    samples, labels = truth
    for name, dropped in (("whole-file checksum", NEW_KEYS), ("no checksum", NEW_KEYS + ("index_file_sha256",))):
        root = _copy(built, tmp_path / name)
        raw = json.loads((root / "manifest.json").read_text())
        for key in dropped:
            raw["extra"].pop(key)
        (root / "manifest.json").write_text(json.dumps(raw))
        (root / "index.sha256").unlink()
        caplog.clear()
        shards = ShardSet(root)
        assert shards.used_index_file and _index_warnings(caplog) == []
        assert np.array_equal(shards.labels(), labels) and shards.read_bytes(400) == samples[400]

    # legacy with the whole-file checksum: an edit anywhere is found at open, and the tars are scanned
    root = tmp_path / "whole-file checksum"
    _edit_rows(root, lambda rows: _swap_two_rows(rows, labels, _shard_rows(root, DAMAGED_SHARD)))
    caplog.clear()
    shards = ShardSet(root)
    (warning,) = _index_warnings(caplog)
    assert "does not match the checksum" in warning and not shards.used_index_file
    assert np.array_equal(shards.labels(), labels)


def test_a_damaged_digest_file_falls_back_to_the_whole_file_check(built, truth, tmp_path, caplog):
    samples, labels = truth
    root = _copy(built, tmp_path / "set")
    digests = bytearray((root / "index.sha256").read_bytes())
    digests[5] ^= 1
    (root / "index.sha256").write_bytes(bytes(digests))
    caplog.clear()
    shards = ShardSet(root)
    (warning,) = _index_warnings(caplog)
    assert "index.sha256 is missing or does not match the checksum" in warning
    assert shards.used_index_file and np.array_equal(shards.labels(), labels)  # the index itself is intact

    _edit_rows(root, lambda rows: _swap_two_rows(rows, labels, _shard_rows(root, 0)))
    assert not ShardSet(root).used_index_file  # the whole-file checksum catches it, as for a legacy set


def test_both_builds_record_each_shards_digest(built, tmp_path):
    """`dcscale shards` and `dcscale shards index` write index.sha256: the sha256 of each shard's rows."""
    tars = sorted(built.glob("*.tar"))
    indexed = tmp_path / "indexed"
    index_tars(tars, indexed)
    for root in (built, indexed):
        extra = json.loads((root / "manifest.json").read_text())["extra"]
        data = (root / extra["index_shard_digests"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == extra["index_shard_digests_sha256"]
        assert extra["index_file_sha256"] == hashlib.sha256((root / "index.npy").read_bytes()).hexdigest()
        rows = np.load(root / "index.npy")
        assert extra["index_label_range"] == [int(rows["label"].min()), int(rows["label"].max())]
        expected = b"".join(hashlib.sha256(rows[_shard_rows(root, s).start:_shard_rows(root, s).stop].tobytes())
                            .digest() for s in range(len(tars)))
        assert data == expected and len(data) == 32 * len(tars)
        counts = np.diff([_shard_rows(root, s).start for s in range(len(tars))] + [len(rows)])
        assert extra["index_shard_counts_sha256"] == hashlib.sha256(counts.astype("<i8").tobytes()).hexdigest()
        assert ShardSet(root).used_index_file


def _shift_one_sample(root: Path, drop: tuple[str, ...] = ()) -> None:
    """The manifest says shard 0 holds one sample fewer and shard 1 one more (total unchanged)."""
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["count"] -= 1
    raw["shards"][1]["count"] += 1
    for key in drop:
        raw["extra"].pop(key)
    (root / "manifest.json").write_text(json.dumps(raw))


def test_edited_shard_counts_are_found_at_open(built, tmp_path, caplog):
    # The open reads no index row, yet counts changed in the manifest still fail the open, before any
    # training: their digest (from the manifest alone) differs, so the tars' headers are read instead.
    root = _copy(built, tmp_path / "set")
    _shift_one_sample(root)
    caplog.clear()
    with pytest.raises(DataError, match=rf"shard-000000\.tar: holds {SAMPLES_PER_SHARD} samples but .*says "
                                        rf"{SAMPLES_PER_SHARD - 1}"):
        ShardSet(root)
    (warning,) = _index_warnings(caplog)
    assert "manifest.json lists other shard counts than index.npy was built for" in warning

    # a set built before the counts' digest: each shard's first and last rows place it, as before
    previous = _copy(built, tmp_path / "previous")
    _shift_one_sample(previous, drop=("index_shard_counts_sha256",))
    with pytest.raises(DataError, match=rf"holds {SAMPLES_PER_SHARD} samples but"):
        ShardSet(previous)
