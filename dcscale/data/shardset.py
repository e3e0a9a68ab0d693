"""Random access to a shard set by global index.

`ShardSet(root)` checks the manifest against the tars up front so a bad shard set fails before any
training starts, and keeps a per-shard offset index in memory. With the sidecar `index.npy` that
builds write (offsets and labels of every sample, from a scan at build time), opening costs one
stat per tar (present, recorded size); without it (or when stale), every tar's headers are scanned
(readable to the end, sample count). `read(i)` is then one `pread` of the image bytes plus a decode. File
descriptors are opened lazily per process, so one ShardSet can be handed to DataLoader workers.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcscale.data.manifest import Manifest, load_manifest, manifest_path
from dcscale.data.tarindex import IMAGE_EXTS, TarIndex, load_index_file, parse_label, read_labels, scan_tar
from dcscale.errors import DataError

log = logging.getLogger(__name__)

_NEARBY = 4096  # read image and label in one pread when this close together
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
    def __init__(self, root: str | Path, verify: bool = True):
        """verify=True (the default) scans every tar now and raises DataError on the first
        problem; verify=False defers each shard's scan to its first read."""
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self._starts = np.array(self.manifest.shard_starts(), dtype=np.int64)
        self._paths = [self.root / s.name for s in self.manifest.shards]
        self._index: list[TarIndex | None] = [None] * len(self._paths)
        self._labels: np.ndarray | None = None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._warned: set[int] = set()
        self.decode_errors = 0  # undecodable images met by read() in this process
        self.used_index_file = self._load_index_file()
        if verify:
            for shard_id in range(len(self._paths)):
                # with the sidecar index, present-with-the-recorded-size is the check (the build
                # scanned these very bytes); without it, a header scan of every tar
                self._check_file(shard_id) if self.used_index_file else self._shard_index(shard_id)

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
    def _shard_index(self, shard_id: int) -> TarIndex:
        index = self._index[shard_id]
        if index is None:
            index = self._scan(shard_id)
            self._index[shard_id] = index
        return index

    def _load_index_file(self) -> bool:
        """Take the offsets (and labels) from the build's sidecar index when it matches the manifest."""
        name, size = self.manifest.extra.get("index_file"), self.manifest.extra.get("index_file_size")
        if not name or any(s.size is None for s in self.manifest.shards):
            return False
        path = self.root / name
        if not path.is_file() or path.stat().st_size != size:
            log.info("%s: sidecar index missing or stale, scanning the tars", self.root)
            return False
        loaded = load_index_file(path, [s.count for s in self.manifest.shards])
        if loaded is None:
            return False
        self._index, labels = loaded
        if self.manifest.has_labels:
            self._labels = labels
        return True

    def _check_file(self, shard_id: int) -> None:
        info, path = self.manifest.shards[shard_id], self._paths[shard_id]
        if not path.is_file():
            raise DataError(f"shard not found: {path} (listed in {manifest_path(self.root)})")
        if info.size is not None and path.stat().st_size != info.size:
            raise DataError(f"{path}: {path.stat().st_size} bytes but the manifest says {info.size} "
                            f"(truncated or replaced since it was indexed)")

    def _scan(self, shard_id: int) -> TarIndex:
        info, path = self.manifest.shards[shard_id], self._paths[shard_id]
        self._check_file(shard_id)
        index = scan_tar(path)
        if len(index) != info.count:
            raise DataError(f"{path}: holds {len(index)} samples but {manifest_path(self.root)} says {info.count}")
        return index

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard id, position in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a shard set of {len(self)} samples")
        shard_id = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard_id, index - int(self._starts[shard_id])

    def shard_range(self, shard_id: int) -> range:
        return range(int(self._starts[shard_id]), int(self._starts[shard_id + 1]))

    # ---- raw reads -------------------------------------------------------------------------
    def _fd(self, shard_id: int) -> int:
        # A forked DataLoader worker inherits the parent's descriptors, which share one file
        # offset; pread makes that harmless, but reopen per process anyway so nothing is shared.
        if os.getpid() != self._pid:
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(shard_id)
        if fd is None:
            self._check_file(shard_id)  # one stat per shard and process: catches a tar changed since
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
        tar = self._shard_index(shard_id)
        offset, size = int(tar.image_offset[pos]), int(tar.image_size[pos])
        ext = IMAGE_EXTS[tar.image_ext[pos]]
        label_offset = int(tar.label_offset[pos])
        if self._labels is None and 0 <= label_offset - (offset + size) <= _NEARBY:
            # dcscale writes the .cls right after the image: one read for both
            label_size = int(tar.label_size[pos])
            span = self._pread(shard_id, offset, label_offset + label_size - offset)
            label = parse_label(span[label_offset - offset:], self._where(shard_id, pos))
            return span[:size], ext, label
        data = self._pread(shard_id, offset, size)
        return data, ext, self._label_at(shard_id, pos)

    def _label_at(self, shard_id: int, pos: int) -> int | None:
        if self._labels is not None:
            label = int(self._labels[int(self._starts[shard_id]) + pos])
            return None if label < 0 else label
        tar = self._shard_index(shard_id)
        offset = int(tar.label_offset[pos])
        if offset < 0:
            return None
        data = self._pread(shard_id, offset, int(tar.label_size[pos]))
        return parse_label(data, self._where(shard_id, pos))

    def _where(self, shard_id: int, pos: int) -> str:
        key = self._shard_index(shard_id).keys[pos].decode(errors="replace")
        return f"{self._paths[shard_id]} sample '{key}'"

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
            shard_id, pos = self.locate(index)
            log.warning("skipping undecodable image %d (%s): %s", index, self._where(shard_id, pos), err)

    def labels(self) -> np.ndarray | None:
        """Ground-truth labels by global index (int64, -1 where a sample has none), or None when the
        shard set has no labels. Reads only the small .cls members; cached."""
        if not self.manifest.has_labels:
            return None
        if self._labels is None:  # no sidecar index: read the .cls members
            self._labels = np.concatenate(
                [read_labels(self._paths[s], self._shard_index(s)) for s in range(self.num_shards)]
                or [np.zeros(0, dtype=np.int64)])
        return self._labels

    # ---- process hand-off ----------------------------------------------------------------------
    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        # Descriptors are per process: a spawned worker opens its own.
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_pid"] = -1
        return state
