"""Write shard sets reproducibly: same input, same bytes.

Tar headers are fixed (mtime 0, uid/gid 0, empty user/group names, mode 0o444, ustar format),
keys are the zero-padded global index, images are encoded by PIL with fixed options, and labels
are `.cls` ASCII integers as webdataset writes them, so `webdataset.WebDataset` reads the tars back.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dcscale.data.manifest import ShardInfo

SHARD_PATTERN = "shard-{:06d}.tar"
KEY_FORMAT = "{:09d}"
FORMATS = ("png", "jpeg")


@dataclass
class Encoded:
    """An already-encoded image, written as is (e.g. a JPEG from a folder, not re-compressed)."""

    data: bytes
    ext: str  # png, jpg, jpeg or webp
    shape: tuple[int, int, int]  # [C, H, W] read from the header


def channels_of_mode(mode: str) -> int:
    """How many channels an image of this PIL mode has once forced to 'L' or 'RGB'."""
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """uint8 HxW -> 'L', HxWx3 -> 'RGB'; PIL images are forced to 'L' or 'RGB' (alpha dropped)."""
    if isinstance(image, Image.Image):
        mode = "L" if channels_of_mode(image.mode) == 1 else "RGB"
        return image if image.mode == mode else image.convert(mode)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, mode="RGB")
    raise ValueError(f"expected an HxW or HxWx3 image, got shape {array.shape}")


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> tuple[bytes, str]:
    """Encode with fixed options (no timestamps or optimisation passes) -> (bytes, extension)."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), "png"
    if image_format == "jpeg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown image format {image_format!r} (expected one of {', '.join(FORMATS)})")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class WriteStats:
    shards: list[ShardInfo] = field(default_factory=list)
    shapes: set = field(default_factory=set)  # every distinct [C, H, W] written
    labels: set = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)


class ShardSetWriter:
    """Append samples in global-index order; a new tar starts every `samples_per_shard` samples.

    Each tar is written to a temporary name and renamed when complete, so an interrupted build
    never leaves a tar that looks whole.
    """

    def __init__(self, out: str | Path, samples_per_shard: int, image_format: str = "png", quality: int = 95,
                 first_shard: int = 0):
        """first_shard: the number of the first shard written (a writer per shard, in parallel, writes
        the bytes one writer for all of them would)."""
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out = Path(out)
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.quality = quality
        self.stats = WriteStats()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._first_shard = first_shard
        self._next_index = first_shard * samples_per_shard

    def write(self, image: np.ndarray | Image.Image | Encoded, label: int | None) -> int:
        """Write one sample; returns its global index."""
        if isinstance(image, Encoded):
            data, ext, shape = image.data, image.ext, tuple(image.shape)
        else:
            pil = to_pil(image)
            data, ext = encode_image(pil, self.image_format, self.quality)
            shape = (channels_of_mode(pil.mode), pil.height, pil.width)
        if self._tar is None:
            self._open()
        index = self._next_index
        key = KEY_FORMAT.format(index)
        self._add(f"{key}.{ext}", data)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode("ascii"))
            self.stats.labels.add(int(label))
        self.stats.shapes.add(shape)
        self._count += 1
        self._next_index += 1
        if self._count == self.samples_per_shard:
            self._close_shard()
        return index

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def _open(self) -> None:
        name = SHARD_PATTERN.format(self._first_shard + len(self.stats.shards))
        self._tmp = self.out / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        self._tar.close()
        name = SHARD_PATTERN.format(self._first_shard + len(self.stats.shards))
        final = self.out / name
        os.replace(self._tmp, final)
        self.stats.shards.append(ShardInfo(name=name, count=self._count, size=final.stat().st_size))
        self._tar, self._tmp = None, None

    def close(self) -> WriteStats:
        if self._tar is not None:
            self._close_shard()
        return self.stats

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
