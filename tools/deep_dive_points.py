"""The Deep Dive's analyses as a list of small, resumable points, each kept as one JSON file.

`tools/reproduce_deep_dive.py --dataset fmnist` (or any dataset with `--results DIR`) runs through this
module. A point is one unit of work that finishes on its own: an IA batch (`dcscale ia` over a few seeds
and every K of the plan), one training run and its probe, the probe of an untrained network, or one run
of the same network trained on the true labels (the ceiling). Its result goes to RESULTS/<kind>/<name>.json,
written atomically once the point is complete, with the settings it was measured under (its
"fingerprint"). A re-run skips every point whose file is there, so a reproduction interrupted anywhere
continues from what was committed, on any machine; a file measured under other settings is refused with
one line naming the differing keys, never mixed into a table. A run that died (its run directory has
checkpoints but its JSON was never written) is continued from its last checkpoint (dcscale's resume is
bit-exact) or, if that fails, run again from scratch; it is tabulated only once finished. Tables, figures
and the write-up are generated from the JSON files alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcscale.config import config_to_dict, format_value, load_config
from dcscale.safefile import atomic_write_text

FORMAT = 1  # of the point files; bump when a field's meaning changes
# Keys that change how fast or where a run goes, never what it computes (or that the point itself varies)
NOT_FINGERPRINTED = ("output.", "resume", "data.train", "data.test", "data.workers", "data.extract_batch_size",
                     "dist.", "checkpoint.", "eval.knn", "cluster.wait_timeout_min", "seed", "cluster.k",
                     "cluster.halt_after", "cluster.pca_dim", "cluster.labels")
CLUSTER_PHASES = ("t_extract", "t_pca", "t_kmeans", "t_assign")


class ResultsError(Exception):
    """One line for the user: a results folder that cannot be used as it is."""


# ---- the plan -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    kind: str  # ia | train | untrained | supervised
    values: tuple  # sorted (key, value) pairs: what this point varies

    @property
    def v(self) -> dict:
        return dict(self.values)

    @property
    def name(self) -> str:
        v = self.v
        if self.kind == "ia":
            return f"k{'-'.join(map(str, v['ks']))}_seeds{v['first_seed']:03d}-{v['first_seed'] + v['seeds'] - 1:03d}"
        if self.kind == "untrained":
            return f"untrained_seed{v['seed']}"
        if self.kind == "supervised":
            return f"supervised_seed{v['seed']}"
        halt = "never" if v["halt"] is None else v["halt"]
        pca = "none" if v["pca"] is None else v["pca"]
        return f"k{v['k']}_halt-{halt}_pca-{pca}_seed{v['seed']}"

    @property
    def file(self) -> str:
        return f"{self.kind}/{self.name}.json"


def ia_point(ks, first_seed: int, seeds: int) -> Point:
    return Point("ia", (("first_seed", first_seed), ("ks", tuple(ks)), ("seeds", seeds)))


def train_point(k: int, seed: int, halt: int | None = None, pca: int | None = None) -> Point:
    return Point("train", (("halt", halt), ("k", k), ("pca", pca), ("seed", seed)))


def ref_point(kind: str, seed: int) -> Point:
    return Point(kind, (("seed", seed),))


@dataclass(frozen=True)
class Plan:
    """What a reproduction measures, in the order it runs (the most telling points first, so that an
    interrupted reproduction has filled the tables that matter most)."""
    k0: int  # the config's K: the halting, PCA and seed analyses run at it
    ia_ks: tuple[int, ...]  # IA and accuracy against K
    ia_seeds_per_k: int  # IA inits for every K of ia_ks
    ia_dist_seeds: int  # IA inits at k0 (the distribution)
    ia_batch: int  # seeds per IA point
    seeds: tuple[int, ...]  # training runs per row of the K, halting and PCA tables
    halts: tuple[int, ...]  # halt_after values besides never
    pcas: tuple[int, ...]  # pca_dim values besides none
    ia_acc_seeds: tuple[int, ...]  # runs at k0 whose IA is set against their accuracy
    ref_seeds: tuple[int, ...]  # untrained and supervised reference rows
    classes: int  # the dataset's class count (the supervised run's K)

    def points(self) -> list[Point]:
        first, rest = self.seeds[0], self.seeds[1:]
        ia_k = [ia_point(self.ia_ks, s, self.ia_batch) for s in range(0, self.ia_seeds_per_k, self.ia_batch)]
        ia_dist = [ia_point((self.k0,), s, self.ia_batch)
                   for s in range(self.ia_seeds_per_k, self.ia_dist_seeds, self.ia_batch)]
        plan = [*ia_k, ref_point("untrained", self.ref_seeds[0]), train_point(self.k0, first),
                train_point(self.k0, first, halt=1), ref_point("supervised", self.ref_seeds[0]), *ia_dist]
        plan += [train_point(self.k0, first, halt=h) for h in self.halts if h != 1]
        for s in rest:  # the halting table's error bars
            plan += [train_point(self.k0, s), *(train_point(self.k0, s, halt=h) for h in self.halts)]
        plan += [train_point(k, s) for k in self.ia_ks if k != self.k0 for s in self.seeds]
        plan += [train_point(self.k0, s, pca=p) for p in self.pcas for s in self.seeds]
        plan += [train_point(self.k0, s) for s in self.ia_acc_seeds if s not in self.seeds]
        plan += [ref_point(kind, s) for s in self.ref_seeds[1:] for kind in ("untrained", "supervised")]
        seen, ordered = set(), []
        for p in plan:
            if p not in seen:
                seen.add(p)
                ordered.append(p)
        return ordered


# ---- fingerprints ---------------------------------------------------------------------------------------

def data_identity(shard_dir: Path) -> dict:
    """What the data is, not where: the manifest's shards (names, counts, bytes), size, classes, shape."""
    raw = json.loads((shard_dir / "manifest.json").read_text())
    shards = [[s["name"], s["count"], s.get("size")] for s in raw["shards"]]
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
    return {"n": raw.get("total", sum(s[1] for s in shards)), "num_classes": raw.get("num_classes"),
            "source": raw.get("source"), "shards_sha": digest}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def fingerprint(config: Path, overrides: list[str], data: Path, probe: dict, world_size: int) -> dict:
    """The settings a point's number depends on, besides what the point itself varies."""
    cfg = flatten(config_to_dict(load_config(config, overrides)))
    kept = {k: v for k, v in cfg.items() if not any(k == n or (n.endswith(".") and k.startswith(n))
                                                    for n in NOT_FINGERPRINTED)}
    return {"format": FORMAT, "config": kept, "train_data": data_identity(data / "train"),
            "test_data": data_identity(data / "test"), "probe": probe, "world_size": world_size}


