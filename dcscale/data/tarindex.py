"""Index one WebDataset tar by scanning its headers: where each sample's image and label bytes are.

Members are grouped into samples by webdataset's own key rule (the path up to the first dot of the
last path component; consecutive members with the same key form one sample), so tars written by
webdataset's ShardWriter with any keys index the same way `webdataset.WebDataset` reads them.
Only headers are read (tarfile seeks over member data), which keeps verifying a shard set fast.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcscale.errors import DataError

# Image extensions a sample may carry, in the order we prefer when a sample has several.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
LABEL_EXT = "cls"

# webdataset.tariterators.base_plus_ext: key = everything before the first dot of the last component.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset skips metadata members named like __meta__ (tariterators.tar_file_iterator).
_META_RE = re.compile(r"__[^/]*__($|/)")


def split_key(name: str) -> tuple[str | None, str | None]:
    """'a/b/img_01.seg.png' -> ('a/b/img_01', 'seg.png'); (None, None) for names without a dot."""
    match = _KEY_RE.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


@dataclass
class TarIndex:
    """Byte locations of the samples of one tar (arrays indexed by position in the tar)."""

    keys: np.ndarray  # bytes ('S'), the sample keys, for messages
    image_offset: np.ndarray  # int64, start of the image bytes
    image_size: np.ndarray  # int64
    image_ext: np.ndarray  # uint8, index into IMAGE_EXTS
    label_offset: np.ndarray  # int64, start of the .cls bytes, -1 when the sample has no label
    label_size: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.image_offset)


class _SampleGroup:
    __slots__ = ("key", "image", "label")

    def __init__(self, key: str):
        self.key = key
        self.image: tuple[int, int, int] | None = None  # (ext rank, offset, size)
        self.label: tuple[int, int] | None = None  # (offset, size)


def scan_tar(path: str | Path) -> TarIndex:
    """Scan a plain (uncompressed) tar; raise DataError naming the file if it is unreadable,
    truncated, or holds a sample without an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard not found: {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise DataError(f"{path}: compressed tar; random access needs plain (uncompressed) .tar shards")
    groups: list[_SampleGroup] = []
    current: _SampleGroup | None = None
    end_of_members = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members = []  # tarfile keeps every TarInfo otherwise; we keep our own arrays
                end_of_members = info.offset_data + _padded(info.size)
                if not info.isreg() or _META_RE.match(info.name):
                    continue
                if info.offset_data + info.size > file_size:
                    raise DataError(f"{path}: truncated (member {info.name} runs past the end of the file)")
                key, ext = split_key(info.name)
                if key is None:
                    continue
                ext = ext.lower()  # webdataset lowercases extensions too
                if current is None or current.key != key:
                    current = _SampleGroup(key)
                    groups.append(current)
                if ext in IMAGE_EXTS:
                    rank = IMAGE_EXTS.index(ext)
                    if current.image is None or rank < current.image[0]:
                        current.image = (rank, info.offset_data, info.size)
                elif ext == LABEL_EXT:
                    current.label = (info.offset_data, info.size)
    except tarfile.TarError as err:
        raise DataError(f"{path}: truncated or corrupt tar ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    # tarfile stops silently at a cut-off header; an intact tar ends with two zero blocks.
    if file_size < end_of_members + 2 * tarfile.BLOCKSIZE:
        raise DataError(f"{path}: truncated (no end-of-archive marker after the last member)")

    for group in groups:
        if group.image is None:
            raise DataError(f"{path}: sample '{group.key}' has no image "
                            f"({'/'.join('.' + e for e in IMAGE_EXTS)})")
    n = len(groups)
    return TarIndex(
        keys=np.array([g.key.encode() for g in groups], dtype="S") if n else np.zeros(0, dtype="S1"),
        image_offset=np.array([g.image[1] for g in groups], dtype=np.int64),
        image_size=np.array([g.image[2] for g in groups], dtype=np.int64),
        image_ext=np.array([g.image[0] for g in groups], dtype=np.uint8),
        label_offset=np.array([g.label[0] if g.label else -1 for g in groups], dtype=np.int64),
        label_size=np.array([g.label[1] if g.label else 0 for g in groups], dtype=np.int64),
    )


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def parse_label(data: bytes, where: str) -> int:
    """A .cls member holds an ASCII integer (as webdataset writes it)."""
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: label (.cls) is not an integer: {data[:20]!r}") from None


def read_labels(path: str | Path, index: TarIndex) -> np.ndarray:
    """The .cls values of one indexed tar (int64, -1 where a sample has none)."""
    labels = np.full(len(index), -1, dtype=np.int64)
    with open(path, "rb") as f:
        for pos in np.flatnonzero(index.label_offset >= 0):
            f.seek(int(index.label_offset[pos]))
            where = f"{path} sample '{index.keys[pos].decode(errors='replace')}'"
            labels[pos] = parse_label(f.read(int(index.label_size[pos])), where)
    return labels


# ---- sidecar index: the scan results of a whole shard set, so opening it does not rescan ----------

INDEX_FILE = "index.npy"


def _index_dtype(key_len: int) -> np.dtype:
    return np.dtype([("shard", "<i4"), ("key", f"S{max(key_len, 1)}"), ("image_offset", "<i8"),
                     ("image_size", "<i8"), ("image_ext", "u1"), ("label_offset", "<i8"), ("label_size", "<i8"),
                     ("label", "<i8")])


def save_index_file(path: str | Path, indexes: list[TarIndex], labels: list[np.ndarray]) -> int:
    """Write one structured .npy row per sample (deterministic bytes); returns the file size."""
    key_len = max((idx.keys.dtype.itemsize for idx in indexes if len(idx)), default=1)
    rows = np.zeros(sum(len(i) for i in indexes), dtype=_index_dtype(key_len))
    start = 0
    for shard_id, (idx, lab) in enumerate(zip(indexes, labels)):
        part = rows[start:start + len(idx)]
        part["shard"] = shard_id
        for name in ("key", "image_offset", "image_size", "image_ext", "label_offset", "label_size"):
            part[name] = getattr(idx, name if name != "key" else "keys")
        part["label"] = lab
        start += len(idx)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, rows, allow_pickle=False)
    tmp.replace(path)
    return path.stat().st_size


def load_index_file(path: str | Path, counts: list[int]) -> tuple[list[TarIndex], np.ndarray] | None:
    """Per-shard TarIndex views and the labels, or None if the file is missing or does not fit
    the shard counts (then the caller scans the tars)."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if rows.dtype.names is None or "label" not in rows.dtype.names or len(rows) != sum(counts):
        return None
    shard = rows["shard"]
    if not np.array_equal(np.bincount(shard, minlength=len(counts))[:len(counts)], counts) \
            or (len(shard) and shard.max() >= len(counts)):
        return None
    indexes, start = [], 0
    for count in counts:
        part = rows[start:start + count]
        indexes.append(TarIndex(keys=part["key"], image_offset=part["image_offset"], image_size=part["image_size"],
                                image_ext=part["image_ext"], label_offset=part["label_offset"],
                                label_size=part["label_size"]))
        start += count
    return indexes, rows["label"]
