#!/usr/bin/env python
"""Thread counts that fit the machine (issue 22): where faiss's k-means gains from a second thread,
and whether a rank waiting in a gloo collective burns CPU.

    .venv/bin/python tools/bench_threads.py kmeans --n 60000 --d 84 --k 5,50,500,5000 --threads 1,2
    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_threads.py wait

`kmeans`: seconds of dcscale's train_kmeans (20 iterations) for each K and faiss thread count, the
fastest of --repeats, with the free cores (dcscale.dist.free_cores) measured before each size.
`wait`: rank 0 sleeps --hold seconds before it joins a barrier, a tensor broadcast and a
broadcast_object_list; rank 1 prints the CPU seconds it spent waiting in each.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def bench_kmeans(args) -> None:
    from dcscale.cluster.kmeans import faiss_threads, train_kmeans
    from dcscale.dist import free_cores

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"k-means {args.n} x {args.d}, {args.niter} iterations, load {os.getloadavg()[0]:.2f}; "
          f"seconds for {' / '.join(f'{t} thread(s)' for t in threads)}", flush=True)
    for k in (int(v) for v in args.k.split(",")):
        free = free_cores()
        best = {}
        for t in threads:
            times = []
            for _ in range(args.repeats):
                with faiss_threads(t):
                    t0 = time.perf_counter()
                    train_kmeans(x, k, args.niter, seed=1)
                    times.append(time.perf_counter() - t0)
            best[t] = min(times)
        work = args.n * args.d * k
        print(f"K={k:6d} n*d*K={work:.2e}: " + " / ".join(f"{best[t]:.3f}" for t in threads)
              + f"  (free cores {free})", flush=True)


def bench_wait(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    for name, call in (("barrier", dist.barrier), ("broadcast", lambda: dist.broadcast(torch.zeros(10), 0)),
                       ("broadcast_object_list", lambda: dist.broadcast_object_list([1], 0))):
        dist.barrier()
        if rank == 0:
            time.sleep(args.hold)
            call()
            continue
        cpu0, wall0 = time.process_time(), time.perf_counter()
        call()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"rank {rank} waited in {name}: {wall:.2f} s, {cpu:.3f} CPU s ({100 * cpu / wall:.1f}% of a core)",
              flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    km = sub.add_parser("kmeans")
    km.add_argument("--n", type=int, default=60_000)
    km.add_argument("--d", type=int, default=84)
    km.add_argument("--k", default="5,50,500")
    km.add_argument("--threads", default="1,2")
    km.add_argument("--niter", type=int, default=20)
    km.add_argument("--repeats", type=int, default=3)
    wait = sub.add_parser("wait")
    wait.add_argument("--hold", type=float, default=4.0)
    args = p.parse_args()
    bench_kmeans(args) if args.what == "kmeans" else bench_wait(args)


if __name__ == "__main__":
    main()