def config_defaults() -> dict:
    from dcscale.config import Config

    return {f"config.{k}": v for k, v in flatten(config_to_dict(Config())).items()}


def differences(stored: dict, expected: dict) -> list[str]:
    """The keys whose values differ. A config key added to dcscale after a point was measured is not a
    difference while it keeps its default (the point was measured under that behaviour)."""
    a, b = flatten(stored), flatten(expected)
    defaults = config_defaults()
    return [f"{k} {json.dumps(a.get(k))} (expected {json.dumps(b.get(k))})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])]


# ---- the results folder ---------------------------------------------------------------------------------

class Results:
    """RESULTS/<kind>/<name>.json, one per finished point; every file checked against the expected
    fingerprint before it is trusted."""

    def __init__(self, root: Path, expected: dict):
        self.root, self.expected = root, expected

    def path(self, point: Point) -> Path:
        return self.root / point.file

    def load(self, point: Point) -> dict | None:
        path = self.path(point)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            stored_fp, values = data["fingerprint"], data["values"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ResultsError(f"{path}: not a result file of this tool ({err}); move it away to re-run the point")
        diff = differences(stored_fp, self.expected)
        if diff:
            raise ResultsError(f"{path} was measured under other settings: {'; '.join(diff[:4])}"
                               f"{' ...' if len(diff) > 4 else ''}; move it away (or re-run with those settings)")
        if values != _jsonable(point.v):
            raise ResultsError(f"{path}: its values {values} are not this point's {_jsonable(point.v)}")
        return data

    def stray_files(self, points: list[Point]) -> list[Path]:
        """Result files in the folder that no point of the plan owns (checked too: never silently ignored)."""
        owned = {self.path(p) for p in points}
        return sorted(p for p in self.root.glob("*/*.json") if p not in owned)

    def save(self, point: Point, result: dict, measured: dict) -> None:
        path = self.path(point)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"point": point.name, "kind": point.kind, "values": _jsonable(point.v),
                "fingerprint": self.expected, "result": result, "measured": measured}
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")  # a point is there whole or not at all


def _jsonable(v):
    return json.loads(json.dumps(v))


# The check probe: every network is probed a second time, at a tenth of the protocol's learning rate, so that
# a verdict resting on a probe that did not converge shows (tools/deep_dive_report.py sets them side by side).
CHECK_LR = 0.001
CHECK_KEY = "probe_low_lr"


# ---- running one point ----------------------------------------------------------------------------------

@dataclass
class Runner:
    """Runs points as `dcscale` subprocesses (under torchrun for nproc > 1) in RUNS/<kind>/<name>/."""
    config: Path
    data: Path
    runs: Path
    common: list[str]  # overrides for every command
    probe_args: list[str]
    nproc: int = 1
    env: dict = field(default_factory=dict)

    def _dcscale(self, args: list[str], log: Path, distributed: bool = False) -> int:
        if distributed and self.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(self.nproc), "-m", "dcscale", *args]
        else:
            cmd = [sys.executable, "-m", "dcscale", *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **self.env}).returncode

    def _must(self, args: list[str], log: Path, distributed: bool = False) -> None:
        code = self._dcscale(args, log, distributed)
        if code != 0:
            raise ResultsError(f"`dcscale {' '.join(args[:1])}` failed (exit {code}); see the end of {log}")

    def run(self, point: Point) -> dict:
        work = self.work_dir(point)
        log = work.parent / f"{point.name}.log"
        v = point.v
        if point.kind == "ia":
            if work.exists():  # a batch that died: its seeds are measured again (minutes)
                shutil.rmtree(work)
            self._must(["ia", "--config", str(self.config), "--vary", f"cluster.k={','.join(map(str, v['ks']))}",
                        "--seeds", str(v["seeds"]), "--out", str(work), *self.common, f"seed={v['first_seed']}"],
                       log, distributed=True)
            ia = json.loads((work / "ia.json").read_text())
            return {"n_images": ia["n_images"],
                    "samples": [{"k": s["value"], "seed": s["seed"], "ia": s["ia"], "ia_geometric": s["ia_geometric"],
                                 "objective": s["objective"], "empty_clusters": s["empty_clusters"]}
                                for s in ia["samples"]]}
        if point.kind == "untrained":
            return self._probes(point, {})
        # a training run (pseudo-labels, or the true labels) and its probe
        overrides = [*self.common, f"seed={v['seed']}", f"output.dir={work}", "resume=auto"]
        if point.kind == "supervised":
            overrides += [f"cluster.k={self.classes()}", "cluster.labels=ground_truth"]
        else:
            overrides += [f"cluster.k={v['k']}", f"cluster.halt_after={format_value(v['halt'])}",
                          f"cluster.pca_dim={format_value(v['pca'])}"]
        train = ["train", "--config", str(self.config), *overrides]
        if self._dcscale(train, log, distributed=True) != 0:
            if not work.exists():
                raise ResultsError(f"training failed; see the end of {log}")
            # a run directory left by a dead run that cannot be continued (other code, a damaged
            # checkpoint): start the point over
            print(f"deep_dive: {point.name}: could not continue {work}; running it again from scratch", flush=True)
            shutil.rmtree(work)
            self._must(train, log, distributed=True)
        return self._probes(point, run_numbers(work))

    def work_dir(self, point: Point) -> Path:
        return self.runs / point.kind / point.name

    def _probes(self, point: Point, numbers: dict) -> dict:
        """The point's result: its probe (the plan's protocol), the check probe and `numbers`."""
        return {"probe": self._probe(point, "probe.json"), **numbers, CHECK_KEY: self.check_probe(point)}

    def _probe(self, point: Point, json_name: str, extra: tuple[str, ...] = ()) -> dict:
        """`dcscale probe` of the point's network (its run's last checkpoint, or the untrained network of its
        seed); the feature cache next to the JSON serves every probe of the point."""
        work = self.work_dir(point)
        log = work.parent / f"{point.name}.log"
        if point.kind == "untrained":
            network, tail = ["--random-init", "--config", str(self.config), "--seed", str(point.v["seed"])], self.common
        else:
            network, tail = ["--checkpoint", str(work / "checkpoints" / "last.pt")], []
        probe_json = work / json_name
        self._must(["probe", *network, "--train", str(self.data / "train"), "--test", str(self.data / "test"),
                    "--json", str(probe_json), *self.probe_args, *extra, *tail], log)
        return probe_numbers(probe_json)

    def check_probe(self, point: Point) -> dict | None:
        """The same probe at a tenth of the learning rate, or None when the point's network is gone (its run
        directory is on another machine). The authors' lr (0.01, momentum 0.9, unstandardised features)
        oscillates on some networks: a Fashion-MNIST run probed 66.7% at it and 83.8% at 0.001."""
        work = self.work_dir(point)
        if point.kind != "untrained" and not (work / "checkpoints" / "last.pt").exists():
            return None
        numbers = self._probe(point, f"{CHECK_KEY}.json", ("--lr", str(CHECK_LR)))
        # the point's last probe: its feature cache (tens of MB) goes, the JSONs keep the numbers
        shutil.rmtree(work / "probe_cache", ignore_errors=True)
        return numbers

    def classes(self) -> int:
        return int(json.loads((self.data / "train" / "manifest.json").read_text())["num_classes"])


