"""`dcscale report RUN_DIR`: PNG plots of a run's curves, read from its metrics.jsonl, and pictures
of its clusters.

One PNG per panel (loss, pseudo-label accuracy, NMI with the previous cycle, NMI with the ground
truth, empty clusters, cluster sizes, phase times, throughput, k-NN accuracy when logged) plus
`overview.png` with all of them, and for the last clustered cycle `clusters_montage.png` (the images
nearest to the centroids of a sample of clusters) and `clusters_contingency.png` (pseudo-labels
against classes, with ground truth): the pictures TensorBoard shows, so that a run can be read
without it. Written to RUN_DIR/report/ (or --out). The cycles whose clustering training called
degenerate (metrics.jsonl's `degenerate`) are shaded on every curve, and the command says which they
were, why, and what to try.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcscale.cycle.degenerate import ADVICE, cycle_ranges, cycle_runs, logged_verdicts
from dcscale.errors import DcscaleError
from dcscale.outputs import output_dir, writing
from dcscale.cycle.records import metrics_lines

log = logging.getLogger("dcscale")

PHASES = ("t_extract", "t_pca", "t_kmeans", "t_assign", "t_train", "t_images")
DEGENERATE_LABEL = "degenerate clustering"  # the shaded cycles' legend entry
MAX_DEGENERATE_RUNS = 8  # runs of degenerate cycles given a line each (the newest); the headline lists all


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: list[tuple[str, str]]  # (metric key, legend label)
    counts: bool = False  # whole numbers >= 0: integer ticks, the axis from 0
    wide: bool = False  # may span orders of magnitude: a log axis when it does


PANELS: dict[str, Panel] = {
    "loss": Panel("Training loss", "cross-entropy", [("loss", "loss")]),
    "accuracy": Panel("Pseudo-label train accuracy", "accuracy", [("accuracy", "accuracy")]),
    "nmi_prev": Panel("NMI with the previous cycle", "NMI", [("nmi_prev", "NMI(t, t-1)")]),
    "nmi_gt": Panel("NMI with the ground truth", "NMI", [("nmi_gt", "NMI(labels, truth)")]),
    "knn": Panel("k-NN accuracy on the test set", "top-1", [("knn_top1", "k-NN top-1")]),
    "empty_clusters": Panel("Empty clusters", "clusters", [("empty_clusters", "empty")], counts=True),
    "cluster_sizes": Panel("Cluster sizes", "images per cluster",
                           [("cluster_max", "max"), ("cluster_median", "median"), ("cluster_min", "min")],
                           counts=True, wide=True),
    "phase_times": Panel("Phase times", "seconds", [(k, k[2:]) for k in PHASES] + [("t_cycle", "cycle")],
                         wide=True),
    "throughput": Panel("Throughput", "images / s", [("ips_extract", "extract"), ("ips_train", "train")]),
}


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of metrics.jsonl sorted by cycle; a resumed run's repeated cycles keep the last row.

    A truncated last line (the run is still writing) is ignored; a corrupt line elsewhere is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DcscaleError(f"no metrics file: {path} (is this a run directory?)")
    lines = metrics_lines(path)
    by_cycle: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DcscaleError(f"{path} line {number}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("cycle"), int):
            raise DcscaleError(f"{path} line {number}: expected a JSON object with an integer 'cycle'")
        by_cycle[int(row["cycle"])] = row
    return [by_cycle[c] for c in sorted(by_cycle)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(cycles, values) where the key is present and a finite number."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["cycle"])
            ys.append(float(value))
    return xs, ys


def _draw(ax, rows: list[dict], panel: Panel) -> bool:
    """Draw one panel on `ax`; False when none of its metrics was logged."""
    from matplotlib.ticker import MaxNLocator

    values, drawn = [], 0
    for key, label in panel.series:
        xs, ys = _series(rows, key)
        if not xs:
            continue
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        values += ys
        drawn += 1
    # Mark the cycles where clustering was skipped (early clustering stop).
    halted = [r["cycle"] for r in rows if r.get("clustered") is False]
    if drawn and halted:
        ax.axvspan(min(halted) - 0.5, max(halted) + 0.5, color="0.9", zorder=0,
                   label="clustering halted")
    # And the cycles whose clustering training called degenerate (none for a run logged before the field).
    flagged = logged_verdicts(rows)[0] if drawn else []
    for i, (first, last) in enumerate(cycle_runs(flagged)):
        ax.axvspan(first - 0.5, last + 0.5, color="tab:red", alpha=0.15, lw=0, zorder=0,
                   label=DEGENERATE_LABEL if i == 0 else None)
    ax.set_title(panel.title)
    ax.set_xlabel("cycle")
    ax.set_ylabel(panel.ylabel)
    # every panel spans the run's cycles, with ticks on whole cycles only
    first, last = rows[0]["cycle"], rows[-1]["cycle"]
    pad = max(0.5, 0.03 * (last - first))
    ax.set_xlim(first - pad, last + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        _scale_y(ax, values, panel)
    if drawn > 1 or (drawn and (halted or flagged)):  # beside the axes, never over the lines
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    return bool(drawn)


def _scale_y(ax, values: list[float], panel: Panel) -> None:
    """A log axis with 1-2-5 ticks when a wide panel spans more than 20x (symlog, from 0, when it
    holds zeros); otherwise linear, without an offset, from 0 for counts and for an all-equal series."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    low, top = min(values), max(values)
    positive = [v for v in values if v > 0]
    if panel.wide and positive and top / min(positive) > 20:
        smallest = min(positive)
        if low > 0:
            ax.set_yscale("log")
            ax.set_ylim(smallest / 1.25, top * 1.25)
        else:  # zeros (an empty cluster, a halted cycle's phases): linear up to the smallest positive value
            ax.set_yscale("symlog", linthresh=min(1.0, smallest), linscale=0.3)
            ax.set_ylim(0, top * 1.25)
        ax.yaxis.set_major_locator(FixedLocator(_log_ticks(smallest, top, zero=low <= 0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1 else f"{v:g}"))
        return
    if panel.counts:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if low >= 0 and (panel.counts or low == top):
        ax.set_ylim(0, max(top * 1.08, 1 if panel.counts or top == 0 else top * 1.5))
    ax.ticklabel_format(axis="y", useOffset=False)


def _log_ticks(smallest: float, top: float, zero: bool) -> list[float]:
    """1-2-5 ticks (1-10-100 beyond three decades) from the smallest positive value to the top, and 0."""
    subs = (1, 2, 5) if top / smallest <= 1000 else (1,)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(smallest)), math.ceil(math.log10(top)) + 1)
             for m in subs]
    return ([0.0] if zero else []) + [t for t in ticks if smallest / 1.25 <= t <= top * 1.25]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with data plus overview.png; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise DcscaleError(f"{run_dir / 'metrics.jsonl'} has no cycles yet")
    out = output_dir(Path(out_dir) if out_dir is not None else run_dir / "report", "--out")

    written, shown = [], []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        if _draw(ax, rows, panel):
            fig.tight_layout()
            path = out / f"{name}.png"
            with writing("--out", out):
                fig.savefig(path, dpi=100)
            written.append(path)
            shown.append(name)
        plt.close(fig)

    cols = 3
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, shown):
        _draw(ax, rows, PANELS[name])
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    flagged = logged_verdicts(rows)[0]
    fig.suptitle(f"{run_dir.name}: {len(rows)} cycles"
                 + (f", degenerate clustering in cycles {cycle_ranges(flagged)} (shaded)" if flagged else ""))
    fig.tight_layout()
    path = out / "overview.png"
    with writing("--out", out):
        fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written + write_cluster_images(run_dir, rows, out)


