"""Random access to a shard set by global index.

`ShardSet(root)` checks the manifest against the tars up front so a bad shard set fails before any
training starts. With the sidecar `index.npy` that builds write (offsets and labels of every sample),
opening costs one stat per tar (present, recorded size) and, for sets built since the index carries a
digest per shard, the digest of the shard counts and the label range, no read of the index's rows (each
shard's rows are checked against their digest when a process first reads them; sets without the counts'
digest get each shard's first and last index row read; older sets get the whole index hashed and their
label column read, labels that disagree with the manifest's class count being an error); without it (or
when stale), every tar's headers are scanned (readable to the end, sample count) and their offsets kept
in memory.
`read(i)` is then one `pread` of the sample's index row, one of the image bytes, and a decode: a
process holds none of the index, and at most `max_open_files` tars open (least recently used closed
first). Descriptors are opened lazily and not pickled, so one ShardSet can be handed to DataLoader
workers; a forked worker may go on using inherited ones (pread shares no file offset).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcscale.data.manifest import MANIFEST_NAME, Manifest, load_manifest, manifest_path
from dcscale.data.tarindex import (DIGEST_SIZE, IMAGE_EXTS, SHARD_COUNTS_KEY, IndexFile, TarIndex, file_sha256,
                                   parse_label, read_labels, scan_tar, shard_counts_sha256)
from dcscale.errors import DataError

log = logging.getLogger(__name__)

_NEARBY = 4096  # read image and label in one pread when this close together
DEFAULT_MAX_OPEN_FILES = 64  # tars open at once in one process (each DataLoader worker is one)
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def _decode(data: bytes, ext: str) -> Image.Image:
    """Decode, trying the format the extension names first (skips PIL's format sniffing), then
    any format (as webdataset does), so a mislabelled file still decodes."""
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[ext]])
    except Exception:
        image = Image.open(io.BytesIO(data))
    image.load()
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8"
_PIL_MODE = {1: "L", 3: "RGB"}


def decode_uint8(data: bytes, ext: str, channels: int):
    """Encoded bytes -> uint8 tensor [channels, H, W], forced to 1 or 3 channels as PIL's
    convert('L' / 'RGB') does (alpha dropped, ITU-R 601-2 luma). Raises on undecodable bytes.

    8-bit non-palette PNGs and 1- or 3-channel JPEGs go through torchvision.io (libpng/libjpeg on
    the bytes, no PIL object: ~30 us instead of ~200 us for a small PNG); everything else (palette
    and 16-bit PNGs, CMYK JPEGs, WebP, mislabelled files) through PIL, so every format PIL reads
    still decodes, with the same pixel values.
    """
    import torch

    image = _decode_fast(data)
    if image is None:
        pil = _decode(data, ext)
        array = np.asarray(pil if pil.mode == _PIL_MODE[channels] else pil.convert(_PIL_MODE[channels]))
        tensor = torch.from_numpy(array.copy())
        return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()
    return _force_channels(image, channels)


def _decode_fast(data: bytes):
    """uint8 [C, H, W] (C in 1..4) through torchvision's libpng/libjpeg ops, or None when the bytes
    need PIL."""
    import torch

    ops = _image_ops()
    if ops is None:
        return None
    _check_pixels(data)  # (outside the try: a bomb is refused, not handed to PIL)
    decode_png, decode_jpeg, unchanged = ops
    try:
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 8 and data[25] in (0, 2, 4, 6):
            # bit depth 8; grey, RGB, grey+alpha, RGBA (palette PNGs decode to indices: PIL instead)
            image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), unchanged, False)
        elif data[:2] == _JPEG_SIGNATURE:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), unchanged, False)
            if image.shape[0] not in (1, 3):  # CMYK: PIL's conversion
                return None
        else:
            return None
    except Exception:  # PIL gets the last word on whether the bytes are undecodable
        return None
    return image if image.dtype == torch.uint8 and image.dim() == 3 else None


def pixel_limit() -> int | None:
    """The most pixels an image may have: PIL's decompression-bomb limit (twice Image.MAX_IMAGE_PIXELS, what
    the folder converter and every PIL decode apply), or None when it is switched off."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _check_pixels(data: bytes) -> None:
    """Raise Image.DecompressionBombError when the header of a PNG or JPEG announces more pixels than
    pixel_limit(): libpng and libjpeg would allocate them all (gigabytes for a file of a few kilobytes)."""
    from dcscale.data.build import header_shape  # (the shard set builder's header parser; imported late: it imports us)

    shape = header_shape(data)
    if shape is not None:
        check_pixels(shape[2], shape[1])


