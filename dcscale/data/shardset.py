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
            self.decode_errors += 1
            if index not in self._warned:
                self._warned.add(index)
                shard_id, pos = self.locate(index)
                log.warning("skipping undecodable image %d (%s): %s", index, self._where(shard_id, pos), err)
            return None
        return Sample(index=index, image=image, label=label)

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
