"""Per-cycle logging by rank 0: metrics.jsonl, TensorBoard events, one console line per cycle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dcscale.errors import DcscaleError

PHASES = ("extract", "pca", "kmeans", "assign", "train")


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

    def __init__(self, run_dir: str | Path, resume_cycle: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_from(resume_cycle)
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_cycle if resume_cycle else None)

    def _truncate_from(self, cycle: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in metrics_lines(self.path):
            try:
                if json.loads(line).get("cycle", -1) < cycle:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def log_cycle(self, metrics: dict, cluster_sizes: np.ndarray | None = None) -> None:
        row = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        cycle = metrics["cycle"]
        for key, value in row.items():
            if key != "cycle" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(_tb_name(key), value, cycle)
        self.tb.add_scalar("cluster/clustered", float(bool(metrics.get("clustered"))), cycle)
        if cluster_sizes is not None and len(cluster_sizes):
            self.tb.add_histogram("cluster/sizes", cluster_sizes, cycle)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def metrics_lines(path: Path) -> list[str]:
    """The lines of a metrics.jsonl. A kill can cut the last line short, but only damage (a disk fault,
    a crash that left zeros, another program) leaves bytes that are not text: those stop with one line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DcscaleError(f"cannot read {path}: {err.strerror}") from None
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
            damaged = b"\x00" in raw
        except UnicodeDecodeError:
            damaged = True
        if damaged:
            raise DcscaleError(f"{path} line {number}: binary data, not text (damaged); keep the lines before it "
                               f"(head -n {number - 1} {path} > fixed && mv fixed {path}) and run again")
    return data.decode("utf-8").splitlines()


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
    return (f"cycle {m['cycle']:>3} | loss {fmt(m.get('loss'), '.4f')} | acc {fmt(m.get('accuracy'), '.3f')} "
            f"| nmi_prev {fmt(m.get('nmi_prev'), '.3f')} | nmi_gt {fmt(m.get('nmi_gt'), '.3f')} "
            f"| empty {m.get('empty_clusters')} | {clustered} | {m['t_cycle']:.1f}s "
            f"(extract {m['t_extract']:.1f} pca {m['t_pca']:.1f} kmeans {m['t_kmeans']:.1f} "
            f"assign {m['t_assign']:.1f} train {m['t_train']:.1f}){knn}")

