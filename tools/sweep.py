#!/usr/bin/env python
"""Run a grid of config overrides and tabulate each run's final metrics and probe accuracy.

This is how the paper's halting and cluster-count experiments are reproduced, e.g.

    python tools/sweep.py --config configs/paper/cifar10_alexnet_micro.yaml \
        --grid cluster.halt_after=1,10,30,50 --out runs/sweep_halt
    python tools/sweep.py --config configs/paper/fmnist_lenet5.yaml \
        --grid cluster.k=10,50,100,500 --set train.cycles=20 --out runs/sweep_k \
        --launcher submitit --nproc 4 --partition gpu --timeout-min 600

`--grid KEY=V1,V2,...` (repeatable: a cross product) is what varies; `--set KEY=VALUE` (repeatable) is
a fixed override for every run. Every point's config and inputs are checked before the first run.
Each grid point is one training run in OUT/runs/<key-value>/ (`dcscale train`, under torchrun with
--nproc > 1), followed by a linear probe of its last checkpoint on data.test (`dcscale probe`).
Runs go one after the other (--launcher local) or as one submitit job array (--launcher submitit:
Slurm when available, else local subprocesses). A point whose run and probe already finished is
not run again (--rerun forces it). At the end OUT/sweep.csv has one row per point (with
`degenerate_cycles`: how many of the run's cycles training called degenerate clustering) and
OUT/sweep.png plots each metric against the grid value.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dcscale.config import format_value, load_config, parse_value_list
from dcscale.cycle.degenerate import logged_verdicts
from dcscale.errors import ConfigError, DcscaleError
from dcscale.eval.report import read_metrics
from dcscale.train.check import check_run_inputs
from dcscale.outputs import output_dir, writing

FINAL_KEYS = ("loss", "accuracy", "nmi_prev", "nmi_gt", "knn_top1", "empty_clusters", "cluster_min",
              "cluster_median", "cluster_max")
PLOT_KEYS = ("probe_top1", "nmi_gt", "knn_top1", "nmi_prev", "loss", "time_total_s")


@dataclass
class Point:
    """One grid point: its overrides, run directory and the commands that produce it."""
    values: dict[str, object]
    run_dir: Path
    cfg: object  # the point's resolved Config
    commands: list[list[str]] = field(default_factory=list)


# ---- grid ----------------------------------------------------------------------------------------

def parse_grid(specs: list[str]) -> dict[str, list]:
    """['cluster.k=10,50'] -> {'cluster.k': [10, 50]} (each value parsed as YAML, like overrides)."""
    grid = {}
    for spec in specs:
        key, values = parse_value_list(spec, "--grid", "cluster.halt_after=1,10,30")
        if key in grid:  # (a dict would keep the last one silently)
            raise ConfigError(f"--grid {key} is given twice: give all its values in one --grid {key}=v1,v2,...")
        grid[key] = values
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2,...")
    return grid


def run_name(values: dict) -> str:
    """{'cluster.halt_after': 10} -> 'halt_after-10' (a readable, filesystem-safe directory name)."""
    parts = [f"{k.rsplit('.', 1)[-1]}-{format_value(v)}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts))


def make_points(args, grid: dict[str, list]) -> list[Point]:
    """Resolve every grid point's config and check its inputs (shard sets, checkpoints), so a bad value
    or path fails now, once, not in every job; and its commands."""
    out = Path(args.out)
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        run_dir = (out / "runs" / run_name(values)).resolve()
        overrides = [*args.set, *(f"{k}={format_value(v)}" for k, v in values.items()), f"output.dir={run_dir}"]
        cfg = load_config(args.config, overrides)
        check_run_inputs(cfg, args.config, on_this_machine=args.launcher == "local", thorough=False)
        point = Point(values, run_dir, cfg)
        point.commands.append(train_command(args.config, overrides, args.nproc))
        layer = probe_layer(args, cfg)
        if layer is not None:
            point.commands.append(probe_command(run_dir, cfg, layer, args.probe_epochs))
        points.append(point)
    return points


def probe_layer(args, cfg) -> str | None:
    if args.probe_layer in ("none", ""):
        return None
    if cfg.data.test is None or cfg.data.train is None:
        return None  # nothing labelled to probe on
    return args.probe_layer


def train_command(config: str, overrides: list[str], nproc: int) -> list[str]:
    base = ["-m", "dcscale", "train", "--config", str(Path(config).resolve()), *overrides]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", *base]
    return [sys.executable, *base]


def probe_command(run_dir: Path, cfg, layer: str, epochs: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "dcscale", "probe", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
           "--train", str(Path(cfg.data.train).resolve()), "--test", str(Path(cfg.data.test).resolve()),
           "--layer", layer, "--json", str(run_dir / "probe.json")]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return cmd


# ---- running -------------------------------------------------------------------------------------

def run_commands(commands: list[list[str]], log_path: str) -> int:
    """Run one point's commands in order, appending their output to log_path; stop at a failure.

    Module-level so that submitit can pickle it for a job.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        for cmd in commands:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if code != 0:
                log.write(f"exit code {code}\n")
                return code
    return 0