def check_pixels(width: int, height: int) -> None:
    limit = pixel_limit()
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"image of {width}x{height} pixels is beyond the limit of {limit:,} "
                                           f"pixels (a decompression bomb?)")


_IMAGE_OPS: tuple | bool | None = None


def _image_ops():
    """torchvision's decode ops, called directly: the public torchvision.io wrappers warn on every
    call since 0.29 (they point to TorchCodec) and add Python overhead that matters at ~30 us per
    image. None when unavailable (every image then goes through PIL)."""
    global _IMAGE_OPS
    if _IMAGE_OPS is None:
        try:
            import torch
            from torchvision.io.image import ImageReadMode  # loads the image extension

            _IMAGE_OPS = (torch.ops.image.decode_png, torch.ops.image.decode_jpeg, ImageReadMode.UNCHANGED.value)
        except Exception:
            _IMAGE_OPS = False
    return _IMAGE_OPS or None


def _force_channels(image, channels: int):
    """uint8 [C, H, W] with C in 1..4 -> [channels, H, W], as PIL's convert('L') / convert('RGB')."""
    import torch

    source = image.shape[0]
    image = image[:1] if source in (1, 2) else image[:3]  # drop alpha
    if channels == image.shape[0]:
        return image
    if channels == 3:
        return image.expand(3, -1, -1).contiguous()
    # PIL's L24 fixed-point luma: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(3, 1, 1)
    luma = (image.to(torch.int32) * weights).sum(0, keepdim=True).add_(0x8000).bitwise_right_shift_(16)
    return luma.to(torch.uint8)


@dataclass
class Sample:
    index: int  # global index
    image: Image.Image  # decoded (mode as stored: 'L', 'RGB', ...)
    label: int | None  # None when the sample has no label


