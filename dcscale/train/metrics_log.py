"""A cycle's metrics (its label statistics, its totals over every rank) and their logging by rank 0:
metrics.jsonl, TensorBoard events (scalars, histograms, images), one console line per cycle, the
run's summary. (The progress of long phases: dcscale.progress.)"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

from dcscale.cluster.metrics import cluster_stats, nmi_scores
from dcscale.cycle.degenerate import cycle_ranges, warning_text
from dcscale.cycle.records import metrics_lines
from dcscale.safefile import atomic_write_text, open_append
from dcscale.train.checkpoint import summed_totals

PHASES = ("extract", "pca", "kmeans", "assign", "train")
log = logging.getLogger("dcscale")


def json_row(metrics: dict) -> dict:
    """A cycle's metrics.jsonl row: JSON-safe values."""
    return {k: _clean(v) for k, v in metrics.items()}


def _clean(value):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes one JSON object per cycle and the matching TensorBoard scalars (rank 0 only).

    On resume from cycle C, lines for cycles >= C are dropped from metrics.jsonl and TensorBoard
    events from step C on are purged, so a resumed run's logs read like an uninterrupted run's.
    """

    def __init__(self, run_dir: str | Path, resume_cycle: int = 0, last_row: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_from(resume_cycle, last_row)
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_cycle if resume_cycle else None)

    def _truncate_from(self, cycle: int, last_row: dict | None = None) -> None:
        """Keep the rows of cycles before `cycle`. A line that is not a JSON row (cut short: by a kill
        while it was written, which the resume redoes anyway, or by later damage) is dropped with a
        warning; the row of the checkpoint's last finished cycle (`last_row`) is written again when it is
        missing, and rows still missing are named, never lost without a word."""
        if not self.path.exists():
            return
        kept, damaged = {}, []
        for number, line in enumerate(metrics_lines(self.path), 1):
            try:
                row = json.loads(line)
                row_cycle = row.get("cycle") if isinstance(row, dict) else None
            except json.JSONDecodeError:
                row_cycle = None
            if not isinstance(row_cycle, int) or isinstance(row_cycle, bool):
                if line.strip():
                    damaged.append(number)
                continue
            if row_cycle < cycle:
                kept[row_cycle] = line
        missing = [c for c in range(cycle) if c not in kept]
        restored = last_row is not None and last_row.get("cycle") in missing
        if restored:
            kept[last_row["cycle"]] = json.dumps(last_row)
            missing.remove(last_row["cycle"])
        if damaged or restored or missing:
            what = f"line(s) {', '.join(map(str, damaged))} damaged (not a JSON row), dropped" if damaged else \
                "rows missing"
            fixed = f"; the row of cycle {last_row['cycle']} was written again from the checkpoint" if restored else ""
            lost = (f"; no row for cycle(s) {', '.join(map(str, missing))} (the checkpoint holds only its last "
                    f"cycle's row): their numbers are lost from metrics.jsonl" if missing else "")
            log.warning("%s: %s%s%s", self.path, what, fixed, lost)
        atomic_write_text(self.path, "".join(f"{kept[c]}\n" for c in sorted(kept)))

    def log_cycle(self, metrics: dict, cluster_sizes: np.ndarray | None = None, draw_images=None) -> None:
        """One cycle's row and scalars; `draw_images()` ({tag: uint8 [H, W, 3]}) is drawn and written
        first, so that its cost, t_images, is in the row."""
        if draw_images is not None:
            start = time.perf_counter()
            for tag, image in draw_images().items():
                self.add_image(tag, image, metrics["cycle"])
            metrics["t_images"] = time.perf_counter() - start
        row = json_row(metrics)
        with open_append(self.path) as f:
            f.write(json.dumps(row) + "\n")
        cycle = metrics["cycle"]
        for key, value in row.items():
            if key != "cycle" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(_tb_name(key), value, cycle)
        self.tb.add_scalar("cluster/clustered", float(bool(metrics.get("clustered"))), cycle)
        if "degenerate" in metrics:  # a 0/1 curve to spot the cycles, and the words on the ones that are
            self.tb.add_scalar("cluster/degenerate", float(bool(metrics["degenerate"])), cycle)
            if metrics["degenerate"]:
                self.tb.add_text("warnings/degenerate_clustering", warning_text(metrics["degenerate"]), cycle)
        if cluster_sizes is not None and len(cluster_sizes):
            self.tb.add_histogram("cluster/sizes", cluster_sizes, cycle)
        self.tb.flush()

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """uint8 [H, W] (grey) or [H, W, 3] as a TensorBoard image. Encoded here: SummaryWriter.add_image
        goes through float32, colour and PNG level 6, 2-3x slower for the same picture."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        from dcscale.cycle.images import png_bytes

        encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3 if image.ndim == 3 else 1,
                                encoded_image_string=png_bytes(image))
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)

    def close(self) -> None:
        self.tb.close()


