"""Images per second: a dcscale shard set against the same images as individual files in a folder.

Both hold byte-identical PNGs. Three access patterns, each with and without decoding:
the extraction pass (global index order), random access (the training sampler's pattern), and the
extraction pass through the DataLoader (workers, transform to tensors). Both copies are read once
before timing, so the numbers compare warm page caches (the format's own overhead: file opens vs
preads); on cold network storage the gap grows. Prints a markdown table.

    python tools/bench_data.py --n 20000 --size 32
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcscale.data.build import write_shard_set
from dcscale.data.converters import SourceData
from dcscale.data.loaders import extraction_loader
from dcscale.data.partition import worker_batches
from dcscale.data.shardset import ShardSet, decode_uint8
from dcscale.data.transforms import eval_transform


def synthetic_images(n: int, size: int, seed: int = 0):
    """Smooth colour blobs plus noise: compresses like small natural images, unlike pure noise."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.int16)
        noise = rng.integers(-12, 13, size=smooth.shape)
        yield np.clip(smooth + noise, 0, 255).astype(np.uint8), int(rng.integers(0, 10))


def build(workdir: Path, n: int, size: int, samples_per_shard: int) -> tuple[ShardSet, list[Path]]:
    shards = workdir / "shards"
    source = SourceData(samples=synthetic_images(n, size), num_samples=n, class_names=[str(c) for c in range(10)],
                        description="bench: synthetic")
    write_shard_set(source, shards, samples_per_shard=samples_per_shard)
    ss = ShardSet(shards)
    folder = workdir / "files"
    folder.mkdir()
    files = []
    for i in range(len(ss)):  # the very same PNG bytes, one file each
        data, ext, _ = ss.read_bytes(i)
        path = folder / f"{i:09d}.{ext}"
        path.write_bytes(data)
        files.append(path)
    return ss, files


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def decode_file(path: Path):
    with Image.open(path) as image:
        image.load()
        return image


class FolderExtraction(torch.utils.data.IterableDataset):
    """The folder counterpart of the extraction loader: the same batches on the same workers, the
    same decode (bytes -> uint8 tensor) and batch transform; only the storage differs."""

    def __init__(self, files, transform, batch_size):
        self.files, self.transform, self.batch_size = files, transform, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        for chunk in worker_batches(range(len(self.files)), workers, me, self.batch_size):
            images = [decode_uint8(self.files[i].read_bytes(), self.files[i].suffix[1:], self.transform.channels)
                      for i in chunk]
            yield self.transform.collate(images)


class Finished:
    """Runs the transform's batch float work in the main process, as the extraction loader does."""

    def __init__(self, loader, transform):
        self.loader, self.transform = loader, transform

    def __iter__(self):
        for batch in self.loader:
            yield self.transform.finish(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="images")
    parser.add_argument("--size", type=int, default=32, help="image side (RGB)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader row")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the best is shown)")
    parser.add_argument("--workdir", default=None, help="where to write both copies (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ss, files = build(Path(tmp), args.n, args.size, args.samples_per_shard)
        n = len(ss)
        order = np.random.default_rng(0).permutation(n).tolist()
        for path in files:  # warm both page caches
            path.read_bytes()
        for i in range(n):
            ss.read_bytes(i)
        ss.read_uint8(0, 3)  # load the decoder extension before timing

        transform = eval_transform(args.size, 3)
        folder_loader = Finished(DataLoader(FolderExtraction(files, transform, args.batch_size), batch_size=None,
                                            num_workers=args.workers), transform)
        shard_loader = extraction_loader(ss, transform, 0, 1, args.batch_size, args.workers)

        def drain(loader):
            for _ in loader:
                pass

        def each(fn, items):
            for item in items:  # results are dropped, as a training loop would
                fn(item)

        rows = [
            ("extraction order, bytes only", lambda: each(ss.read_bytes, range(n)),
             lambda: each(Path.read_bytes, files)),
            ("extraction order, decoded (PIL)", lambda: each(ss.read, range(n)), lambda: each(decode_file, files)),
            ("extraction order, decoded (uint8 tensor)", lambda: each(lambda i: ss.read_uint8(i, 3), range(n)),
             lambda: each(lambda f: decode_uint8(f.read_bytes(), "png", 3), files)),
            ("random access, bytes only", lambda: each(ss.read_bytes, order),
             lambda: each(Path.read_bytes, [files[i] for i in order])),
            ("random access, decoded (PIL)", lambda: each(ss.read, order),
             lambda: each(decode_file, [files[i] for i in order])),
            (f"extraction DataLoader ({args.workers} workers, to tensors)", lambda: drain(shard_loader),
             lambda: drain(folder_loader)),
        ]
        total_mb = sum(s.size for s in ss.manifest.shards) / 2**20
        print(f"{n} RGB {args.size}x{args.size} PNG images ({total_mb:.1f} MiB in {ss.num_shards} shards of "
              f"{args.samples_per_shard}), warm page cache, best of {args.repeats}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch thread(s)\n")
        print("| access pattern | shard set (img/s) | folder of files (img/s) | shards / files |")
        print("|---|---:|---:|---:|")
        for name, shard_fn, file_fn in rows:
            # best of a few interleaved runs: the machine may be shared, so take each side's best
            shard_rate = file_rate = 0.0
            for _ in range(args.repeats):
                shard_rate = max(shard_rate, rate(shard_fn, n))
                file_rate = max(file_rate, rate(file_fn, n))
            print(f"| {name} | {shard_rate:,.0f} | {file_rate:,.0f} | {shard_rate / file_rate:.2f}x |")
        ss.close()


if __name__ == "__main__":
    main()