def is_done(point: Point) -> bool:
    return (point.run_dir / "sweep_done").is_file()


def run_local(points: list[Point]) -> None:
    for i, point in enumerate(points, 1):
        print(f"sweep: [{i}/{len(points)}] {point.run_dir.name}", flush=True)
        code = run_commands(point.commands, str(point.run_dir / "sweep.log"))
        if code == 0:
            (point.run_dir / "sweep_done").touch()
        else:
            print(f"sweep: {point.run_dir.name} failed (exit {code}), see {point.run_dir / 'sweep.log'}",
                  file=sys.stderr)


def run_submitit(points: list[Point], args) -> None:
    """One job per point, submitted as a single job array; waits for all of them."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(args.out) / "submitit"),
                                     cluster=args.submitit_cluster)
    params = dict(name="dcscale-sweep", timeout_min=args.timeout_min, nodes=1, tasks_per_node=1,
                  cpus_per_task=args.cpus_per_task, slurm_array_parallelism=args.parallel)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    jobs = executor.map_array(run_commands, [p.commands for p in points],
                              [str(p.run_dir / "sweep.log") for p in points])
    print(f"sweep: submitted {len(jobs)} jobs ({executor.cluster}), first id {jobs[0].job_id}", flush=True)
    for point, job in zip(points, jobs):
        try:
            code = job.result()
        except Exception as err:  # a job that died (time limit, node failure): report, keep the rest
            code = f"{type(err).__name__}"
        if code == 0:
            (point.run_dir / "sweep_done").touch()
        else:
            print(f"sweep: {point.run_dir.name} failed ({code}), see {point.run_dir / 'sweep.log'}",
                  file=sys.stderr)


# ---- collecting ----------------------------------------------------------------------------------

def collect_point(point: Point) -> dict:
    """One CSV row: the grid values, status, the last cycle's metrics, total time, probe accuracy."""
    row: dict[str, object] = {k: format_value(v) for k, v in point.values.items()}
    row["run_dir"] = str(point.run_dir)
    try:
        metrics = read_metrics(point.run_dir)
    except DcscaleError:
        metrics = []
    row["status"] = "ok" if is_done(point) else ("partial" if metrics else "missing")
    row["cycles"] = len(metrics)
    row["degenerate_cycles"] = degenerate_count(metrics)
    last = metrics[-1] if metrics else {}
    for key in FINAL_KEYS:
        row[key] = last.get(key)
    times = [m.get("t_cycle") for m in metrics if isinstance(m.get("t_cycle"), (int, float))]
    row["time_total_s"] = round(sum(times), 3) if times else None
    row.update(read_probe(point.run_dir / "probe.json"))
    return row


def degenerate_count(metrics: list[dict]) -> int | None:
    """The cycles training called degenerate clustering. None (an empty cell, as for any value not
    known) when no cycle was judged: a run logged before metrics.jsonl had `degenerate`, or none yet;
    0 there would say the run was healthy. A run lengthened across that change counts its judged cycles."""
    flagged, unjudged = logged_verdicts(metrics)
    return len(flagged) if len(unjudged) < len(metrics) else None


def read_probe(path: Path) -> dict:
    """probe_top1/probe_top5 of the best probed layer, plus per-layer columns."""
    if not path.is_file():
        return {"probe_layer": None, "probe_top1": None, "probe_top5": None}
    data = json.loads(path.read_text())
    layers = data.get("layers", {})
    out: dict[str, object] = {}
    for name, res in layers.items():
        out[f"probe_{name}_top1"] = res.get("top1")
        out[f"probe_{name}_top5"] = res.get("top5")
    if layers:
        best = max(layers, key=lambda n: layers[n].get("top1", -1))
        out.update(probe_layer=best, probe_top1=layers[best].get("top1"), probe_top5=layers[best].get("top5"))
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def probe_layers(rows: list[dict]) -> list[str]:
    """The probed layers, in the order the probes list them (shallow to deep)."""
    layers: list[str] = []
    for row in rows:
        for column, value in row.items():
            name = column[len("probe_"):-len("_top1")]
            if (column.startswith("probe_") and column.endswith("_top1") and name and name not in layers
                    and isinstance(value, (int, float))):
                layers.append(name)
    return layers