def probe_numbers(path: Path) -> dict:
    report = json.loads(path.read_text())
    (layer, res), = report["layers"].items()
    return {"layer": layer, "top1": res["top1"], "top5": res.get("top5"), "train_top1": res.get("train_top1"),
            "protocol": report.get("protocol"), "settings": report.get("settings")}


def with_train_top1(result: dict, work: Path) -> dict:
    """`result` with its probes' train top-1 read back from their JSON in the run directory where it predates
    that field (and the file still holds the same probe)."""
    out = dict(result)
    for key, name in (("probe", "probe.json"), (CHECK_KEY, f"{CHECK_KEY}.json")):
        if out.get(key) and out[key].get("train_top1") is None and (work / name).exists():
            found = probe_numbers(work / name)
            if found["top1"] == out[key]["top1"]:
                out[key] = {**out[key], "train_top1": found["train_top1"]}
    return out


def run_numbers(run_dir: Path) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = metrics[-1]
    return {"cycles": len(metrics), "clustering_cycles": sum(1 for m in metrics if m.get("clustered")),
            "ia": metrics[0].get("nmi_gt"), "final_nmi_gt": last.get("nmi_gt"), "final_nmi_prev": last.get("nmi_prev"),
            "nmi_prev": [m.get("nmi_prev") for m in metrics], "nmi_gt": [m.get("nmi_gt") for m in metrics],
            "loss": [m.get("loss") for m in metrics],
            "empty_clusters": last.get("empty_clusters"), "cluster_max": last.get("cluster_max"),
            "time_total_s": round(sum(m.get("t_cycle") or 0.0 for m in metrics), 2),
            "time_clustering_s": round(sum(m.get(p) or 0.0 for m in metrics for p in CLUSTER_PHASES), 2),
            "time_train_s": round(sum(m.get("t_train") or 0.0 for m in metrics), 2)}