def _tb_name(key: str) -> str:
    if key.startswith("t_") or key.startswith("ips_"):
        return f"time/{key}"
    if key.startswith("nmi") or key in ("objective", "empty_clusters") or key.startswith("cluster_"):
        return f"cluster/{key}"
    if key.startswith("knn"):
        return f"eval/{key}"
    return f"train/{key}"


def console_line(m: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    clustered = "clustered" if m.get("clustered") else "halted"
    knn = f" | knn {m['knn_top1']:.3f}" if m.get("knn_top1") is not None else ""
    warning = f" | WARNING {warning_text(m['degenerate'])}" if m.get("degenerate") else ""
    return (f"cycle {m['cycle']:>3} | loss {fmt(m.get('loss'), '.4f')} | acc {fmt(m.get('accuracy'), '.3f')} "
            f"| nmi_prev {fmt(m.get('nmi_prev'), '.3f')} | nmi_gt {fmt(m.get('nmi_gt'), '.3f')} "
            f"| empty {m.get('empty_clusters')} | {clustered} | {m['t_cycle']:.1f}s "
            f"(extract {m['t_extract']:.1f} pca {m['t_pca']:.1f} kmeans {m['t_kmeans']:.1f} "
            f"assign {m['t_assign']:.1f} train {m['t_train']:.1f}){knn}{warning}")





def label_metrics(state, gt_labels, k: int, clustered: bool) -> dict:
    """The cycle's labels against the previous cycle's and the ground truth, and their cluster sizes."""
    stats = cluster_stats(state.labels, k)
    # NMI with arithmetic normalisation (scikit-learn's default, the Deep Dive's) and, under
    # *_geometric, with the geometric one the original DeepCluster reported (sklearn <= 0.20).
    none = {"arithmetic": None, "geometric": None}
    prev = nmi_scores(state.prev_labels, state.labels) if clustered and state.prev_labels is not None else none
    gt = nmi_scores(gt_labels, state.labels) if gt_labels is not None else none
    return {
        "nmi_prev": prev["arithmetic"], "nmi_prev_geometric": prev["geometric"],
        "nmi_gt": gt["arithmetic"], "nmi_gt_geometric": gt["geometric"],
        "empty_clusters": stats["empty"],
        "cluster_min": stats["min"], "cluster_median": stats["median"], "cluster_max": stats["max"],
        "skipped_images": state.skipped_images,
    }


def finish_cycle_metrics(state) -> dict:
    """The cycle's metrics with its loss, accuracy and speed over every rank (a collective)."""
    totals = summed_totals(state.totals)
    m = dict(state.cycle_metrics)
    m["loss"] = totals["loss_sum"] / max(totals["seen"], 1)
    m["accuracy"] = totals["correct"] / max(totals["seen"], 1)
    m["ips_train"] = totals["seen"] / max(m["t_train"], 1e-9)
    m["t_cycle"] = sum(m.get(f"t_{p}", 0.0) for p in PHASES)
    m["peak_mem_mb"] = peak_memory_mb()
    m.setdefault("ips_extract", None)
    return m


def peak_memory_mb() -> float:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if torch.cuda.is_available():
        return max(rss_mb, torch.cuda.max_memory_allocated() / 2**20)
    return rss_mb


def print_summary(history: list[dict], run_dir: Path) -> None:
    if not history:
        print(f"dcscale train: nothing to do (all cycles done); run dir {run_dir}")
        return
    curve = " ".join("-" if m.get("nmi_prev") is None else f"{m['nmi_prev']:.2f}" for m in history)
    gt = " ".join("-" if m.get("nmi_gt") is None else f"{m['nmi_gt']:.2f}" for m in history)
    print(f"NMI(t-1, t) by cycle: {curve}")
    print(f"NMI(labels, t) by cycle: {gt}")
    degenerate = [m["cycle"] for m in history if m.get("degenerate")]
    if degenerate:
        print(f"degenerate clustering in {len(degenerate)} of {len(history)} cycles (cycles "
              f"{cycle_ranges(degenerate)}): see their cycle lines")
    last = history[-1]
    print(f"dcscale train: done {last['cycle'] + 1} cycles, final loss {last['loss']:.4f}; "
          f"metrics {run_dir / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
