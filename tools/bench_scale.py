"""Per-phase time, per-rank memory, network volume and open files of one DeepCluster cycle, by N and W.

For every N it synthesises (or reuses, --keep-data) a labelled shard set of N 16x16 grey PNGs, then
for every W runs `dcscale train` under torchrun (gloo, CPU, W processes) for one clustering cycle and
--steps training steps, and records per phase (startup, pca, extract, kmeans, assign, between,
train): seconds, each rank's peak memory during that phase and its growth over the rank's memory
when the cycle started, the largest number of open files, and the bytes gathered to rank 0. Prints a
markdown table and the growth exponent of every phase's time between sizes; writes bench_scale.json.

    python tools/bench_scale.py --n 20000 200000 1000000 --world 1 2 4 --out runs/bench_scale

How it measures, without any hook in the library:
- Memory: this process polls every rank (the torchrun agent's child processes) every --poll-ms. It
  reads VmHWM from /proc/<pid>/status and resets it (`5` into /proc/<pid>/clear_refs), so each
  reading is the exact peak RSS since the previous one, short spikes included (falls back to VmRSS
  samples where the reset is not allowed; the JSON says which). The reading whose interval
  straddles a phase's start counts with its RSS, not its peak, which may be the previous phase's. The reset also lowers the run's own
  `peak_mem_mb`, so that number is not used.
- Phase boundaries: rank 0 writes labels.npy right after assignment, so its mtime ends the assign
  phase; the cycle's phase durations (t_pca: the PCA sample's extraction and the fit, then
  t_extract: every row extracted and projected, t_kmeans, t_assign; contiguous on rank 0) count back
  from there. Training is stopped after --steps optimizer steps by asking for a
  checkpoint at that step (checkpoint.every_steps) and killing the job once the file is there; the
  checkpoint holds the cycle's metrics, t_train up to that step included, and its mtime ends the
  train phase. `between` is the gap in between (label NMI and sizes, head reset, DDP wrap). Other ranks'
  phases end at the same collectives, so one set of boundaries serves every rank.
- Bytes gathered to rank 0: from the resolved config (with cluster.kmeans: rank0 the k-means
  training rows x d, float32, from the other W-1 ranks; the PCA sample is never gathered; with the distributed
  default, the K x (d + 1) float64 sums all-reduced every iteration instead). /proc cannot measure them: gloo moves data with
  sendmsg/recvmsg, which /proc/<pid>/io does not count, and loopback counters are shared.
- Open files: /proc/<pid>/fd entries (shards, sockets, pipes), the largest count seen.

DataLoader workers are off by default (--workers 0: each rank one core, its memory all in the rank
process); with workers their memory is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PHASES = ("startup", "pca", "extract", "kmeans", "assign", "between", "train")  # in the order they run
TIMED_PHASES = ("pca", "extract", "kmeans", "assign", "train")  # the ones metrics.jsonl times  # the ones metrics.jsonl times
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = 4 * BLOCK  # one sample: png header, png (<= 512 bytes), cls header, cls
SYNTH_SOURCE = "synthetic digits 16x16 (tools/bench_scale.py)"
MB = 2**20


# ---- the synthetic shard set -------------------------------------------------------------------------

def image_pool(size: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """`size` encoded 16x16 grey PNGs: scikit-learn's digits scaled 2x, shifted and noised; their classes."""
    from sklearn.datasets import load_digits

    from dcscale.data.writers import encode_image, to_pil

    digits = load_digits()
    base = np.kron(digits.images * (255 / 16), np.ones((2, 2)))  # 8x8 -> 16x16
    rng = np.random.default_rng(seed)
    which = rng.integers(len(base), size=size)
    shifts = rng.integers(-2, 3, size=(size, 2))
    pngs = []
    for i, (dy, dx) in zip(which, shifts):
        image = np.roll(base[i], (dy, dx), axis=(0, 1)) + rng.normal(0, 16, size=(16, 16))
        pngs.append(encode_image(to_pil(np.clip(image, 0, 255).astype(np.uint8)), "png")[0])
    return pngs, digits.target[which].astype(np.int64)