def write_cluster_images(run_dir: Path, rows: list[dict], out: Path) -> list[Path]:
    """clusters_montage.png and clusters_contingency.png of the last clustered cycle, from the run's
    clusters.json, labels.npy and training shard set (config.yaml's data.train); the paths written.
    Those missing (an older run, a shard set elsewhere) are skipped with a note."""
    from PIL import Image

    from dcscale.config import load_config
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle import images

    clustered = [r for r in rows if r.get("clustered")]
    if not clustered:
        return []
    last = clustered[-1]
    try:
        cfg = load_config(run_dir / "config.yaml")
        shards = ShardSet(cfg.data.train)
    except DcscaleError as err:
        log.info("report: no cluster pictures (%s)", err)
        return []
    pictures = {}
    # a finished run's is the last clustered cycle's; a stopped one's, its newest image cycle's
    record = images.read_record(run_dir, len(shards))
    if record is not None and record["cycle"] <= last["cycle"] and record["clusters"]:
        pictures["clusters_montage"] = images.render_montage(shards, record)
    else:
        log.info("report: no montage: %s holds none up to cycle %d", run_dir / images.RECORD_NAME, last["cycle"])
    truth = shards.labels()
    if truth is not None:
        labels = _saved_labels(run_dir / "labels.npy", len(truth), cfg.cluster.k)
        if labels is not None:
            nmi = last.get("nmi_gt")
            title = f"cycle {last['cycle']}: pseudo-labels against classes" + (f", NMI {nmi:.3f}" if nmi else "")
            heat = images.render_contingency(labels, truth, cfg.cluster.k, title)
            if heat is not None:
                pictures["clusters_contingency"] = heat
    written = []
    for name, picture in pictures.items():
        path = out / f"{name}.png"
        with writing("--out", out):
            Image.fromarray(picture).save(path)
        written.append(path)
    return written


