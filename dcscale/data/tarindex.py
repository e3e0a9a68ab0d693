"""Index one WebDataset tar by scanning its headers: where each sample's image and label bytes are.

Members are grouped into samples by webdataset's own key rule (the path up to the first dot of the
last path component; consecutive members with the same key form one sample), so tars written by
webdataset's ShardWriter with any keys index the same way `webdataset.WebDataset` reads them.
Headers are parsed here, from a memory map of the tar, the way `tarfile` reads them (ustar and GNU
long names, pax extended headers; 8x faster than tarfile on webdataset's tars); tarfile itself
parses the rare rest (sparse members, binary pax names). The sidecar `index.npy` keeps the result
for a whole shard set and is read one row at a time, so a process never holds it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np

from dcscale.errors import DataError
from dcscale.safefile import atomic_write

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


# ---- tar headers ---------------------------------------------------------------------------------

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class _LeaveToTarfile(Exception):
    """A header this parser does not handle; tarfile reads the whole tar instead."""


def _padded(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _text(field: bytes) -> str:
    # tarfile's nts() with its defaults on Linux (file system encoding utf-8, surrogateescape)
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """tarfile.nti: octal digits, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    """tar's checksum: the byte sum of the header with its checksum field read as spaces. adler32's
    low half is 1 + that byte sum mod 65521, a 0.2 us test; tarfile's exact (signed and unsigned)
    sums, at 10 us, only when it fails."""
    stored = _number(header[148:156])
    if (stored - 256 + sum(header[148:156]) + 1) % 65521 == zlib.adler32(header) & 0xFFFF:
        return True
    return stored in tarfile.calc_chksums(header)