def _member(name: str, data: bytes) -> np.ndarray:
    """A tar header and the data padded to one block, as a dcscale build writes them (2 blocks)."""
    from dcscale.data.writers import _tarinfo

    if len(data) > BLOCK:
        raise ValueError(f"{name}: {len(data)} bytes; the fast writer needs members of one block")
    header = _tarinfo(name, len(data)).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return np.frombuffer(header + data.ljust(BLOCK, b"\0"), dtype=np.uint8)


def _octal_checksums(values: np.ndarray) -> np.ndarray:
    """Tar checksum fields ('%06o\\0') for many headers at once: [n, 7] bytes."""
    powers = 8 ** np.arange(5, -1, -1)
    digits = (values[:, None] // powers) % 8 + ord("0")
    return np.concatenate([digits, np.zeros((len(values), 1), np.int64)], axis=1).astype(np.uint8)


def write_synthetic_shards(out: Path, n: int, samples_per_shard: int, pool_size: int = 16384,
                           seed: int = 0) -> dict:
    """N labelled samples in dcscale's shard format (tars, index.npy, manifest.json), written as whole
    blocks: every sample is one 2 KiB record taken from a pre-encoded pool, with its key (the global
    index) and tar checksums patched in. Returns N, the shard count, the bytes written and the seconds."""
    from dcscale.data.manifest import FORMAT_VERSION, Manifest, ShardInfo, save_manifest
    from dcscale.data.tarindex import TarIndex, save_index, scan_tar
    from dcscale.data.writers import KEY_FORMAT, SHARD_PATTERN

    t0 = time.perf_counter()
    pngs, pool_labels = image_pool(pool_size, seed)
    zero_key = KEY_FORMAT.format(0)
    key_len = len(zero_key)
    # Pool records with key 000000000; a key's digits then add their values to both checksums.
    records = np.stack([np.concatenate([_member(f"{zero_key}.png", png),
                                        _member(f"{zero_key}.cls", str(int(label)).encode())])
                        for png, label in zip(pngs, pool_labels)])
    checksums = np.stack([records[:, 148:154], records[:, BLOCK * 2 + 148:BLOCK * 2 + 154]], axis=1)
    checksums = ((checksums - ord("0")) * 8 ** np.arange(5, -1, -1)).sum(axis=2)  # [pool, 2]
    png_sizes = np.array([len(p) for p in pngs], np.int64)
    label_sizes = np.array([len(str(int(c))) for c in pool_labels], np.int64)

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, n])
    choice = rng.integers(pool_size, size=n)
    shards, indexes, labels = [], [], []
    positions = np.arange(samples_per_shard, dtype=np.int64)
    for shard_id, start in enumerate(range(0, n, samples_per_shard)):
        pick = choice[start:start + samples_per_shard]
        count = len(pick)
        global_index = np.arange(start, start + count, dtype=np.int64)
        key = (global_index[:, None] // 10 ** np.arange(key_len - 1, -1, -1)) % 10
        block = records[pick]
        sums = checksums[pick] + key.sum(axis=1, keepdims=True)
        for member in (0, 2):  # png header, cls header
            at = member * BLOCK
            block[:, at:at + key_len] = key + ord("0")
            block[:, at + 148:at + 155] = _octal_checksums(sums[:, member // 2])
        body = block.tobytes()
        end = len(body) + 2 * BLOCK  # end-of-archive marker, then padding to tarfile's record size
        size = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        name = SHARD_PATTERN.format(shard_id)
        with open(out / name, "wb") as f:
            f.write(body)
            f.write(bytes(size - len(body)))
        offsets = positions[:count] * RECORD
        indexes.append(TarIndex(keys=np.ascontiguousarray(block[:, :key_len]).view(f"S{key_len}").ravel(),
                                image_offset=offsets + BLOCK, image_size=png_sizes[pick],
                                image_ext=np.zeros(count, np.uint8), label_offset=offsets + 3 * BLOCK,
                                label_size=label_sizes[pick]))
        labels.append(pool_labels[pick])
        shards.append(ShardInfo(name=name, count=count, size=size))
    first = scan_tar(out / shards[0].name)  # the layout above must be what a header scan finds
    for field_name in ("image_offset", "image_size", "label_offset", "label_size"):
        if not np.array_equal(getattr(first, field_name), getattr(indexes[0], field_name)):
            raise RuntimeError(f"synthetic shard layout disagrees with scan_tar on {field_name}")
    index_extra = save_index(out, indexes, labels)
    manifest = Manifest(version=FORMAT_VERSION, shards=shards, total=n, has_labels=True, num_classes=10,
                        class_names=[str(c) for c in range(10)], source=SYNTH_SOURCE, image_shape=[1, 16, 16],
                        channels=1, extra={"image_format": "png", "samples_per_shard": samples_per_shard,
                                           "pool": pool_size, "seed": seed, **index_extra})
    save_manifest(manifest, out)
    return {"n": n, "shards": len(shards), "bytes": sum(s.size for s in shards) + index_extra["index_file_size"],
            "build_s": time.perf_counter() - t0}


def shard_set_for(n: int, keep_data: Path | None, scratch: Path, samples_per_shard: int) -> tuple[Path, dict]:
    """The synthetic set of N images: reused from --keep-data when it is there, else written."""
    from dcscale.data.manifest import load_manifest
    from dcscale.errors import DataError

    root = (keep_data or scratch) / f"synthetic_n{n}"
    try:
        manifest = load_manifest(root)
        if manifest.source == SYNTH_SOURCE and manifest.total == n:
            return root, {"n": n, "shards": len(manifest.shards), "reused": True}
    except DataError:
        pass
    return root, write_synthetic_shards(root, n, samples_per_shard)


# ---- watching the ranks --------------------------------------------------------------------------------

def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # the agent (or one of its threads) is gone
        pass
    return found


def _rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


@dataclass
class RankTrace:
    """One rank's samples: time, peak RSS since the previous sample (kB), RSS (kB), open fds."""

    pid: int
    t: list[float] = field(default_factory=list)
    peak_kb: list[int] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    started: float = 0.0

    def sample(self, resettable: bool) -> bool:
        try:
            now = time.time()
            status = _status_kb(self.pid)
            if resettable:
                with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS: the next reading is the peak since this one
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        if "VmRSS" not in status:  # exited (a zombie has no memory lines)
            return False
        self.t.append(now)
        self.peak_kb.append(max(status["VmHWM"], status["VmRSS"]) if resettable else status["VmRSS"])
        self.rss_kb.append(status["VmRSS"])
        self.fds.append(fds)
        return True

    def window(self, start: float, end: float) -> dict:
        """Peak (MB) during [start, end], RSS (MB) at start, most open fds.

        Sample k covers (t[k-1], t[k]]: every sample whose interval meets the window counts with its
        peak, except the one straddling the start, which counts with the RSS it read inside the window:
        its peak may be the previous phase's, which typically peaks as it ends and frees at the boundary
        (it would lend that peak to the next phase). The sample straddling the end keeps its peak (an
        upper bound), as does a window shorter than one sample interval."""
        t = np.array(self.t)
        if len(t) == 0:
            return {}
        first = int(np.searchsorted(t, start, side="left"))  # the first sample read at or after start
        last = int(np.searchsorted(t, end, side="left"))  # the first sample read at or after end
        sel = slice(first, min(last + 1, len(t)))
        if sel.start >= sel.stop:
            return {}
        peaks = [self.peak_kb[k] for k in range(first + 1, sel.stop)]  # intervals starting in the window
        if first < last:  # the start-straddling sample was read inside the window: its RSS then
            peaks.append(self.rss_kb[first])
        peak = max(peaks) if peaks else max(self.peak_kb[sel])
        before = max(first - 1, 0)
        return {
            "peak_mb": peak / 1024,
            "start_mb": self.rss_kb[before] / 1024,
            "fds_max": max(self.fds[sel]),
        }


def _can_reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- one run -------------------------------------------------------------------------------------------

def bench_config(out: Path, args) -> Path:
    """The settings every run shares (per-run values go on the command line)."""
    path = out / "bench_config.yaml"
    path.write_text(
        "# tools/bench_scale.py: LeNet-5 on 16x16 grey PNGs upscaled to 32x32, one clustering cycle\n"
        f"seed: 0\nresume: null\n"
        f"data: {{image_size: 32, workers: {args.workers}, extract_batch_size: 256}}\n"
        "model: {arch: lenet5}\n"
        f"cluster: {{pca_dim: {args.pca_dim}, niter: {args.niter}, feature_dtype: {args.feature_dtype}}}\n"
        f"train: {{cycles: 1, epochs_per_cycle: 1, batch_size: {args.batch_size}, augment: small, hflip: false}}\n"
        f"checkpoint: {{every_steps: {args.steps}, keep_last: 1}}\n"
        "dist: {backend: gloo}\n")
    return path


def k_for(n: int, fixed: int | None) -> int:
    return fixed if fixed is not None else min(max(n // 100, 2), 10_000)


def gathered_bytes(cfg, n: int, world: int, feature_dim: int) -> dict:
    """What crosses the network in one clustering cycle (float32 rows, int32 labels), by formula.

    The PCA sample and the k-means rows are drawn uniformly over the global index, so each rank
    holds about 1/W of them; with `rank0` k-means, rank 0 receives the other ranks' (W-1)/W share of
    the training rows. The PCA sample stays where it is: only its float64 sums are all-reduced.
    """
    c = cfg.cluster
    others = (world - 1) / world
    pca_rows = 0 if c.pca_dim is None else min(c.pca_sample or n, n)
    d = c.pca_dim or feature_dim
    caps = [getattr(c, "max_train_rows", None), None if c.max_points_per_centroid is None else c.k * c.max_points_per_centroid]
    train_rows = min([n] + [cap for cap in caps if cap is not None])
    on_rank0 = getattr(c, "kmeans", "rank0") == "rank0"  # (code from before cluster.kmeans: always rank 0)
    return {
        "kmeans_mode": "rank0" if on_rank0 else "distributed",
        "pca_sample_rows": pca_rows, "kmeans_train_rows": train_rows, "feature_dim": feature_dim, "reduced_dim": d,
        "to_rank0_pca": 0,
        "to_rank0_kmeans": int(others * train_rows * d * 4) if on_rank0 else 0,
        "rank0_holds_pca_sample": int(pca_rows / world) * feature_dim * 4,  # its share
        "rank0_holds_kmeans_rows": train_rows * d * 4 if on_rank0 else int(train_rows / world) * d * 4,
        # distributed: the initial centroids, then the sums, counts and objective (float64), every iteration
        "kmeans_all_reduce_per_iter": 0 if on_rank0 or world == 1 else 8 * (c.k * (d + 1) + 1),
        "broadcast_from_rank0": (feature_dim * d + feature_dim) * 4 * (c.pca_dim is not None) + c.k * d * 4,
        "labels_all_gather_per_rank": int(others * n * 4),
    }


def _kill(proc: subprocess.Popen, ranks: list[int]) -> None:
    """The job and its ranks: torchrun may start ranks in sessions of their own, and code from before
    the ranks' launcher-death exit would keep them training and loading the machine."""
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_once(shards: Path, n: int, world: int, args, config: Path, run_dir: Path) -> dict:
    """One clustering cycle + --steps training steps under torchrun with `world` processes, watched."""
    from dcscale.config import load_config
    from dcscale.models import build_model_from_config
    from dcscale.train.checkpoint import load_checkpoint

    k = k_for(n, args.k)
    overrides = [f"data.train={shards}", f"cluster.k={k}", f"output.dir={run_dir}", *args.set]
    cfg = load_config(config, overrides)
    feature_dim = build_model_from_config(cfg, in_channels=1, image_size=cfg.data.image_size).feature_dim
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "dcscale", "train", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    stop_file = run_dir / "checkpoints" / f"cycle00000_epoch000_step{args.steps:08d}.pt"
    with open(run_dir / "bench_stdout.log", "w") as out, open(run_dir / "bench_stderr.log", "w") as err:
        started = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
        traces: dict[int, RankTrace] = {}
        resettable = None
        timed_out = False
        try:
            while True:
                if len(traces) < world:
                    for pid in _children(proc.pid):
                        if pid not in {tr.pid for tr in traces.values()}:
                            try:
                                rank = _rank_of(pid)
                            except OSError:
                                continue
                            if rank is not None:
                                traces[rank] = RankTrace(pid, started=time.time())
                                resettable = _can_reset_peak(pid) if resettable is None else resettable
                for trace in traces.values():
                    trace.sample(bool(resettable))
                if stop_file.exists() or proc.poll() is not None:
                    break
                if time.time() - started > args.timeout_min * 60:
                    timed_out = True
                    break
                time.sleep(args.poll_ms / 1000)
        finally:
            _kill(proc, [trace.pid for trace in traces.values()])
    wall = time.time() - started
    stopped_early = stop_file.exists()
    metrics_file = run_dir / "metrics.jsonl"
    if stopped_early:
        cycle = dict(load_checkpoint(stop_file)["cycle_metrics"])
        train_end, steps = stop_file.stat().st_mtime, args.steps
    elif proc.returncode == 0 and metrics_file.exists():  # the epoch had fewer than --steps steps
        cycle = json.loads(metrics_file.read_text().splitlines()[0])
        train_end = metrics_file.stat().st_mtime
        steps = round(cycle["ips_train"] * cycle["t_train"] / (world * cfg.train.batch_size))
    else:
        log = (run_dir / "bench_stderr.log").read_text()
        first = log.find("dcscale: ")  # the rank's own message, before torchrun's summary
        error = f"no result after {args.timeout_min} min" if timed_out else f"exit code {proc.returncode}"
        return {"n": n, "world": world, "k": k, "error": error, "stderr": log[max(first, 0):][:3000]}

    assign_end = (run_dir / "labels.npy").stat().st_mtime
    bounds = {"assign": (assign_end - cycle["t_assign"], assign_end)}
    # a cycle extracts and fits its PCA sample (t_pca), then extracts and projects every row (t_extract)
    for phase, before in (("kmeans", "assign"), ("extract", "kmeans"), ("pca", "extract")):
        start = bounds[before][0]
        bounds[phase] = (start - cycle[f"t_{phase}"], start)
    bounds["train"] = (train_end - cycle["t_train"], train_end)
    bounds["between"] = (assign_end, bounds["train"][0])
    first_start = min(tr.started for tr in traces.values())
    bounds["startup"] = (first_start, bounds["pca"][0])

    phases = {}
    for phase in PHASES:
        start, end = bounds[phase]
        ranks = []
        for rank in range(world):
            w = traces[rank].window(start, end) if rank in traces else {}
            base = traces[rank].window(bounds["pca"][0], bounds["pca"][0]) if rank in traces else {}
            if w and base and phase != "startup":
                w["growth_mb"] = w["peak_mb"] - base["start_mb"]  # over the rank's RSS when the cycle began
            ranks.append(w)
        phases[phase] = {"seconds": end - start, "ranks": ranks}
    return {
        "n": n, "world": world, "k": k, "steps": steps, "stopped_after_steps": stopped_early, "wall_s": wall,
        # the iterations run (faiss's early stop can end k-means before niter; older runs: niter)
        "kmeans_s_per_iter": cycle["t_kmeans"] / (cycle.get("kmeans_iterations") or cfg.cluster.niter),
        "peak_source": "VmHWM reset each poll" if resettable else "VmRSS samples",
        "polls_per_rank": [len(traces[r].t) if r in traces else 0 for r in range(world)],
        "fds_max": [max(traces[r].fds, default=0) if r in traces else None for r in range(world)],
        "bytes": gathered_bytes(cfg, n, world, feature_dim),
        "metrics": {key: cycle.get(key) for key in ("objective", "nmi_gt", "empty_clusters", "cluster_max",
                                                    "ips_extract")},
        "phases": phases,
    }


# ---- report ------------------------------------------------------------------------------------------

def exponents(runs: list[dict]) -> list[dict]:
    """log(t2/t1) / log(N2/N1) per phase between consecutive sizes, at each world size."""
    rows = []
    for world in sorted({r["world"] for r in runs}):
        ok = sorted((r for r in runs if r["world"] == world and "error" not in r), key=lambda r: r["n"])
        for a, b in zip(ok, ok[1:]):
            row = {"world": world, "n1": a["n"], "n2": b["n"]}
            for phase in TIMED_PHASES:
                t1, t2 = a["phases"][phase]["seconds"], b["phases"][phase]["seconds"]
                row[phase] = math.log(t2 / t1) / math.log(b["n"] / a["n"]) if t1 > 0 and t2 > 0 else None
            rows.append(row)
    return rows


def _ranks(values: list, spec: str) -> str:
    return " / ".join("-" if v is None else format(v, spec) for v in values)


def print_report(runs: list[dict], exps: list[dict]) -> None:
    print("| N | W | K | phase | s | peak MB (rank 0 / 1 / ...) | growth MB (rank 0 / 1 / ...) | open files |")
    print("|---:|---:|---:|---|---:|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['n']:,} | {r['world']} | {r['k']} | failed: {r['error']} | | | | |")
            continue
        for phase in PHASES:
            p = r["phases"][phase]
            peak = _ranks([w.get("peak_mb") for w in p["ranks"]], ",.0f")
            growth = "" if phase == "startup" else _ranks([w.get("growth_mb") for w in p["ranks"]], "+,.0f")
            print(f"| {r['n']:,} | {r['world']} | {r['k']} | {phase} | {p['seconds']:.2f} | {peak} | {growth} "
                  f"| {_ranks([w.get('fds_max') for w in p['ranks']], 'd')} |")
    print("\n| N | W | k-means | train steps | k-means s/iter | k-means rows | to rank 0: PCA sample MB "
          "| to rank 0: k-means rows MB | k-means all-reduce MB/iter | rank 0 holds MB | labels all-gather MB/rank |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        if "error" in r:
            continue
        b = r["bytes"]
        holds = b["rank0_holds_pca_sample"] + b["rank0_holds_kmeans_rows"]
        print(f"| {r['n']:,} | {r['world']} | {b.get('kmeans_mode', 'rank0')} | {r['steps']} "
              f"| {r['kmeans_s_per_iter']:.3f} | {b['kmeans_train_rows']:,} "
              f"| {b['to_rank0_pca'] / MB:.2f} | {b['to_rank0_kmeans'] / MB:.2f} "
              f"| {b.get('kmeans_all_reduce_per_iter', 0) / MB:.2f} | {holds / MB:.2f} "
              f"| {b['labels_all_gather_per_rank'] / MB:.2f} |")
    if exps:
        print("\nGrowth exponent of each phase's time, log(t2/t1) / log(N2/N1):\n")
        print("| W | N1 -> N2 | " + " | ".join(TIMED_PHASES) + " |")
        print("|---:|---|" + "---:|" * len(TIMED_PHASES))
        for e in exps:
            cells = " | ".join("-" if e[p] is None else f"{e[p]:.2f}" for p in TIMED_PHASES)
            print(f"| {e['world']} | {e['n1']:,} -> {e['n2']:,} | {cells} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[20_000, 200_000, 1_000_000], help="shard set sizes")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="processes per run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale"), help="run dirs and bench_scale.json")
    parser.add_argument("--keep-data", type=Path, default=None,
                        help="keep the synthetic shard sets here and reuse them (default: under --out, deleted)")
    parser.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--k", type=int, default=None, help="fixed K (default: N/100, at most 10,000)")
    parser.add_argument("--steps", type=int, default=50, help="training steps after the clustering (per rank)")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--pca-dim", type=int, default=32)
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--timeout-min", type=float, default=120.0, help="per run")
    args = parser.parse_args(argv)

    import faiss
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    config = bench_config(args.out, args)
    scratch = args.out / "data"
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "faiss": faiss.__version__, "platform": platform.platform()},
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "data": [], "runs": []}
    for n in sorted(args.n):
        shards, built = shard_set_for(n, args.keep_data, scratch, args.samples_per_shard)
        results["data"].append(built)
        if not built.get("reused"):
            print(f"N={n:,}: wrote {built['shards']} shards ({built['bytes'] / MB:,.0f} MB) "
                  f"in {built['build_s']:.1f} s", file=sys.stderr)
        for world in args.world:
            run_dir = args.out / "runs" / f"n{n}_w{world}"
            shutil.rmtree(run_dir, ignore_errors=True)
            result = run_once(shards, n, world, args, config, run_dir)
            results["runs"].append(result)
            if "error" in result:
                print(f"N={n:,} W={world}: {result['error']}; see {run_dir}/bench_stderr.log\n"
                      f"{result['stderr'][:800]}", file=sys.stderr)
            else:
                print(f"N={n:,} W={world}: {result['wall_s']:.0f} s", file=sys.stderr)
        if args.keep_data is None:
            shutil.rmtree(shards, ignore_errors=True)
    results["exponents"] = exponents(results["runs"])
    (args.out / "bench_scale.json").write_text(json.dumps(results, indent=1))
    print_report(results["runs"], results["exponents"])
    print(f"\nwrote {args.out / 'bench_scale.json'}")
    return 1 if any("error" in r for r in results["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