def measured(wall_s: float, loads: list[float], nproc: int) -> dict:
    import faiss
    import torch

    try:  # which code measured it (the fingerprint holds the settings, not the code)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(wall_s, 1), "commit": commit,
            "load_average_mean": round(float(np.mean(loads)), 2), "cores": os.cpu_count(), "processes": nproc,
            "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__, "faiss": faiss.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def process_start(pid: int) -> str:
    """This boot's id and the process's start time (clock ticks since boot), so that a pid reused after
    a reboot or by another process is not taken for the worker that wrote a claim; "-" where /proc has
    neither."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat[stat.rindex(')') + 2:].split()[19]}"  # field 22, after the (comm)
    except (OSError, ValueError, IndexError):
        return "-"


class Claims:
    """Which worker runs which point, so that several copies of the tool (one per core, or per machine
    on a shared folder) can work through one plan side by side: RUNS/<kind>/<name>.claim, created
    exclusively, holds the worker's pid, host and process start. A claim whose process is gone on this
    host (or whose pid now belongs to another process) is stale and taken over (its run continues from
    its checkpoints); one from another host cannot be checked and is respected (remove it by hand if
    that worker died)."""

    FRESH_S = 60.0  # an empty claim younger than this is a worker still writing its name

    def __init__(self, runs: Path):
        self.runs = runs
        self.me = f"{os.getpid()} {socket.gethostname()} {process_start(os.getpid())}"

    def path(self, point: Point) -> Path:
        return self.runs / point.kind / f"{point.name}.claim"

    def holder(self, point: Point) -> str | None:
        """The live worker that holds the point's claim ("pid P on HOST"), or None."""
        path = self.path(point)
        try:
            fields = path.read_text().split()
            pid, host, start = int(fields[0]), fields[1], (fields[2] if len(fields) > 2 else "-")
        except OSError:
            return None
        except (ValueError, IndexError):  # empty or damaged: a worker writing it now, or a dead one's
            try:
                fresh = time.time() - path.stat().st_mtime < self.FRESH_S
            except OSError:
                return None
            return "a worker writing its claim" if fresh else None
        if host != socket.gethostname():
            return f"pid {pid} on {host}"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        if start != "-" and process_start(pid) != start:
            return None  # the pid was reused (a reboot since, or another process)
        return None if pid == os.getpid() else f"pid {pid} on {host}"

    def take(self, point: Point) -> str | None:
        """Claims the point for this worker. Returns None when taken, else the holder."""
        path = self.path(point)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                holder = self.holder(point)
                if holder is not None:
                    return holder
                path.unlink(missing_ok=True)  # stale: its worker died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me + "\n")
            return None
        return "another worker"  # lost the race for a stale claim to a worker that took it first

    def release(self, point: Point) -> None:
        try:
            if self.path(point).read_text().strip() == self.me:
                self.path(point).unlink()
        except OSError:
            pass