def plot_panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(title, [(column, line label)]) per panel: one per PLOT_KEYS metric that has values. The probe
    panel draws each layer's top-1 (probe_top1 is each point's best layer, which may differ from point
    to point), its title or lines naming the layers."""
    panels = []
    for metric in PLOT_KEYS:
        if metric == "probe_top1":
            layers = probe_layers(rows)
            if len(layers) == 1:
                panels.append((f"linear probe top-1 ({layers[0]})", [(f"probe_{layers[0]}_top1", None)]))
            elif layers:
                panels.append(("linear probe top-1", [(f"probe_{name}_top1", name) for name in layers]))
        elif any(isinstance(r.get(metric), (int, float)) for r in rows):
            panels.append((metric, [(metric, None)]))
    return panels or [("cycles", [("cycles", None)])]


def write_plot(rows: list[dict], grid: dict[str, list], path: Path) -> None:
    """Each metric against the first grid key; one line per combination of the other keys (and per
    probed layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(grid)
    x_key, others = keys[0], keys[1:]
    xs_all = grid[x_key]
    numeric = _numeric(xs_all)
    position = {format_value(v): (v if numeric else i) for i, v in enumerate(xs_all)}
    panels = plot_panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels):
        for combo in itertools.product(*(grid[k] for k in others)):
            sub = [r for r in rows if all(r[k] == format_value(v) for k, v in zip(others, combo))]
            for column, series in columns:
                pts = [(position[r[x_key]], r[column]) for r in sub
                       if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])]
                if not pts:
                    continue
                pts.sort()
                parts = [series] if series else []
                parts += [f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in zip(others, combo)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=", ".join(parts) or None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(title.split(" (")[0])
        ax.set_title(title)
        if numeric:
            ax.set_xticks(sorted(set(xs_all)))  # the grid's values, not fractions between them
        else:
            ax.set_xticks(range(len(xs_all)), [format_value(v) for v in xs_all])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="base YAML config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values; repeat for a cross product")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed override for every run")
    p.add_argument("--out", required=True, help="sweep directory (runs/, sweep.csv, sweep.png)")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--probe-layer", default="all",
                   help="layer(s) to probe after each run (see `dcscale probe --layer`); 'none' to skip")
    p.add_argument("--probe-epochs", type=int, default=None, help="default: the config's eval.probe_epochs")
    p.add_argument("--rerun", action="store_true", help="run points again even if they finished")
    p.add_argument("--collect-only", action="store_true", help="only tabulate existing runs")
    g = p.add_argument_group("submitit")
    g.add_argument("--submitit-cluster", default=None, help="slurm, local or debug (default: detect)")
    g.add_argument("--partition", default=None)
    g.add_argument("--timeout-min", type=int, default=24 * 60)
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: --nproc on Slurm")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--parallel", type=int, default=64, help="at most this many jobs at a time")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.nproc < 1:
            raise DcscaleError(f"--nproc {args.nproc}: expected an integer >= 1 (processes per run)")
        grid = parse_grid(args.grid)
        points = make_points(args, grid)
        output_dir(args.out, "--out")
        todo = [] if args.collect_only else [p for p in points if args.rerun or not is_done(p)]
        user_resume = any(s.split("=", 1)[0].strip() == "resume" for s in args.set)
        for p in todo:
            if args.rerun:
                p.commands[0].append("resume=null")
                p.cfg.resume = None
            elif not user_resume:  # an interrupted point continues where it stopped
                p.commands[0].append("resume=auto")
                p.cfg.resume = "auto"
        # Everything each run opens at its start is checked before any run starts (or is removed by
        # --rerun, whose run directories start over: their own checkpoints are not checked).
        for p in todo:
            check_run_inputs(p.cfg, args.config, on_this_machine=args.launcher == "local", world_size=args.nproc,
                             run_dir_checks=not args.rerun)
        for p in todo:
            if args.rerun:  # start over: the point's run directory is the sweep's own
                shutil.rmtree(p.run_dir, ignore_errors=True)
        if todo and args.launcher == "local":
            run_local(todo)
        elif todo:
            if args.gpus_per_node is None and args.nproc > 1:
                args.gpus_per_node = args.nproc
            run_submitit(todo, args)
    except DcscaleError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    rows = [collect_point(p) for p in points]
    out = Path(args.out)
    try:
        with writing("--out", out):
            write_csv(rows, out / "sweep.csv")
            write_plot(rows, grid, out / "sweep.png")
    except DcscaleError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"sweep: {ok}/{len(rows)} runs ok ({len(todo)} run now); table {out / 'sweep.csv'}, "
          f"plot {out / 'sweep.png'}")
    degenerate = [f"{Path(r['run_dir']).name} ({r['degenerate_cycles']} of {r['cycles']} cycles)" for r in rows
                  if r["degenerate_cycles"]]
    if degenerate:  # the table is a file: say it where the sweep is watched too
        print(f"sweep: degenerate clustering in {len(degenerate)} of {len(rows)} runs: {', '.join(degenerate)}; "
              f"`dcscale report RUN_DIR` says which cycles and what to try")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
