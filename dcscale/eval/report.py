"""`dcscale report RUN_DIR`: PNG plots of a run's curves, read from its metrics.jsonl.

One PNG per panel (loss, pseudo-label accuracy, NMI with the previous cycle, NMI with the ground
truth, empty clusters, cluster sizes, phase times, throughput, k-NN accuracy when logged) plus
`overview.png` with all of them, written to RUN_DIR/report/ (or --out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dcscale.errors import DcscaleError
from dcscale.train.logging import metrics_lines

PHASES = ("t_extract", "t_pca", "t_kmeans", "t_assign", "t_train")

# name -> (title, y label, [(metric key, legend label)], log scale)
PANELS: dict[str, tuple[str, str, list[tuple[str, str]], bool]] = {
    "loss": ("Training loss", "cross-entropy", [("loss", "loss")], False),
    "accuracy": ("Pseudo-label train accuracy", "accuracy", [("accuracy", "accuracy")], False),
    "nmi_prev": ("NMI with the previous cycle", "NMI", [("nmi_prev", "NMI(t, t-1)")], False),
    "nmi_gt": ("NMI with the ground truth", "NMI", [("nmi_gt", "NMI(labels, truth)")], False),
    "knn": ("k-NN accuracy on the test set", "top-1", [("knn_top1", "k-NN top-1")], False),
    "empty_clusters": ("Empty clusters", "clusters", [("empty_clusters", "empty")], False),
    "cluster_sizes": ("Cluster sizes", "images per cluster",
                      [("cluster_max", "max"), ("cluster_median", "median"), ("cluster_min", "min")], True),
    "phase_times": ("Phase times", "seconds", [(k, k[2:]) for k in PHASES] + [("t_cycle", "cycle")], False),
    "throughput": ("Throughput", "images / s", [("ips_extract", "extract"), ("ips_train", "train")], False),
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


def _draw(ax, rows: list[dict], panel: tuple) -> bool:
    """Draw one panel on `ax`; False when none of its metrics was logged."""
    title, ylabel, keys, log = panel
    drawn = False
    for key, label in keys:
        xs, ys = _series(rows, key)
        if not xs:
            continue
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        drawn = True
    # Mark the cycles where clustering was skipped (early clustering stop).
    halted = [r["cycle"] for r in rows if r.get("clustered") is False]
    if drawn and halted:
        ax.axvspan(min(halted) - 0.5, max(halted) + 0.5, color="0.9", zorder=0,
                   label="clustering halted")
    ax.set_title(title)
    ax.set_xlabel("cycle")
    ax.set_ylabel(ylabel)
    if log and drawn:
        ax.set_yscale("symlog", linthresh=1)
    if drawn and (len(keys) > 1 or halted):
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return drawn


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with data plus overview.png; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise DcscaleError(f"{run_dir / 'metrics.jsonl'} has no cycles yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    written, shown = [], []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        if _draw(ax, rows, panel):
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
            shown.append(name)
        plt.close(fig)

    cols = 3
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, shown):
        _draw(ax, rows, PANELS[name])
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: {len(rows)} cycles")
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


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


# ---- `dcscale report RUN_DIR` ------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="run directory (output.dir) holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/report)")


def run(args) -> int:
    written = write_report(args.run_dir, args.out)
    rows = read_metrics(args.run_dir)
    print(f"report: {len(written)} PNGs in {written[-1].parent} ({summary_line(rows)})")
    return 0