def add_check_probes(points: list[Point], results: Results, runner: Runner, until: float | None = None) -> int:
    """Completes finished points measured before the check probe existed, where their network is still here
    (the run's last checkpoint under RUNS; an untrained network comes back from its seed): the check probe,
    and the probes' train top-1 (read back from their JSON). A point held by another worker is left to it.
    Returns how many were completed."""
    def complete(result: dict) -> bool:
        return result.get(CHECK_KEY) is not None and all(
            result[key].get("train_top1") is not None for key in ("probe", CHECK_KEY))

    claims, added, gone = Claims(runner.runs), 0, []
    for point in points:
        data = results.load(point) if point.kind != "ia" else None
        if data is None or complete(data["result"]):
            continue
        if until is not None and time.time() > until:
            break
        if claims.take(point) is not None:
            continue
        try:
            data = results.load(point)  # (again, under the claim)
            result = data["result"]
            if complete(result):
                continue
            if result.get(CHECK_KEY) is None:
                numbers = runner.check_probe(point)
                if numbers is None:
                    gone.append(point.name)
                    continue
                result = {**result, CHECK_KEY: numbers}
                print(f"deep_dive: added the check probe (lr {CHECK_LR}) to {point.file}: top-1 "
                      f"{100 * numbers['top1']:.2f}% (the protocol's: {100 * result['probe']['top1']:.2f}%)",
                      flush=True)
            result = with_train_top1(result, runner.work_dir(point))
            if result != data["result"]:
                results.save(point, result, data["measured"])
                added += 1
        finally:
            claims.release(point)
    if gone:
        print(f"deep_dive: note: {len(gone)} finished point(s) have no check probe and their networks are not in "
              f"{runner.runs} (measured on another machine): {', '.join(gone)}", flush=True)
    return added