class ShardSet:
    def __init__(self, root: str | Path, verify: bool = True, max_open_files: int = DEFAULT_MAX_OPEN_FILES):
        """verify=True (the default) checks every tar and the labels now and raises DataError on the
        first problem; verify=False defers each shard's check to its first read. max_open_files:
        how many tars each process keeps open at once."""
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self.max_open_files = max_open_files
        self._starts = self.manifest.shard_starts()
        self._paths = [self.root / s.name for s in self.manifest.shards]
        self._scanned: list[TarIndex | None] = [None] * len(self._paths)  # header scans, without index.npy
        self._labels: np.ndarray | None = None
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard id -> descriptor, least recently used first
        self._warned: set[int] = set()
        self._scanned_instead: set[int] = set()  # shards whose index rows did not match their digest
        self.decode_errors = 0  # undecodable images met by read() in this process
        self._index_file = self._open_index_file()
        self.used_index_file = self._index_file is not None
        if verify:
            for shard_id in range(len(self._paths)):
                # with the sidecar index, present-with-the-recorded-size is the check (the build
                # scanned these very bytes); without it, a header scan of every tar
                self._check_file(shard_id) if self.used_index_file else self._shard_index(shard_id)
            if self.manifest.has_labels and not self._recorded_labels_fit():  # checked against the manifest's
                self._check_labels(self._read_labels())  # class count, not kept: a rank that never asks holds none

    # ---- properties ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.total

    def __repr__(self) -> str:
        return f"ShardSet({str(self.root)!r}, n={len(self)}, shards={len(self._paths)})"

    @property
    def channels(self) -> int | None:
        if self.manifest.image_shape is not None:
            return self.manifest.image_shape[0]
        return self.manifest.channels

    @property
    def image_size(self) -> int | None:
        """Side length of the (square) images; the shorter side when all images share a non-square size."""
        if self.manifest.image_shape is None:
            return None
        return min(self.manifest.image_shape[1:])

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    # ---- index -----------------------------------------------------------------------------
    def _open_index_file(self) -> IndexFile | None:
        """The build's sidecar index when it matches the manifest (else None: the tars get scanned).

        Its size and shard layout are checked. Sets built since per-shard digests exist
        (`index_shard_digests`) are checked lazily: each process compares a shard's block of rows with
        its digest when it first reads that shard (IndexFile.shard_ok), and reads that tar's headers
        instead where they differ (_uses_index), so an open costs no read of the index. Legacy sets with
        only the whole file's sha256 (`index_file_sha256`) get it checked here, at every open: an index
        edited in place (two rows swapped, a label changed) is not used, with a warning, and the tars'
        headers are scanned instead. Sets older still, without any checksum, are read as before."""
        name, size = self.manifest.extra.get("index_file"), self.manifest.extra.get("index_file_size")
        digest = self.manifest.extra.get("index_file_sha256")
        if not name or any(s.size is None for s in self.manifest.shards):
            return None
        path = self.root / name
        try:
            if path.stat().st_size == size:
                shard_digests = self._shard_digests()
                if shard_digests is None and digest is not None and file_sha256(path) != digest:  # the legacy check
                    log.warning("%s: %s does not match the checksum in %s (edited or damaged); not used: reading "
                                "the tars' headers instead (rebuild it with `dcscale shards index`)", self.root, name,
                                MANIFEST_NAME)
                    return None
                counts_digest = self.manifest.extra.get(SHARD_COUNTS_KEY)
                counts_checked = shard_digests is not None and counts_digest is not None
                if counts_checked and counts_digest != shard_counts_sha256([s.count for s in self.manifest.shards]):
                    log.warning("%s: %s lists other shard counts than %s was built for (edited or damaged); not used: "
                                "reading the tars' headers instead", self.root, MANIFEST_NAME, name)
                    return None
                # with digests and the counts checked, an open reads no row of the index
                return IndexFile(path, self.manifest.shard_starts(), shard_digests, check_placement=not counts_checked)
        except (OSError, ValueError):
            pass
        log.info("%s: sidecar index missing or stale, scanning the tars", self.root)
        return None

    def _shard_digests(self) -> bytes | None:
        """The digest of each shard's index rows (32 bytes a shard), checked against its sha256 in the
        manifest; None for sets built before them, or when the file is missing or damaged (then the
        whole index is checked at open, as for a legacy set)."""
        name = self.manifest.extra.get("index_shard_digests")
        digest = self.manifest.extra.get("index_shard_digests_sha256")
        if not name:
            return None
        expected = DIGEST_SIZE * self.num_shards
        try:
            with open(self.root / name, "rb") as f:
                data = f.read(expected + 1)
        except OSError:
            data = b""
        if len(data) == expected and hashlib.sha256(data).hexdigest() == digest:
            return data
        log.warning("%s: %s is missing or does not match the checksum in %s; checking the whole index instead "
                    "(rebuild it with `dcscale shards index`)", self.root, name, MANIFEST_NAME)
        return None

    def _uses_index(self, shard_id: int) -> bool:
        """Whether this shard's samples are read through the sidecar index: with per-shard digests, its
        rows are checked on first use in this process; rows that differ are not used (one warning) and
        the shard's tar headers are scanned instead, its labels checked as at open."""
        if self._index_file is None:
            return False
        if self._index_file.shard_ok(shard_id):
            return True
        if shard_id not in self._scanned_instead:
            log.warning("%s: the rows of shard %d (%s) in %s do not match their checksum (edited or damaged); not "
                        "used: reading that tar's headers instead (rebuild the index with `dcscale shards index`)",
                        self.root, shard_id, self.manifest.shards[shard_id].name, self._index_file.path.name)
            self._shard_index(shard_id)
            if self.manifest.has_labels:
                self._check_labels(self._tar_labels(shard_id), first=self._starts[shard_id])
            self._scanned_instead.add(shard_id)
        return False

    def _recorded_labels_fit(self) -> bool:
        """Whether the label range the build recorded fits the manifest's class count, which stands for
        reading every label when the index is checked shard by shard: a row used is then the build's,
        and a shard read from its tar instead has its labels checked then."""
        recorded = self.manifest.extra.get("index_label_range")
        if self._index_file is None or not self._index_file.checks_shards or not (
                isinstance(recorded, list) and len(recorded) == 2 and all(type(v) is int for v in recorded)):
            return False
        k = self.manifest.num_classes
        return recorded[0] >= -1 and recorded[1] < (2 ** 31 if k is None else k)

    def _shard_index(self, shard_id: int) -> TarIndex:
        """The header scan of one shard (only without the sidecar index), done on first use."""
        index = self._scanned[shard_id]
        if index is None:
            info, path = self.manifest.shards[shard_id], self._paths[shard_id]
            self._check_file(shard_id)
            index = scan_tar(path)
            if len(index) != info.count:
                raise DataError(f"{path}: holds {len(index)} samples but {manifest_path(self.root)} says {info.count}")
            self._scanned[shard_id] = index
        return index

    def _check_file(self, shard_id: int) -> None:
        info, path = self.manifest.shards[shard_id], self._paths[shard_id]
        try:
            found = os.stat(path)  # one system call: this runs at every (re)open of a tar
        except OSError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode):
            raise DataError(f"shard not found: {path} (listed in {manifest_path(self.root)})")
        if info.size is not None and found.st_size != info.size:
            raise DataError(f"{path}: {found.st_size} bytes but the manifest says {info.size} "
                            f"(truncated or replaced since it was indexed)")

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard id, position in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a shard set of {len(self)} samples")
        shard_id = bisect.bisect_right(self._starts, index) - 1
        return shard_id, index - self._starts[shard_id]

    # ---- raw reads -------------------------------------------------------------------------
    def _fd(self, shard_id: int) -> int:
        fd = self._fds.get(shard_id)
        if fd is not None:
            self._fds.move_to_end(shard_id)
            return fd
        self._check_file(shard_id)  # one stat per open: catches a tar changed since it was indexed
        while len(self._fds) >= self.max_open_files:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(self._paths[shard_id], os.O_RDONLY)
        self._fds[shard_id] = fd
        return fd

    def _pread(self, shard_id: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard_id), size, offset)
        if len(data) != size:
            raise DataError(f"{self._paths[shard_id]}: short read at byte {offset} (file truncated after indexing?)")
        return data

    def read_bytes(self, index: int) -> tuple[bytes, str, int | None]:
        """(encoded image bytes, extension, label or None) without decoding."""
        shard_id, pos = self.locate(index)
        if self._uses_index(shard_id):
            row = self._index_file.row(index, shard_id)
            data = self._pread(shard_id, row.image_offset, row.image_size)
            return data, IMAGE_EXTS[row.image_ext], None if row.label < 0 else row.label
        tar = self._shard_index(shard_id)
        offset, size = int(tar.image_offset[pos]), int(tar.image_size[pos])
        ext = IMAGE_EXTS[tar.image_ext[pos]]
        label_offset, label_size = int(tar.label_offset[pos]), int(tar.label_size[pos])
        if label_offset < 0:
            return self._pread(shard_id, offset, size), ext, None
        if 0 <= label_offset - (offset + size) <= _NEARBY:
            # dcscale writes the .cls right after the image: one read for both
            span = self._pread(shard_id, offset, label_offset + label_size - offset)
            return span[:size], ext, parse_label(span[label_offset - offset:], self._where(index))
        data = self._pread(shard_id, offset, size)
        return data, ext, parse_label(self._pread(shard_id, label_offset, label_size), self._where(index))

    def _where(self, index: int) -> str:
        shard_id, pos = self.locate(index)
        if self._index_file is not None and self._index_file.shard_ok(shard_id):  # (a message: no fallback here)
            key = self._index_file.row(index, shard_id).key.rstrip(b"\0")
        else:
            key = self._shard_index(shard_id).keys[pos]
        return f"{self._paths[shard_id]} sample '{key.decode(errors='replace')}'"

    # ---- public reads ----------------------------------------------------------------------
    def read(self, index: int) -> Sample | None:
        """The decoded sample, or None (counted in `decode_errors`, logged once) if its image
        cannot be decoded. Its global index stays reserved either way."""
        data, ext, label = self.read_bytes(index)
        try:
            image = _decode(data, ext)
        except Exception as err:  # PIL raises many types for bad bytes; all mean "undecodable"
            self._undecodable(index, err)
            return None
        return Sample(index=index, image=image, label=label)

    def read_uint8(self, index: int, channels: int):
        """(uint8 tensor [channels, H, W] or None if undecodable, label or None): the batch
        pipelines' read, no PIL object on the common formats (see decode_uint8)."""
        data, ext, label = self.read_bytes(index)
        try:
            return decode_uint8(data, ext, channels), label
        except Exception as err:
            self._undecodable(index, err)
            return None, label

    def _undecodable(self, index: int, err: Exception) -> None:
        """Count, and log once per index, an image that cannot be decoded."""
        self.decode_errors += 1
        if index not in self._warned:
            self._warned.add(index)
            log.warning("skipping undecodable image %d (%s): %s", index, self._where(index), err)

    def labels(self) -> np.ndarray | None:
        """Ground-truth labels by global index (int32, -1 where a sample has none), or None when the
        shard set has no labels. Read from the index's label column (or the .cls members), checked
        against the manifest's class count, and cached."""
        if not self.manifest.has_labels:
            return None
        if self._labels is None:
            labels = self._read_labels()
            self._check_labels(labels)
            self._labels = labels.astype(np.int32, copy=False)
        return self._labels

    def _read_labels(self) -> np.ndarray:
        if self._index_file is not None:
            labels = self._index_file.labels()  # (checks every shard's rows not checked yet as they stream by)
            for shard_id in self._index_file.mismatched_shards():
                self._uses_index(shard_id)  # the warning and the tar's label check, once
                labels[self._starts[shard_id]:self._starts[shard_id + 1]] = self._tar_labels(shard_id)
            return labels
        return np.concatenate([self._tar_labels(s) for s in range(self.num_shards)] or [np.zeros(0, dtype=np.int64)])

    def _tar_labels(self, shard_id: int) -> np.ndarray:
        return read_labels(self._paths[shard_id], self._shard_index(shard_id))

    def _check_labels(self, labels: np.ndarray, first: int = 0) -> None:
        """Every label must be -1 (none) or one of the manifest's classes (without a class count: int32);
        `labels` are those of samples first, first + 1, ..."""
        k = self.manifest.num_classes
        limit = 2 ** 31 if k is None else k
        if not len(labels) or labels.min() >= -1 and labels.max() < limit:
            return
        bad = first + int(np.argmax((labels < -1) | (labels >= limit)))
        allowed = f"num_classes is {k}" if k is not None else "labels are 0..2147483647"
        raise DataError(f"{manifest_path(self.root)}: {allowed} but sample {bad} ({self._where(bad)}) has label "
                        f"{int(labels[bad - first])}")

    # ---- process hand-off ----------------------------------------------------------------------
    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = OrderedDict()
        if self._index_file is not None:
            self._index_file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        # Descriptors are per process (a spawned worker opens its own); the labels are re-read on demand.
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        state["_labels"] = None
        return state
