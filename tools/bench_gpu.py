#!/usr/bin/env python
"""Throughput of dcscale's phases on a GPU (or, at a tiny size, on the CPU), per precision.

Builds a synthetic shard set of JPEG images (smooth random colour fields plus noise, so that they
compress and decode like photographs), then for AlexNet-BN with the Sobel front and ResNet-50 and each
precision (train.precision: fp32, bf16, and fp16 on CUDA) measures:

  forward     images/s of the body's feature pass on a batch already on the device (the ceiling)
  extraction  images/s of the whole extraction path (phases.extract_features: shard reads, JPEG
              decoding in --workers DataLoader workers, resize/crop/normalise, forward), best of 2
  train       images/s of training steps on random pseudo-labels through the real training path
              (uniform-cluster sampler, decoding, augmentation, phases.train_steps with autocast and,
              for fp16, the loss scaler), after --warmup steps

and, once, faiss k-means of --kmeans-n x --kmeans-d rows into --kmeans-k centroids (on every GPU faiss
sees when it has GPU support). Also the JPEG decode rate of one CPU core, which says how many cores
per GPU the extraction needs to keep up with the forward pass. Prints one table and writes a JSON.

    python tools/bench_gpu.py --json bench_gpu.json                 # the GPU table of docs/benchmarks.md
    python tools/bench_gpu.py --images 8 --image-size 64 --batch 4 --steps 2 --warmup 1 \\
        --kmeans-n 2000 --kmeans-d 16 --kmeans-k 10 --kmeans-iter 2 --k 10 --workers 0   # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCHS = {"alexnet": {"sobel": True, "batch_norm": True}, "resnet50": {"sobel": False, "batch_norm": True}}


def build_jpeg_shards(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` RGB JPEGs of size x size: a random 7x7 colour grid upsampled (smooth, like photographs)
    plus mild noise; labels are the image's dominant channel."""
    from PIL import Image

    from dcscale.data.manifest import FORMAT_VERSION, Manifest, save_manifest
    from dcscale.data.writers import ShardSetWriter

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    writer = ShardSetWriter(out, samples_per_shard=1000, image_format="jpeg", quality=90)
    for _ in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(grid, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        writer.write(image, label=int(image.reshape(-1, 3).mean(0).argmax()))
    stats = writer.close()
    save_manifest(Manifest(FORMAT_VERSION, stats.shards, stats.total, True, 3, ["r", "g", "b"],
                           "synthetic JPEG benchmark set", [3, size, size], 3), out)
    return out


def _config(arch: str, precision: str, args):
    from dcscale.config import config_from_dict

    return config_from_dict({"model": {"arch": arch, **ARCHS[arch]},
                             "cluster": {"k": args.k},
                             "train": {"precision": precision, "channels_last": args.channels_last,
                                       "compile": args.compile, "batch_size": args.batch, "lr": 0.01}})


def _model(cfg, size: int, device: torch.device):
    from dcscale.models import build_model_from_config
    from dcscale.cycle.compute import prepare_model

    torch.manual_seed(0)
    model = build_model_from_config(cfg, in_channels=3, image_size=size).to(device)
    return prepare_model(model, cfg, distributed=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_ips(model, compute, batch: torch.Tensor, iters: int, warmup: int) -> float:
    model.eval()
    batch = compute.batch(batch)
    for i in range(warmup + iters):
        if i == warmup:
            _sync(compute.device)
            t0 = time.perf_counter()
        with compute.autocast():
            model.features(batch)
    _sync(compute.device)
    return iters * len(batch) / (time.perf_counter() - t0)


def extraction_ips(model, compute, shards, transform, env, args) -> float:
    from dcscale.cycle import phases

    model.eval()
    best = 0.0
    for _ in range(2):  # the first pass also warms up (cuDNN's algorithm choice, compilation)
        t0 = time.perf_counter()
        indices, _, _ = phases.extract_features(model.features, shards, transform, env, args.batch, args.workers,
                                                "float32", model.feature_dim, compute)
        best = max(best, len(indices) / (time.perf_counter() - t0))
    return best


def train_ips(model, cfg, compute, shards, env, args) -> float:
    """Images/s of the --steps training steps after the first --warmup ones (the loader's start and
    the first steps' set-up excluded)."""
    from dcscale.data.loaders import SeededDraws
    from dcscale.data.sampler import UniformClusterSampler
    from dcscale.data.transforms import train_transform
    from dcscale.cycle import phases
    from dcscale.cycle.compute import grad_scaler
    from dcscale.train.loop import WithPositions

    labels = np.random.default_rng(0).integers(0, args.k, len(shards)).astype(np.int64)
    dataset = SeededDraws(shards, labels, train_transform(args.image_size, 3), seed=0, cycle=0)
    draws = list(UniformClusterSampler(labels, world_size=1, rank=0, seed=0))
    total = (args.warmup + args.steps) * args.batch
    draws = (draws * (total // len(draws) + 1))[:total]  # (a small set is drawn from again)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=WithPositions(draws, 0),
                                         num_workers=args.workers, collate_fn=dataset.collate,
                                         pin_memory=compute.device.type == "cuda")
    model.reset_head(args.k)
    model.head.to(compute.device)
    optimizers = [torch.optim.SGD(model.body_parameters(), lr=cfg.train.lr, momentum=0.9),
                  torch.optim.SGD(model.head_parameters(), lr=cfg.train.lr)]
    ends = []  # (train_steps reads every step's loss, so the device has finished the step by then)
    phases.train_steps(model, loader, optimizers, env, 0, lambda step, totals: ends.append(time.perf_counter()),
                       {"loss_sum": 0.0, "correct": 0, "seen": 0}, compute, grad_scaler(cfg.train.precision,
                                                                                          compute.device))
    return args.steps * args.batch / (ends[-1] - ends[args.warmup - 1])


def decode_ips_per_core(shards, transform, n: int) -> float:
    """JPEG reads + decoding to uint8 tensors, one core, no model."""
    count = min(n, len(shards))
    transform.decode(shards, 0)  # (opens the first shard, loads the decoder)
    t0 = time.perf_counter()
    for i in range(count):
        transform.decode(shards, i)
    return count / (time.perf_counter() - t0)


def kmeans_seconds(args) -> tuple[float, int]:
    import faiss

    from dcscale.cluster import train_kmeans, use_gpu

    x = np.random.default_rng(0).standard_normal((args.kmeans_n, args.kmeans_d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    train_kmeans(x, args.kmeans_k, args.kmeans_iter, seed=0)
    return time.perf_counter() - t0, faiss.get_num_gpus() if use_gpu() else 0


def run(args, data_dir: Path) -> dict:
    from dcscale.data.shardset import ShardSet
    from dcscale.data.transforms import eval_transform
    from dcscale.dist import DistEnv
    from dcscale.cycle.compute import ForwardSettings

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = args.precisions.split(",") if args.precisions else \
        (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    env = DistEnv(device=device, threads=torch.get_num_threads())
    shards_dir = data_dir / f"jpeg{args.image_size}_{args.images}"
    if not (shards_dir / "manifest.json").is_file():
        build_jpeg_shards(shards_dir, args.images, args.image_size)
    shards = ShardSet(shards_dir)
    transform = eval_transform(args.image_size, 3)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": args.workers,
              "images": args.images, "image_size": args.image_size, "batch": args.batch, "k": args.k,
              "channels_last": args.channels_last, "compile": args.compile,
              "decode_ips_per_core": decode_ips_per_core(shards, transform, 256), "rows": []}
    batch = torch.randn(args.batch, 3, args.image_size, args.image_size)
    for arch in args.archs.split(","):
        for precision in precisions:
            cfg = _config(arch, precision, args)
            compute = ForwardSettings.from_config(cfg, device)
            model = _model(cfg, args.image_size, device)
            row = {"arch": arch, "precision": precision,
                   "forward_ips": forward_ips(model, compute, batch, args.steps, args.warmup),
                   "extraction_ips": extraction_ips(model, compute, shards, transform, env, args),
                   "train_ips": train_ips(model, cfg, compute, shards, env, args)}
            result["rows"].append(row)
            print(f"  {arch} {precision}: forward {row['forward_ips']:,.0f}, extraction {row['extraction_ips']:,.0f}, "
                  f"train {row['train_ips']:,.0f} img/s", file=sys.stderr, flush=True)
            del model
    for row in result["rows"]:
        ref = next(r for r in result["rows"] if r["arch"] == row["arch"] and r["precision"] == "fp32")
        row["train_vs_fp32"] = row["train_ips"] / ref["train_ips"]
        row["extraction_vs_forward"] = row["extraction_ips"] / row["forward_ips"]
    result["kmeans_s"], result["kmeans_gpus"] = kmeans_seconds(args)
    result["kmeans"] = {"n": args.kmeans_n, "d": args.kmeans_d, "k": args.kmeans_k, "niter": args.kmeans_iter}
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}, {result['cpu_cores']} CPU cores, {result['workers']} loader workers, "
          f"{result['images']} JPEGs {result['image_size']}x{result['image_size']}, batch {result['batch']}, "
          f"K={result['k']}, channels_last={result['channels_last']}, compile={result['compile']}\n")
    print("| model | precision | forward img/s | extraction img/s | extraction / forward | train img/s "
          "| train vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['arch']} | {r['precision']} | {r['forward_ips']:,.0f} | {r['extraction_ips']:,.0f} | "
              f"{r['extraction_vs_forward']:.0%} | {r['train_ips']:,.0f} | {r['train_vs_fp32']:.2f}x |")
    km = result["kmeans"]
    where = f"{result['kmeans_gpus']} GPU(s)" if result["kmeans_gpus"] else "CPU"
    print(f"\nJPEG decoding: {result['decode_ips_per_core']:,.0f} img/s per CPU core. faiss k-means "
          f"{km['n']:,} x {km['d']} -> {km['k']:,} centroids, {km['niter']} iterations: "
          f"{result['kmeans_s']:.1f} s ({where})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5120, help="JPEGs in the synthetic shard set")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--archs", default="alexnet,resnet50")
    p.add_argument("--precisions", default=None, help="default: fp32,bf16,fp16 on CUDA, fp32,bf16 on a CPU")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--workers", type=int, default=max((os.cpu_count() or 1) - 1, 0), help="DataLoader workers")
    p.add_argument("--steps", type=int, default=20, help="timed forward passes / training steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--k", type=int, default=10_000, help="classes of the training head (DeepCluster's K)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kmeans-n", type=int, default=1_000_000)
    p.add_argument("--kmeans-d", type=int, default=256)
    p.add_argument("--kmeans-k", type=int, default=20_000)
    p.add_argument("--kmeans-iter", type=int, default=20)
    p.add_argument("--data-dir", default=None, help="where the shard set is built (and reused); default: a temp dir")
    p.add_argument("--json", default="bench_gpu.json", help="where the results are written")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    if args.data_dir:
        result = run(args, Path(args.data_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="dcscale-bench-gpu-") as tmp:
            result = run(args, Path(tmp))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