def _pax_records(data: bytes) -> dict[str, str]:
    """The keyword=value records of a pax extended header (tarfile._proc_pax)."""
    records, pos = {}, 0
    while match := _PAX_RECORD.match(data, pos):
        length = int(match.group(1))
        if length == 0:
            raise ValueError("invalid pax header")
        value = data[match.end(2) + 1:match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _members(buf, path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member of the tar held in `buf`, as tarfile reads
    them (name from a GNU long name or a pax path, size from pax). Raises DataError on a corrupt or
    truncated tar, _LeaveToTarfile on headers left to tarfile."""
    end, pos = len(buf), 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = buf[pos:pos + _BLOCK]
        if len(header) < _BLOCK:
            raise DataError(f"{path}: truncated (no end-of-archive marker after the last member)")
        if header == _ZERO_BLOCK:  # end of archive; an intact tar ends with two zero blocks
            if end < pos + 2 * _BLOCK:
                raise DataError(f"{path}: truncated (no end-of-archive marker after the last member)")
            return
        try:
            if not _checksum_ok(header):
                raise ValueError("bad checksum")
            size = _number(header[124:136])
            if size < 0:
                raise ValueError(f"size {size}")
        except ValueError as err:
            what = "not a tar file" if pos == 0 else f"corrupt tar header at byte {pos}"
            raise DataError(f"{path}: {what} ({err})") from None
        kind, data = header[156:157], pos + _BLOCK
        if kind in _LONG_NAMES:  # names the next member
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = _text(buf[data:data + size])
            pos = data + _padded(size)
            continue
        if kind in _PAX:
            raw = buf[data:data + size]
            if b"hdrcharset=" in raw or b"GNU.sparse." in raw:
                raise _LeaveToTarfile
            try:
                records = _pax_records(raw)
            except ValueError as err:
                raise DataError(f"{path}: corrupt pax header at byte {pos} ({err})") from None
            if kind == tarfile.XGLTYPE and ("path" in records or "size" in records):
                raise _LeaveToTarfile
            if kind != tarfile.XGLTYPE:
                pax = records
            pos = data + _padded(size)
            continue
        if kind == tarfile.GNUTYPE_SPARSE:
            raise _LeaveToTarfile
        short_name = _text(header[0:100])
        name = short_name
        if header[345]:  # ustar prefix
            name = _text(header[345:500]) + "/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"].rstrip("/")
        if "size" in pax:
            try:
                size = max(int(pax["size"]), 0)
            except ValueError:  # tarfile's reading of a bad size
                size = 0
        long_name, pax = None, {}
        regular = kind in _REGULAR and not (kind == tarfile.AREGTYPE and short_name.endswith("/"))
        pos = data + _padded(size) if regular or kind not in tarfile.SUPPORTED_TYPES else data
        if regular:
            if data + size > end:
                raise DataError(f"{path}: truncated (member {name} runs past the end of the file)")
            yield name, data, size


def _members_by_tarfile(path: Path, file_size: int) -> Iterator[tuple[str, int, int]]:
    """_members through tarfile, for the headers _members leaves to it."""
    end_of_members = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # tarfile keeps every TarInfo otherwise
                end_of_members = info.offset_data + _padded(info.size)
                if not info.isreg():
                    continue
                if info.offset_data + info.size > file_size:
                    raise DataError(f"{path}: truncated (member {info.name} runs past the end of the file)")
                yield info.name, info.offset_data, info.size
    except tarfile.TarError as err:
        raise DataError(f"{path}: truncated or corrupt tar ({err})") from None
    # tarfile stops silently at a cut-off header; an intact tar ends with two zero blocks.
    if file_size < end_of_members + 2 * _BLOCK:
        raise DataError(f"{path}: truncated (no end-of-archive marker after the last member)")


# ---- samples -------------------------------------------------------------------------------------

class _SampleGroup:
    __slots__ = ("key", "image", "label")

    def __init__(self, key: str):
        self.key = key
        self.image: tuple[int, int, int] | None = None  # (ext rank, offset, size)
        self.label: tuple[int, int] | None = None  # (offset, size)


def scan_tar(path: str | Path) -> TarIndex:
    """Scan a plain (uncompressed) tar; raise DataError naming the file if it is unreadable,
    truncated, or holds a sample without an image."""
    return _scan(Path(path))[0]


def read_tar(path: str | Path, image_info: Callable[[bytes, str], object]) -> tuple[TarIndex, np.ndarray, list]:
    """Index a tar in one pass over its bytes: its TarIndex, the labels (int64, -1 where a sample has
    none; a label outside 0..2^31-1 is an error) and `image_info(image bytes, where)` for every
    sample, in order."""
    return _scan(Path(path), image_info)


def _scan(path: Path, image_info=None):
    if not path.is_file():
        raise DataError(f"shard not found: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                raise DataError(f"{path}: compressed tar; random access needs plain (uncompressed) .tar shards")
            file_size = os.fstat(f.fileno()).st_size
            if file_size == 0:
                raise DataError(f"{path}: empty file, not a tar")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    groups = _group(_members(buf, path))
                except _LeaveToTarfile:
                    groups = _group(_members_by_tarfile(path, file_size))
                for group in groups:
                    if group.image is None:
                        raise DataError(f"{path}: sample '{group.key}' has no image "
                                        f"({'/'.join('.' + e for e in IMAGE_EXTS)})")
                index = _to_index(groups)
                if image_info is None:
                    return index, None, None
                labels = np.full(len(groups), -1, dtype=np.int64)
                infos = []
                for pos, group in enumerate(groups):
                    where = f"{path} sample '{group.key}'"
                    if group.label is not None:
                        offset, size = group.label
                        labels[pos] = label = parse_label(buf[offset:offset + size], where)
                        if not 0 <= label < 2 ** 31:  # -1 means "none" here, int32 in ShardSet.labels()
                            raise DataError(f"{where}: class label {label} out of range (0..{2 ** 31 - 1})")
                    _, offset, size = group.image
                    infos.append(image_info(buf[offset:offset + size], where))
                return index, labels, infos
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def _group(members: Iterator[tuple[str, int, int]]) -> list[_SampleGroup]:
    groups: list[_SampleGroup] = []
    current: _SampleGroup | None = None
    for name, offset, size in members:
        if _META_RE.match(name):
            continue
        key, ext = split_key(name)
        if key is None:
            continue
        ext = ext.lower()  # webdataset lowercases extensions too
        if current is None or current.key != key:
            current = _SampleGroup(key)
            groups.append(current)
        if ext in IMAGE_EXTS:
            rank = IMAGE_EXTS.index(ext)
            if current.image is None or rank < current.image[0]:
                current.image = (rank, offset, size)
        elif ext == LABEL_EXT:
            current.label = (offset, size)
    return groups


def _to_index(groups: list[_SampleGroup]) -> TarIndex:
    n = len(groups)
    return TarIndex(
        keys=np.array([g.key.encode("utf-8", "surrogateescape") for g in groups], dtype="S") if n
        else np.zeros(0, dtype="S1"),
        image_offset=np.array([g.image[1] for g in groups], dtype=np.int64),
        image_size=np.array([g.image[2] for g in groups], dtype=np.int64),
        image_ext=np.array([g.image[0] for g in groups], dtype=np.uint8),
        label_offset=np.array([g.label[0] if g.label else -1 for g in groups], dtype=np.int64),
        label_size=np.array([g.label[1] if g.label else 0 for g in groups], dtype=np.int64),
    )


def parse_label(data: bytes, where: str) -> int:
    """A .cls member holds an ASCII integer (as webdataset writes it)."""
    try:
        return int(bytes(data).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: label (.cls) is not an integer: {bytes(data[:20])!r}") from None


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
# sha256 of each shard's block of index rows, 32 bytes a shard in shard order (3.2 MB for 100k shards);
# its own sha256 is in the manifest, so every rank parses 64 characters there, not a digest a shard
INDEX_DIGESTS_FILE = "index.sha256"
DIGEST_SIZE = 32
SHARD_COUNTS_KEY = "index_shard_counts_sha256"  # the manifest's `extra` entry of shard_counts_sha256
_FIELDS = ("shard", "key", "image_offset", "image_size", "image_ext", "label_offset", "label_size", "label")


def _index_dtype(key_len: int) -> np.dtype:
    return np.dtype([("shard", "<i4"), ("key", f"S{max(key_len, 1)}"), ("image_offset", "<i8"),
                     ("image_size", "<i8"), ("image_ext", "u1"), ("label_offset", "<i8"), ("label_size", "<i8"),
                     ("label", "<i8")])


def _index_rows(indexes: list[TarIndex], labels: list[np.ndarray]) -> np.ndarray:
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
    return rows


def save_index(directory: str | Path, indexes: list[TarIndex], labels: list[np.ndarray]) -> dict:
    """Write index.npy and the digest of each shard's block of rows (index.sha256) into `directory`;
    returns the manifest's `extra` entries that record them. A reader checks only the blocks of the
    shards it reads (IndexFile.shard_ok); the whole file's sha256 stays for readers older than the
    per-shard digests, which check it at every open."""
    directory = Path(directory)
    rows = _index_rows(indexes, labels)
    path = directory / INDEX_FILE
    atomic_write(path, lambda f: np.save(f, rows, allow_pickle=False))
    bounds = np.cumsum([0] + [len(i) for i in indexes])
    digests = b"".join(hashlib.sha256(rows[start:stop].tobytes()).digest()
                       for start, stop in zip(bounds, bounds[1:]))
    atomic_write(directory / INDEX_DIGESTS_FILE, lambda f: f.write(digests))
    label_range = [int(rows["label"].min()), int(rows["label"].max())] if len(rows) else None
    return {"index_file": INDEX_FILE, "index_file_size": path.stat().st_size, "index_file_sha256": file_sha256(path),
            "index_shard_digests": INDEX_DIGESTS_FILE, "index_shard_digests_sha256": hashlib.sha256(digests).hexdigest(),
            SHARD_COUNTS_KEY: shard_counts_sha256([len(i) for i in indexes]),
            "index_label_range": label_range}


def shard_counts_sha256(counts: list[int]) -> str:
    """The digest of the shards' sample counts as indexed: a manifest whose counts were changed since is
    caught at open from the manifest alone, where otherwise each shard's first and last index rows would
    be read at every open (2 reads a shard: 200k at 100k shards, on every rank)."""
    return hashlib.sha256(np.asarray(counts, dtype="<i8").tobytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (the sidecar index's checksum in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 14), b""):  # 16 KB: a shard set opens in bounded memory
            h.update(block)
    return h.hexdigest()


_UNCHECKED, _MATCHES, _DIFFERS = 0, 1, 2  # a shard's rows against their digest


class IndexRow(NamedTuple):
    """One sample's entry of the sidecar index."""

    shard: int
    key: bytes
    image_offset: int
    image_size: int
    image_ext: int
    label_offset: int
    label_size: int
    label: int  # -1: none


class IndexFile:
    """The sidecar index.npy, read one row at a time (`pread`) or its label column in chunks, so a
    process holds none of it whatever the shard set's size. The descriptor opens on first use and is
    not pickled; a forked process may go on using an inherited one (pread shares no file offset).

    With `shard_digests` (the sha256 of each shard's block of rows, sets built since they exist),
    nothing is hashed at open: the first time a process touches a shard's rows (row(), or labels()
    streaming past them), that block is checked against its digest, once, and trusted from then on
    (`shard_ok`). Without them every row is trusted (the caller checked the whole file, or the set
    predates any checksum)."""

    def __init__(self, path: Path, shard_starts: list[int], shard_digests: bytes | None = None,
                 check_placement: bool = True):
        """Raises ValueError if `path` is not an index, in the format written above, of a shard set
        whose shards start at these global indices. check_placement=False skips reading each shard's
        first and last rows, for a caller that checked the shard counts otherwise (shard_counts_sha256)
        and has digests (which check each shard's rows, and so their place, on first use)."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            self._data_start = f.tell()
        if dtype.names != _FIELDS or dtype != _index_dtype(dtype["key"].itemsize) or shape != (shard_starts[-1],):
            raise ValueError(f"not an index of {shard_starts[-1]} samples (shape {shape}, dtype {dtype})")
        num_shards = len(shard_starts) - 1
        if shard_digests is not None and len(shard_digests) != DIGEST_SIZE * num_shards:
            raise ValueError(f"{len(shard_digests)} bytes of shard digests for {num_shards} shards")
        self.path = path
        self._dtype = dtype
        self._starts = np.asarray(shard_starts, dtype=np.int64)
        self._fd: int | None = None  # with _row, opened on first use in each process
        self._row: struct.Struct | None = None
        self._digests = shard_digests
        # per shard: _UNCHECKED, _MATCHES or _DIFFERS (None: no digests, every row trusted)
        self._checked = None if shard_digests is None else \
            bytearray(_UNCHECKED if n else _MATCHES for n in np.diff(self._starts))
        # rows are in shard order: a shard's first and last rows place it where the manifest does
        for shard_id, (start, stop) in enumerate(zip(shard_starts, shard_starts[1:]) if check_placement else ()):
            if stop > start and not self._read_row(start).shard == self._read_row(stop - 1).shard == shard_id:
                self.close()
                raise ValueError(f"shard {shard_id} is not at rows {start}..{stop - 1}")

    @property
    def checks_shards(self) -> bool:
        """Whether rows are checked shard by shard against digests."""
        return self._checked is not None

    def shard_ok(self, shard_id: int) -> bool:
        """Whether the rows of this shard may be used: on the first call in a process, its block is
        read and compared with its digest."""
        if self._checked is None:
            return True
        if self._checked[shard_id] == _UNCHECKED:
            start, stop = (int(v) * self._dtype.itemsize for v in self._starts[shard_id:shard_id + 2])
            digest, fd = hashlib.sha256(), self._descriptor()
            for at in range(start, stop, 1 << 20):  # a shard of any size in 1 MB reads
                size = min(1 << 20, stop - at)
                data = os.pread(fd, size, self._data_start + at)
                if len(data) != size:
                    raise DataError(f"{self.path}: short read in the rows of shard {shard_id} (file truncated?)")
                digest.update(data)
            self._settle(shard_id, digest)
        return self._checked[shard_id] == _MATCHES

    def mismatched_shards(self) -> list[int]:
        """The shards whose rows were found not to match their digest (so far, in this process)."""
        if self._checked is None:
            return []
        return [shard_id for shard_id, state in enumerate(self._checked) if state == _DIFFERS]

    def _settle(self, shard_id: int, digest) -> None:
        expected = self._digests[shard_id * DIGEST_SIZE:(shard_id + 1) * DIGEST_SIZE]
        self._checked[shard_id] = _MATCHES if digest.digest() == expected else _DIFFERS

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._row = struct.Struct(f"<i{self._dtype['key'].itemsize}sqqBqqq")  # the dtype's packed layout
        return self._fd

    def row(self, index: int, shard_id: int | None = None) -> IndexRow:
        """The row of global index `index` (key padded with NULs), checked to belong to shard
        `shard_id` when given. With digests, a row of a shard whose block does not match is an error
        (callers ask shard_ok first and read that shard's tar instead)."""
        if self._checked is not None:
            # (the readers pass the shard they located: no second search on this per-sample path)
            owner = shard_id if shard_id is not None else int(np.searchsorted(self._starts, index, side="right")) - 1
            if not self.shard_ok(owner):
                raise DataError(f"{self.path}: the rows of shard {owner} do not match their checksum (edited or "
                                f"damaged; rebuild the index with `dcscale shards index`)")
        row = self._read_row(index)
        if shard_id is not None and row.shard != shard_id:
            raise self._stale(index, row.shard, shard_id)
        return row

    def _read_row(self, index: int) -> IndexRow:
        data = os.pread(self._descriptor(), self._row.size, self._data_start + index * self._row.size)
        if len(data) != self._row.size:
            raise DataError(f"{self.path}: short read at row {index} (file truncated?)")
        return IndexRow._make(self._row.unpack(data))

    def labels(self, chunk_rows: int = 1 << 16) -> np.ndarray:
        """The label column (int32, -1 where a sample has none), read in chunks of rows. With digests,
        every block not checked yet is checked as it streams by (no extra read); the labels of the
        shards in mismatched_shards() afterwards are not to be used."""
        total, itemsize = int(self._starts[-1]), self._dtype.itemsize
        labels = np.empty(total, np.int32)
        digests: dict[int, object] = {}  # shards being hashed, by id
        with open(self.path, "rb") as f:
            f.seek(self._data_start)
            for start in range(0, total, chunk_rows):
                data = f.read(min(chunk_rows, total - start) * itemsize)
                rows = np.frombuffer(data, dtype=self._dtype, count=len(data) // itemsize)
                stop = start + len(rows)
                if stop != min(start + chunk_rows, total):
                    raise DataError(f"{self.path}: short read at row {stop} (file truncated?)")
                if self._checked is not None:
                    self._hash_blocks(start, stop, data, digests)
                    labels[start:stop] = rows["label"]  # (a mismatched block's may wrap: not used)
                    continue
                expected = np.searchsorted(self._starts, np.arange(start, stop), side="right") - 1
                if not np.array_equal(rows["shard"], expected):
                    bad = int(np.argmax(rows["shard"] != expected))
                    raise self._stale(start + bad, int(rows["shard"][bad]), int(expected[bad]))
                if not -2 ** 31 <= rows["label"].min() <= rows["label"].max() < 2 ** 31:
                    raise DataError(f"{self.path}: a label beyond the int32 range in rows {start}..{stop - 1}")
                labels[start:stop] = rows["label"]
        return labels

    def _hash_blocks(self, start: int, stop: int, data: bytes, digests: dict) -> None:
        """Feed rows start..stop-1 (`data`) to the digests of the unchecked shards they belong to."""
        itemsize = self._dtype.itemsize
        shard_id = int(np.searchsorted(self._starts, start, side="right")) - 1
        while shard_id < len(self._checked) and self._starts[shard_id] < stop:
            first, end = int(self._starts[shard_id]), int(self._starts[shard_id + 1])
            if self._checked[shard_id] == _UNCHECKED:
                if first >= start:  # the block starts in this chunk (else it was unchecked at its start too)
                    digests[shard_id] = hashlib.sha256()
                lo, hi = max(first, start), min(end, stop)
                digests[shard_id].update(data[(lo - start) * itemsize:(hi - start) * itemsize])
                if end <= stop:
                    self._settle(shard_id, digests.pop(shard_id))
            shard_id += 1

    def _stale(self, index: int, found: int, expected: int) -> DataError:
        return DataError(f"{self.path}: row {index} is for shard {found} but the manifest puts it in shard "
                         f"{expected} (stale index; rebuild it with `dcscale shards index`)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_row": None}