def _saved_labels(path: Path, n: int, k: int) -> np.ndarray | None:
    """The run's pseudo-labels (int32 [n]), or None (with a note) when they are missing or not for
    this shard set, or (with a warning) when they are not all in -1..k-1."""
    try:
        labels = np.load(path)  # never unpickles: allow_pickle is off
    except (OSError, ValueError) as err:
        log.info("report: no contingency heatmap: cannot read %s (%s)", path, err)
        return None
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        log.info("report: no contingency heatmap: %s does not hold %d integer labels", path, n)
        return None
    outside = (labels < -1) | (labels >= k)
    if outside.any():
        first = int(np.argmax(outside))
        log.warning("report: no contingency heatmap: %s holds %d label(s) outside -1..%d (cluster.k = %d), first "
                    "%d at image %d (damaged, or not this run's)", path, int(outside.sum()), k - 1, k,
                    int(labels[first]), first)
        return None
    return labels


def summary_line(rows: list[dict]) -> str:
    last = rows[-1]
    parts = [f"cycles={len(rows)}"]
    for key in ("loss", "nmi_prev", "nmi_gt", "knn_top1", "empty_clusters"):
        value = last.get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def degenerate_lines(rows: list[dict]) -> list[str]:
    """What metrics.jsonl's `degenerate` says of the run, for the console: how many cycles and which,
    why (the reason logged at the last cycle of each run of them) and what to try, in training's words.
    [] when no cycle was called degenerate, so a healthy run, or one logged before training recorded
    `degenerate`, reports as before."""
    flagged, unjudged = logged_verdicts(rows)
    if not flagged:
        return []
    reasons = {row["cycle"]: row["degenerate"] for row in rows if row.get("degenerate")}
    head = (f"degenerate clustering in {len(flagged)} of {len(rows) - len(unjudged)} cycles "
            f"(cycles {cycle_ranges(flagged)})")
    if unjudged:
        head += f"; cycles {cycle_ranges(unjudged)} were logged before metrics.jsonl had `degenerate`"
    lines = [head + ":"]
    runs = cycle_runs(flagged)
    if len(runs) > MAX_DEGENERATE_RUNS:
        lines.append(f"  ({len(runs) - MAX_DEGENERATE_RUNS} earlier runs of such cycles: see the cycles above)")
    for first, last in runs[-MAX_DEGENERATE_RUNS:]:
        where = f"cycle {last}" if first == last else f"cycles {first}-{last}"
        lines.append(f"  {where}: {reasons[last]}" + ("" if first == last else f" (at cycle {last})"))
    lines.append(f"  {ADVICE}")
    return lines


# ---- `dcscale report RUN_DIR` ------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="run directory (output.dir) holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/report)")


def run(args) -> int:
    written = write_report(args.run_dir, args.out)
    rows = read_metrics(args.run_dir)
    print(f"report: {len(written)} PNGs in {written[-1].parent} ({summary_line(rows)})")
    for line in degenerate_lines(rows):
        print(line)
    return 0
