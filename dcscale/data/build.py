"""`dcscale shards SOURCE ... --out DIR`: build a shard set from a dataset on disk, or index existing tars.

    dcscale shards digits --split test --out data/digits/test
    dcscale shards cifar10 ~/data/cifar-10-batches-py --split train --out data/cifar10/train
    dcscale shards folder ~/data/imagenet/train --out data/imagenet/train     (images kept as they are)
    dcscale shards index ~/wds/ --out ~/wds/                                 (tars are not rewritten)
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from PIL import Image

from dcscale.data import converters
from dcscale.data.converters import SourceData
from dcscale.data.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo, load_manifest, save_manifest
from dcscale.data.tarindex import INDEX_FILE, IMAGE_EXTS, parse_label, read_labels, save_index_file, scan_tar
from dcscale.data.writers import FORMATS, ShardSetWriter, channels_of_mode
from dcscale.errors import DataError, DcscaleError

DEFAULT_SAMPLES_PER_SHARD = 1000
DATASET_SOURCES = ("digits", "cifar10", "svhn", "mnist", "fashion-mnist")
SOURCES = (*DATASET_SOURCES, "folder", "index")
_OWN_SHARD = re.compile(r"^shard-\d{6}\.tar$")


# ---- writing a shard set ---------------------------------------------------------------------------

def _prepare_out(out: Path) -> list[str]:
    """Create `out`; return the shard files an earlier dcscale build left there (to replace).
    Refuses a directory holding other tars, which a build could otherwise overwrite."""
    out.mkdir(parents=True, exist_ok=True)
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
    for leftover in out.glob("shard-*.tar.tmp"):
        leftover.unlink()
    return previous


def _shape_fields(shapes: set) -> tuple[list[int] | None, int | None]:
    image_shape = list(next(iter(shapes))) if len(shapes) == 1 else None
    channels = {s[0] for s in shapes}
    return image_shape, (channels.pop() if len(channels) == 1 else 3 if channels else None)


def write_shard_set(source: SourceData, out: str | Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                    image_format: str = "png", quality: int = 95) -> Manifest:
    """Write `source` as a shard set in `out` (tars, then manifest.json last) and return its manifest."""
    out = Path(out)
    previous = _prepare_out(out)
    writer = ShardSetWriter(out, samples_per_shard, image_format, quality)
    try:
        for image, label in source.samples:
            writer.write(image, label)
    except BaseException:
        writer.abort()
        raise
    stats = writer.close()
    if stats.total == 0:
        raise DataError(f"{source.description}: no readable images")
    for name in set(previous) - {s.name for s in stats.shards}:
        (out / name).unlink(missing_ok=True)
    image_shape, channels = _shape_fields(stats.shapes)
    labelled = source.class_names is not None
    index_size = _write_index_file(out, [out / s.name for s in stats.shards])
    manifest = Manifest(
        version=FORMAT_VERSION,
        shards=stats.shards,
        total=stats.total,
        has_labels=labelled,
        num_classes=len(source.class_names) if labelled else None,
        class_names=list(source.class_names) if labelled else None,
        source=source.description,
        image_shape=image_shape,
        channels=channels,
        extra={"image_format": image_format, "samples_per_shard": samples_per_shard,
               "skipped_files": len(source.skipped or []), "index_file": INDEX_FILE, "index_file_size": index_size},
    )
    save_manifest(manifest, out)
    return manifest


def build_digits(out: str | Path, split: str = "train", samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 image_format: str = "png", quality: int = 95) -> Manifest:
    return write_shard_set(converters.read_digits(split), out, samples_per_shard, image_format, quality)


def build_cifar10(path: str | Path, out: str | Path, split: str = "train",
                  samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
                  quality: int = 95) -> Manifest:
    return write_shard_set(converters.read_cifar10(path, split), out, samples_per_shard, image_format, quality)


def build_svhn(path: str | Path, out: str | Path, split: str = "train",
               samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
               quality: int = 95) -> Manifest:
    return write_shard_set(converters.read_svhn(path, split), out, samples_per_shard, image_format, quality)


def build_mnist(path: str | Path, out: str | Path, split: str = "train", variant: str = "mnist",
                samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, image_format: str = "png",
                quality: int = 95) -> Manifest:
    source = converters.read_mnist(path, split, variant)
    return write_shard_set(source, out, samples_per_shard, image_format, quality)


def build_folder(path: str | Path, out: str | Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 image_format: str = "keep", quality: int = 95) -> Manifest:
    """image_format 'keep' stores PNG/JPEG/WebP files unchanged (others become PNG)."""
    source = converters.read_folder(path, keep_encoded=image_format == "keep")
    return write_shard_set(source, out, samples_per_shard, "png" if image_format == "keep" else image_format,
                           quality)


def _write_index_file(out: Path, tars: list[Path], indexes: list | None = None) -> int:
    """Scan the tars (just written: in the page cache) and save the sidecar index; returns its size."""
    indexes = indexes or [scan_tar(t) for t in tars]
    return save_index_file(out / INDEX_FILE, indexes, [read_labels(t, i) for t, i in zip(tars, indexes)])


# ---- indexing existing tars --------------------------------------------------------------------------

def _tar_list(inputs: list[str | Path]) -> list[Path]:
    tars: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.tar"))
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


def index_tars(inputs: list[str | Path], out: str | Path) -> Manifest:
    """Write `out/manifest.json` for existing WebDataset tars, in the given order (directories
    expand to their sorted *.tar), without touching the tars. Shard names are stored relative to
    `out`. Labels come from .cls members; the image shape from the image headers."""
    out = Path(out)
    tars = _tar_list(inputs)
    out.mkdir(parents=True, exist_ok=True)
    shards, shapes, labels, any_unlabelled, indexes = [], set(), set(), False, []
    for tar in tars:
        index = scan_tar(tar)
        indexes.append(index)
        with open(tar, "rb") as f:
            for pos in range(len(index)):
                where = f"{tar} sample '{index.keys[pos].decode(errors='replace')}'"
                if index.label_offset[pos] >= 0:
                    f.seek(int(index.label_offset[pos]))
                    labels.add(parse_label(f.read(int(index.label_size[pos])), where))
                else:
                    any_unlabelled = True
                f.seek(int(index.image_offset[pos]))
                shapes.add(_header_shape(f.read(int(index.image_size[pos])), where))
        shards.append(ShardInfo(name=os.path.relpath(tar.resolve(), out.resolve()), count=len(index),
                                size=tar.stat().st_size))
    shapes.discard(None)  # undecodable images: skipped (and counted) when read
    image_shape, channels = _shape_fields(shapes)
    has_labels = bool(labels)
    if has_labels and min(labels) < 0:
        raise DataError(f"negative class label {min(labels)} in {', '.join(map(str, inputs))}")
    num_classes = max(labels) + 1 if has_labels else None
    manifest = Manifest(
        version=FORMAT_VERSION,
        shards=shards,
        total=sum(s.count for s in shards),
        has_labels=has_labels,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)] if has_labels else None,
        source=f"index: {len(tars)} existing tar(s), first {tars[0]}",
        image_shape=image_shape,
        channels=channels,
        extra={"indexed": True, "some_unlabelled": bool(has_labels and any_unlabelled)},
    )
    if manifest.total == 0:
        raise DataError(f"no samples with an image ({', '.join(IMAGE_EXTS)}) in {', '.join(map(str, inputs))}")
    manifest.extra.update(index_file=INDEX_FILE, index_file_size=_write_index_file(out, tars, indexes))
    save_manifest(manifest, out)
    return manifest


def _header_shape(data: bytes, where: str) -> tuple[int, int, int] | None:
    import logging

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return channels_of_mode(image.mode), image.height, image.width
    except Exception as err:
        logging.getLogger(__name__).warning("undecodable image in %s: %s", where, err)
        return None


# ---- command line ----------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="dataset directory/file (cifar10, svhn, mnist, fashion-mnist, folder) or tars/dirs (index)")
    parser.add_argument("--out", required=True, help="output shard set directory")
    parser.add_argument("--split", choices=converters.SPLITS, default=None,
                        help="train (default) or test, for digits/cifar10/svhn/mnist/fashion-mnist")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--format", dest="image_format", choices=(*FORMATS, "keep"), default=None,
                        help="png (lossless, default) or jpeg; folder defaults to keep (store files as they are)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (with --format jpeg)")


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
    if args.split is not None and source not in DATASET_SOURCES:
        raise DcscaleError(f"--split does not apply to `{source}`")
    if args.image_format == "keep" and source != "folder":
        raise DcscaleError("--format keep only applies to `folder`")
    if source == "index":
        if args.image_format is not None or not args.inputs:
            raise DcscaleError("`dcscale shards index TAR_OR_DIR ...` takes tars and no --format")
        return index_tars(args.inputs, args.out)
    split = args.split or "train"
    kw = dict(samples_per_shard=args.samples_per_shard, quality=args.quality)
    if source == "digits":
        if args.inputs:
            raise DcscaleError("`dcscale shards digits` takes no PATH (scikit-learn's bundled copy is used)")
        return build_digits(args.out, split, image_format=args.image_format or "png", **kw)
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
    shape = "x".join(map(str, manifest.image_shape)) if manifest.image_shape else "mixed sizes"
    verb = "indexed" if manifest.extra.get("indexed") else "wrote"
    skipped = manifest.extra.get("skipped_files", 0)
    tail = f"; skipped {skipped} unreadable file(s)" if skipped else ""
    return (f"{verb} {manifest.total} samples in {len(manifest.shards)} shards to {out} "
            f"({labels}, images {shape}){tail}")


def run(args) -> int:
    manifest = build_from_args(args)
    print(summary(manifest, args.out))
    return 0
