#!/usr/bin/env python
"""faiss k-means seconds per iteration with 1 thread and with every usable core, side by side.

    .venv/bin/python tools/bench_kmeans_threads.py --n 1000000 --d 32 --k 10000

Rank 0 used to run k-means with torchrun's OMP_NUM_THREADS=1; it now raises faiss's thread count to
the cores it may run on (dcscale.cluster.kmeans.usable_cores) for that phase. Best of --repeats.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from dcscale.cluster.kmeans import usable_cores


def seconds_per_iteration(x: np.ndarray, k: int, niter: int, threads: int) -> float:
    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=1, max_points_per_centroid=10**9)
    t0 = time.perf_counter()
    km.train(x)
    return (time.perf_counter() - t0) / niter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--niter", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal((args.n, args.d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cores = usable_cores()
    best = {t: min(seconds_per_iteration(x, args.k, args.niter, t) for _ in range(args.repeats)) for t in (1, cores)}
    print(f"k-means {args.n} x {args.d} -> {args.k}: {best[1]:.2f} s/iteration with 1 thread, "
          f"{best[cores]:.2f} with {cores} ({best[1] / best[cores]:.2f}x)")


if __name__ == "__main__":
    main()