def run_plan(points: list[Point], results: Results, runner: Runner, max_points: int | None = None,
             until: float | None = None, on_saved=None) -> tuple[int, int]:
    """Runs the points that have no result yet, in order, skipping those another worker has claimed
    or finished meanwhile. Returns (run now, still missing)."""
    for stray in results.stray_files(points):
        print(f"deep_dive: note: {stray} belongs to no point of this plan (kept, not tabulated)", flush=True)
    todo = [p for p in points if results.load(p) is None]  # also checks every finished file
    print(f"deep_dive: {len(points) - len(todo)} of {len(points)} points already in {results.root}; "
          f"{len(todo)} to run", flush=True)
    claims, done, elsewhere = Claims(runner.runs), 0, 0
    for point in todo:
        if max_points is not None and done >= max_points or until is not None and time.time() > until:
            break
        holder = claims.take(point)
        if holder is not None:
            print(f"deep_dive: {point.file} is being run by another worker ({holder}); next", flush=True)
            elsewhere += 1
            continue
        try:
            if results.load(point) is not None:  # finished by another worker since this one started
                elsewhere += 1
                continue
            print(f"deep_dive: running {point.file}", flush=True)
            start, loads = time.perf_counter(), [os.getloadavg()[0]]
            result = runner.run(point)
            loads.append(os.getloadavg()[0])
            results.save(point, result, measured(time.perf_counter() - start, loads, runner.nproc))
        finally:
            claims.release(point)
        done += 1
        print(f"deep_dive: saved {results.path(point)} ({time.perf_counter() - start:.0f} s)", flush=True)
        if on_saved is not None:
            on_saved(results.path(point))
    return done, sum(1 for p in points if results.load(p) is None)


# ---- statistics -----------------------------------------------------------------------------------------

BOOT = 10_000


def mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def median_ci(x: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median and the bootstrap percentile 95% interval of the median."""
    a = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, a.size, (BOOT, a.size))], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(np.median(a)), float(lo), float(hi)


def spearman_ci(x: list[float], y: list[float], seed: int = 0) -> dict:
    """Spearman's rho, its p-value and a bootstrap 95% interval (pairs resampled)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(x.size), "rho": None, "p": None, "lo": None, "hi": None}
    rho, p = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(2000):
        i = rng.integers(0, x.size, x.size)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boot.append(stats.spearmanr(x[i], y[i])[0])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": int(x.size), "rho": float(rho), "p": float(p), "lo": float(lo), "hi": float(hi)}


def diff_ci(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) and a bootstrap 95% interval (each group resampled)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    d = a[rng.integers(0, a.size, (BOOT, a.size))].mean(1) - b[rng.integers(0, b.size, (BOOT, b.size))].mean(1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def is_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
