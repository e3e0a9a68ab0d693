#!/usr/bin/env python
"""Rank 0's k-means seconds per iteration (`cluster.kmeans: rank0`): before issue 9 against now, side by side.

    .venv/bin/python tools/bench_kmeans_threads.py --n 1000000 --d 32 --k 10000

Before: one faiss call with torchrun's OMP_NUM_THREADS=1. Now: dcscale.cluster.kmeans.train_kmeans
(one faiss iteration per call, so each is reported) with faiss's thread count raised to the cores the
process may run on (usable_cores), as phases.cluster_rows runs it with cluster.kmeans: rank0. The two
alternate, best of --repeats. The distributed default is measured end to end by tools/bench_scale.py.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from dcscale.cluster.kmeans import faiss_threads, train_kmeans
from dcscale.host import usable_cores


def before(x: np.ndarray, k: int, niter: int) -> float:
    faiss.omp_set_num_threads(1)
    clus = faiss.Clustering(x.shape[1], k)
    clus.niter, clus.seed, clus.max_points_per_centroid = niter, 1, x.shape[0] // k + 1
    t0 = time.perf_counter()
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    return (time.perf_counter() - t0) / niter


def now(x: np.ndarray, k: int, niter: int) -> float:
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    with faiss_threads(usable_cores()):
        result = train_kmeans(x, k, niter, seed=1)
    return (time.perf_counter() - t0) / len(result.iteration_objectives)


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
    times = {"before": [], "now": []}
    for _ in range(args.repeats):
        times["before"].append(before(x, args.k, args.niter))
        times["now"].append(now(x, args.k, args.niter))
    b, n = min(times["before"]), min(times["now"])
    print(f"k-means {args.n} x {args.d} -> {args.k}: {b:.2f} s/iteration before (1 thread, one faiss call), "
          f"{n:.2f} now ({usable_cores()} threads, one call per iteration): {b / n:.2f}x")


if __name__ == "__main__":
    main()
