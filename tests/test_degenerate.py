"""Degenerate clustering is said in words: the rule on label arrays, and real tiny runs built to collapse
(the cycle line, metrics.jsonl's `degenerate`, TensorBoard's scalar and text) against a healthy one; and
`dcscale report` and tools/sweep.py's table read it back, a run logged before the field as before."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import metrics, tiny_run_overrides
from test_sweep import _load_sweep_module
from dcscale.cli import main as cli_main
from dcscale.cluster.metrics import cluster_stats
from dcscale.data.build import write_shard_set
from dcscale.data.converters import SourceData, read_digits
from dcscale.eval.report import DEGENERATE_LABEL, PANELS, _draw, degenerate_lines, read_metrics
from dcscale.cycle.degenerate import ADVICE, cycle_ranges, cycle_runs, degenerate_clustering, giant_cluster_share
from dcscale.train.metrics_log import console_line

TEST_CONFIG = Path(__file__).parent / "train_test.yaml"
TEXT_TAG = "warnings/degenerate_clustering/text_summary"  # torch's add_text adds /text_summary


def sizes_of(labels, k: int) -> np.ndarray:
    return cluster_stats(np.asarray(labels, dtype=np.int32), k)["sizes"]


# ---- the rule, on synthetic labels ------------------------------------------------------------------

def test_one_giant_cluster_is_named_with_its_share():
    labels = np.r_[np.zeros(83, int), np.arange(17) % 9 + 1]  # 83 of 100 images in cluster 0, K=10
    assert degenerate_clustering(sizes_of(labels, 10), cycle=3, loss=0.01, accuracy=1.0) == \
        "one cluster holds 83% of the images"


@pytest.mark.parametrize("k, healthy, degenerate", [(2, 0.74, 0.76), (5, 0.59, 0.61), (10, 0.54, 0.56),
                                                    (1000, 0.50, 0.51)])
def test_giant_cluster_threshold_is_midway_between_fair_share_and_all(k, healthy, degenerate):
    # K=2 always has a cluster of at least half: "more than half" alone would warn on every such run.
    assert giant_cluster_share(k) == pytest.approx((1 + 1 / k) / 2)
    n = 10_000
    for share, flagged in ((healthy, False), (degenerate, True)):
        largest = round(share * n)
        labels = np.r_[np.zeros(largest, int), 1 + np.arange(n - largest) % (k - 1)]
        reason = degenerate_clustering(sizes_of(labels, k), cycle=1, loss=0.5, accuracy=0.9)
        assert (reason is not None) == flagged, (k, share, reason)


def test_balanced_clusters_of_a_learning_network_are_healthy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, size=1437)
    # the digits demo's cycle 1 (loss 2.54, accuracy 0.19 at K=30)
    assert degenerate_clustering(sizes_of(labels, 30), cycle=1, loss=2.54, accuracy=0.19) is None


def test_skipped_images_do_not_count_toward_the_share():
    # 60 of 100 in cluster 0 would be degenerate at K=10 (> 55%), but 20 of them are skipped (-1)
    labels = np.r_[np.zeros(40, int), -np.ones(20, int), 1 + np.arange(40) % 9]
    assert degenerate_clustering(sizes_of(labels, 10), cycle=1, loss=1.0, accuracy=0.6) is None
    labels[40:60] = 0
    assert "60%" in degenerate_clustering(sizes_of(labels, 10), cycle=1, loss=1.0, accuracy=0.6)


def test_a_network_at_chance_is_not_learning_from_cycle_1_on():
    sizes = sizes_of(np.arange(1000) % 10, 10)
    at_chance = {"loss": math.log(10) + 0.01, "accuracy": 0.098}
    reason = degenerate_clustering(sizes, cycle=2, **at_chance)
    assert reason.startswith("the network is not learning its pseudo-labels: loss 2.313 at chance level "
                             "(ln 10 = 2.303), accuracy 0.098 (chance 0.100)")
    # cycle 0 trains a random network: near chance is normal there (the digits demo: 3.37 at ln 30 = 3.40)
    assert degenerate_clustering(sizes, cycle=0, **at_chance) is None
    assert degenerate_clustering(sizes, cycle=2, loss=math.log(10) - 0.05, accuracy=0.098) is None
    assert degenerate_clustering(sizes, cycle=2, loss=math.log(10) + 0.01, accuracy=0.16) is None
    assert degenerate_clustering(sizes, cycle=2, loss=None, accuracy=None) is None


def test_chance_counts_the_non_empty_clusters_only():
    sizes = sizes_of(np.arange(1000) % 5, 10)  # K=10, five clusters empty: chance is 1/5, ln 5
    assert "ln 5" in degenerate_clustering(sizes, cycle=1, loss=math.log(5) + 0.01, accuracy=0.21)
    assert degenerate_clustering(sizes, cycle=1, loss=math.log(5) - 0.05, accuracy=0.21) is None


def test_console_line_says_it_in_words_with_what_to_try():
    row = {"cycle": 4, "loss": 0.01, "accuracy": 1.0, "nmi_prev": 1.0, "nmi_gt": 0.0, "empty_clusters": 9,
           "clustered": True, "t_cycle": 1.0, "t_extract": 0.1, "t_pca": 0.0, "t_kmeans": 0.1, "t_assign": 0.0,
           "t_train": 0.8, "degenerate": "one cluster holds 97% of the images"}
    line = console_line(row)
    assert line.startswith("cycle   4 |")
    assert line.endswith(f" | WARNING degenerate clustering: one cluster holds 97% of the images; {ADVICE}")
    for advice in ("cluster.k", "cluster.pca_dim", "train.lr", "more", "uniform cluster sampler"):
        assert advice in line
    assert "WARNING" not in console_line({**row, "degenerate": None})


def test_cycle_ranges():
    assert cycle_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert cycle_ranges([3]) == "3"
    assert cycle_runs([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)] and cycle_runs([]) == []


# ---- real runs -------------------------------------------------------------------------------------

def train(run_dir: Path, shards: Path, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dcscale", "train", "--config", str(TEST_CONFIG),
                           *tiny_run_overrides(shards, run_dir, **{"output.images_every": "null", **extra})],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cycle_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("cycle ")]


def tensorboard(run_dir: Path) -> tuple[dict[int, float], dict[int, str]]:
    """({step: cluster/degenerate}, {step: the warning's text}) from the run's event files."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    flags = {e.step: e.value for e in acc.Scalars("cluster/degenerate")}
    texts = {}
    if TEXT_TAG in acc.Tags()["tensors"]:
        for event in acc.Tensors(TEXT_TAG):
            assert event.step not in texts, "one warning per cycle"
            texts[event.step] = event.tensor_proto.string_val[0].decode()
    return flags, texts


@pytest.fixture(scope="module")
def mostly_blank_shards(tmp_path_factory) -> Path:
    """400 digits of which 360 are blank: identical features, so k-means puts them in one cluster (90%)."""
    digits = list(read_digits("train").samples)[:400]
    images = [np.zeros((8, 8), np.uint8) if i < 360 else image for i, (image, _) in enumerate(digits)]
    out = tmp_path_factory.mktemp("blank") / "train"
    write_shard_set(SourceData(samples=zip(images, [label for _, label in digits]), num_samples=400,
                               class_names=[str(d) for d in range(10)], description="mostly blank digits"),
                    out, samples_per_shard=200)
    return out


@pytest.fixture(scope="module")
def giant_cluster_run(mostly_blank_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real 2-cycle run on the mostly blank digits: one cluster holds 90% at both cycles."""
    run_dir = tmp_path_factory.mktemp("giant") / "run"
    return run_dir, train(run_dir, mostly_blank_shards)


def test_a_run_with_one_giant_cluster_says_so_every_cycle(giant_cluster_run):
    run_dir, proc = giant_cluster_run
    lines = cycle_lines(proc)
    assert len(lines) == 2
    for line in lines:
        assert line.count("WARNING") == 1
        assert line.endswith(f"| WARNING degenerate clustering: one cluster holds 90% of the images; {ADVICE}")
    assert "degenerate clustering in 2 of 2 cycles (cycles 0-1): see their cycle lines" in proc.stdout
    assert [row["degenerate"] for row in metrics(run_dir)] == ["one cluster holds 90% of the images"] * 2
    flags, texts = tensorboard(run_dir)
    assert flags == {0: 1.0, 1: 1.0}
    assert sorted(texts) == [0, 1]
    assert all(text == f"degenerate clustering: one cluster holds 90% of the images; {ADVICE}"
               for text in texts.values())


def test_a_run_that_learns_nothing_says_so(digits_train_shards, tmp_path):
    # A learning rate 40x the tiny runs' keeps the loss at ln K while the clusters stay balanced (here
    # cycles 1 and 2 both; one is asked for, as the loss hovers just above ln 10 = 2.303).
    run_dir = tmp_path / "run"
    proc = train(run_dir, digits_train_shards, **{"train.lr": 2.0, "train.cycles": 3})
    rows = metrics(run_dir)
    assert rows[0]["degenerate"] is None  # cycle 0 is never judged on its loss
    flagged = [row["cycle"] for row in rows if row["degenerate"]]
    assert flagged and all(row["degenerate"].startswith("the network is not learning its pseudo-labels: loss ")
                           for row in rows if row["degenerate"])
    lines = cycle_lines(proc)
    for cycle in range(3):
        assert ("WARNING degenerate clustering: the network is not learning" in lines[cycle]) == (cycle in flagged)
    flags, texts = tensorboard(run_dir)
    assert flags == {cycle: float(cycle in flagged) for cycle in range(3)}
    assert sorted(texts) == flagged


def test_a_healthy_run_never_warns(halted_image_run):
    # clusters at cycle 0 (the digits, K=10), trains on the same labels at cycle 1 (halted)
    run_dir, proc = halted_image_run
    assert "WARNING" not in proc.stdout and "degenerate" not in proc.stdout
    assert [row["degenerate"] for row in metrics(run_dir)] == [None, None]
    flags, texts = tensorboard(run_dir)
    assert flags == {0: 0.0, 1: 0.0}
    assert texts == {}


# ---- `dcscale report` and tools/sweep.py's table say it too --------------------------------------------

def without_degenerate(run_dir: Path, copy: Path) -> Path:
    """A copy of the run as a run logged before metrics.jsonl had `degenerate`: the key removed."""
    shutil.copytree(run_dir, copy)
    rows = [{k: v for k, v in row.items() if k != "degenerate"} for row in metrics(run_dir)]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return copy


def shaded_cycles(rows: list[dict]) -> list[tuple[float, float]]:
    """The cycle spans a report panel shades as degenerate, and (checked) its legend names them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        assert _draw(ax, rows, PANELS["loss"])
        spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches
                 if p.get_facecolor()[:3] == pytest.approx(to_rgb("tab:red"))]
        legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
        assert (DEGENERATE_LABEL in legend) == bool(spans)
        return spans
    finally:
        plt.close(fig)


def test_report_says_which_cycles_were_degenerate_and_what_to_try(giant_cluster_run, tmp_path, capsys):
    run_dir, _ = giant_cluster_run
    assert cli_main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("report: ")
    assert lines[1:] == ["degenerate clustering in 2 of 2 cycles (cycles 0-1):",
                         "  cycles 0-1: one cluster holds 90% of the images (at cycle 1)",
                         f"  {ADVICE}"]
    assert shaded_cycles(read_metrics(run_dir)) == [(-0.5, 1.5)]  # both cycles, on every curve
    assert (tmp_path / "report" / "overview.png").is_file()


def test_report_of_a_healthy_or_older_run_says_nothing_of_it(giant_cluster_run, halted_image_run, tmp_path,
                                                             capsys):
    old = without_degenerate(giant_cluster_run[0], tmp_path / "old")
    for run_dir in (old, halted_image_run[0]):
        assert cli_main(["report", str(run_dir), "--out", str(tmp_path / run_dir.name / "report")]) == 0
        out = capsys.readouterr().out
        assert out.startswith("report: ") and len(out.splitlines()) == 1 and "degenerate" not in out
        assert shaded_cycles(read_metrics(run_dir)) == []


def _rows(verdicts: dict[int, str | None | bool]) -> list[dict]:
    """metrics rows: cycle -> its `degenerate` (False: a row without the key)."""
    return [{"cycle": c, "loss": 1.0, **({} if v is False else {"degenerate": v})} for c, v in verdicts.items()]


def test_report_lines_for_runs_of_cycles_and_a_run_lengthened_across_the_field():
    giant, still = "one cluster holds 77% of the images", "the network is not learning its pseudo-labels: loss 2.4"
    rows = _rows({0: False, 1: False, 2: None, 3: "one cluster holds 64% of the images", 4: giant, 5: None,
                  6: still})
    assert degenerate_lines(rows) == [
        "degenerate clustering in 3 of 5 cycles (cycles 3-4, 6); cycles 0-1 were logged before metrics.jsonl "
        "had `degenerate`:",
        f"  cycles 3-4: {giant} (at cycle 4)",
        f"  cycle 6: {still}",
        f"  {ADVICE}"]
    assert shaded_cycles(rows) == [(2.5, 4.5), (5.5, 6.5)]
    flapping = _rows({c: giant if c % 2 else None for c in range(40)})  # 20 runs of one cycle
    lines = degenerate_lines(flapping)
    assert lines[0].startswith("degenerate clustering in 20 of 40 cycles (cycles 1, 3, 5, ")
    assert lines[1] == "  (12 earlier runs of such cycles: see the cycles above)"
    assert lines[2:-1] == [f"  cycle {c}: {giant}" for c in range(25, 40, 2)]


def test_sweep_table_counts_each_runs_degenerate_cycles(giant_cluster_run, halted_image_run, mostly_blank_shards,
                                                        tmp_path, capsys):
    """tools/sweep.py --collect-only on real runs: the collapsed one, a healthy one, and the collapsed one as
    logged before `degenerate` existed: an empty cell there (not known), not 0 (which would say healthy)."""
    sweep = _load_sweep_module()
    out = tmp_path / "sweep"
    # the grid's points are seed-0, -1, -2 (a key any config takes); their runs: copies of the real ones
    shutil.copytree(giant_cluster_run[0], out / "runs" / "seed-0")
    shutil.copytree(halted_image_run[0], out / "runs" / "seed-1")
    without_degenerate(giant_cluster_run[0], out / "runs" / "seed-2")
    for seed in range(3):
        (out / "runs" / f"seed-{seed}" / "sweep_done").touch()
    base = tmp_path / "base.yaml"
    base.write_text(f"seed: 0\ndata: {{train: {mostly_blank_shards}, workers: 0}}\nmodel: {{arch: lenet5}}\n"
                    "cluster: {k: 10, pca_dim: 16}\ntrain: {cycles: 2}\n")
    assert sweep.main(["--config", str(base), "--grid", "seed=0,1,2", "--collect-only",
                       "--probe-layer", "none", "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        cells = {row["seed"]: row["degenerate_cycles"] for row in csv.DictReader(f)}
    assert cells == {"0": "2", "1": "0", "2": ""}  # collapsed, healthy, logged before the field
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == ("sweep: degenerate clustering in 1 of 3 runs: seed-0 (2 of 2 cycles); "
                           "`dcscale report RUN_DIR` says which cycles and what to try")
