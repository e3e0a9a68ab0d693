"""`dcscale report`: PNGs from a run's metrics.jsonl and of its clusters, readable panels; the IA and
sweep plots; the digits blocks of docs/evaluation.md that tools/digits_figures.py rewrites."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_overrides
from PIL import Image

from dcscale.cli import main
from dcscale.errors import DcscaleError
from dcscale.eval.report import read_metrics, write_report


def _row(cycle, clustered=True, knn=False):
    row = {
        "cycle": cycle, "loss": 2.3 - 0.1 * cycle, "accuracy": 0.1 + 0.05 * cycle,
        "nmi_prev": None if cycle == 0 else 0.5 + 0.04 * cycle, "nmi_gt": 0.3 + 0.02 * cycle,
        "empty_clusters": max(0, 3 - cycle), "clustered": clustered, "objective": 100.0 - cycle,
        "cluster_min": cycle, "cluster_median": 50.0, "cluster_max": 200 - cycle,
        "t_extract": 1.0, "t_pca": 0.1, "t_kmeans": 0.5, "t_assign": 0.05, "t_train": 3.0,
        "t_cycle": 4.7, "ips_extract": 1000.0, "ips_train": 300.0, "peak_mem_mb": 512.0,
        "skipped_images": 0,
    }
    if knn:
        row["knn_top1"] = 0.6 + 0.01 * cycle
    return row


def _write_run(path, rows, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


def _is_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_report_cli_writes_valid_pngs(tmp_path, capsys):
    rows = [_row(c, clustered=c < 4, knn=c % 2 == 0) for c in range(6)]
    run = _write_run(tmp_path / "run", rows)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "cycles=6" in out
    names = {p.name for p in (run / "report").iterdir()}
    for expected in ("loss.png", "nmi_prev.png", "nmi_gt.png", "empty_clusters.png",
                     "cluster_sizes.png", "phase_times.png", "knn.png", "overview.png"):
        assert expected in names
    for p in (run / "report").iterdir():
        _is_png(p)


def test_report_skips_panels_without_data_and_partial_last_line(tmp_path):
    rows = [_row(c) for c in range(3)]
    for r in rows:
        r["nmi_gt"] = None  # unlabelled shard set
    run = _write_run(tmp_path / "run", rows, tail='{"cycle": 3, "loss": 1.')
    written = write_report(run, tmp_path / "out")
    names = {p.name for p in written}
    assert "nmi_gt.png" not in names and "knn.png" not in names
    assert "loss.png" in names
    for p in written:
        _is_png(p)


def test_read_metrics_keeps_last_row_of_a_resumed_cycle(tmp_path):
    rows = [_row(0), _row(1), dict(_row(1), loss=9.0), _row(2)]
    run = _write_run(tmp_path / "run", rows)
    got = read_metrics(run)
    assert [r["cycle"] for r in got] == [0, 1, 2]
    assert got[1]["loss"] == 9.0


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    run = _write_run(tmp_path / "bad", [_row(0)], tail="garbage\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(DcscaleError, match="line 2"):
        read_metrics(run)
    run = _write_run(tmp_path / "noint", [_row(0), dict(_row(1), cycle="one")])
    with pytest.raises(DcscaleError, match="line 2: expected a JSON object with an integer 'cycle'"):
        read_metrics(run)


def test_binary_tail_is_one_line_not_a_traceback(tmp_path, capsys):
    """Bytes that are not text (a disk fault, zeros left by a crash) after good rows: one line naming the
    line, and how to keep the good rows."""
    run = _write_run(tmp_path / "run", [_row(0), _row(1)])
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\x00\xff\xfe\x89PNG")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dcscale: error: {run / 'metrics.jsonl'} line 3: binary data, not text (damaged); keep the lines "
                   f"before it (head -n 2 {run / 'metrics.jsonl'} > fixed && mv fixed {run / 'metrics.jsonl'}) and "
                   f"run again"]


def test_docs_digits_blocks_are_rewritten_in_place():
    """`tools/digits_figures.py --doc` finds the demo, IA and probe blocks of docs/evaluation.md and replaces
    only them."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("digits_figures", root / "tools" / "digits_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = tool.DOC.read_text()
    assert tool.DOC == root / "docs" / "evaluation.md"
    blocks = {"demo": "```\ncycle 1 | new\n```", "ia": "| K | new |", "probe": "| features | new |"}
    new = tool.replace_blocks(page, blocks)
    for name, body in blocks.items():
        assert f"<!-- digits_figures:{name} -->\n{body}\n<!-- /digits_figures:{name} -->" in new
    assert tool.replace_blocks(new, blocks) == new

    def outside_blocks(text):
        return re.sub(r"(<!-- digits_figures:(\w+) -->\n).*?(<!-- /digits_figures:\2 -->)", r"\1\3", text, flags=re.S)

    assert outside_blocks(new) == outside_blocks(page) != new, "only the blocks' bodies change"
    with pytest.raises(SystemExit, match="no <!-- digits_figures:demo --> block"):
        tool.replace_blocks("# README\n", blocks)


# ---- a real run's report: readable panels and the pictures of its clusters -------------------------

@pytest.fixture(scope="module")
def two_cycle_run(digits_train_shards, tmp_path_factory):
    """A tiny 2-cycle run clustering at both cycles (images by default: at cycle 0 and at the last)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    proc = subprocess.run([sys.executable, "-m", "dcscale", "train", "--config",
                           str(Path(__file__).parent / "train_test.yaml"),
                           *tiny_run_overrides(digits_train_shards, run_dir)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _cluster_pictures(run_dir, out, cycle, shards):
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle.images import render_montage

    written = {p.name: p for p in write_report(run_dir, out)}
    assert {"overview.png", "phase_times.png", "clusters_montage.png", "clusters_contingency.png"} <= set(written)
    for path in written.values():
        _is_png(path)
    record = json.loads((run_dir / "clusters.json").read_text())
    assert record["cycle"] == cycle  # the last clustered cycle's
    with Image.open(written["clusters_montage.png"]) as im:
        np.testing.assert_array_equal(np.asarray(im), render_montage(ShardSet(shards), record))
    with Image.open(written["clusters_contingency.png"]) as im:
        assert im.size[0] >= 10 * 24 and im.size[1] >= 10 * 24  # 10 clusters x 10 classes


@pytest.mark.filterwarnings("error")
def test_report_of_a_two_cycle_run_shows_its_clusters(two_cycle_run, digits_train_shards, tmp_path):
    _cluster_pictures(two_cycle_run, tmp_path / "out", 1, digits_train_shards)


@pytest.mark.filterwarnings("error")
def test_report_of_a_halted_run_shows_its_last_clustered_cycle(halted_image_run, digits_train_shards, tmp_path):
    run_dir, _ = halted_image_run  # cycle 0 clustered, cycle 1 kept its labels
    _cluster_pictures(run_dir, tmp_path / "out", 0, digits_train_shards)


def test_a_damaged_montage_record_is_skipped_not_a_traceback(two_cycle_run, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_cycle_run, run)
    record = json.loads((run / "clusters.json").read_text())
    record["clusters"][0]["nearest"][0] = 10 ** 9  # beyond the shard set
    (run / "clusters.json").write_text(json.dumps(record))
    with caplog.at_level("INFO", logger="dcscale"):
        names = {p.name for p in write_report(run, tmp_path / "out")}
    assert "clusters_montage.png" not in names and "clusters_contingency.png" in names
    assert "no montage" in caplog.text


@pytest.mark.filterwarnings("error")
def test_panels_are_readable():
    """What a newcomer's short run showed: ticks at half cycles, an all-zero panel spanning -0.04..0.04,
    a log axis with one tick or none, a legend over the lines, an offset ('1e-5+2.302') on the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcscale.eval.report import PANELS, _draw

    rows = [dict(_row(c), empty_clusters=0, loss=2.30285 - 6e-5 * c) for c in range(2)]
    rows[0].update(cluster_min=0, cluster_max=180)
    fig, axes = plt.subplots(1, 3)
    for ax, name in zip(axes, ("empty_clusters", "cluster_sizes", "loss")):
        assert _draw(ax, rows, PANELS[name])
    fig.canvas.draw()
    empty, sizes, loss = axes
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0, 1], "whole cycles only"
    assert empty.get_ylim()[0] == 0 and empty.get_ylim()[1] >= 1
    assert all(float(t).is_integer() for t in empty.get_yticks())
    labels = [t.get_text() for t in sizes.get_yticklabels() if t.get_text()]
    assert sizes.get_yscale() == "symlog" and len(labels) >= 5 and "0" in labels and "100" in labels
    legend = sizes.get_legend().get_window_extent()
    assert legend.x0 >= sizes.get_window_extent().x1, "the legend is beside the axes, not over the lines"
    assert loss.yaxis.get_offset_text().get_text() == ""
    plt.close(fig)


def test_ia_boxplot_title_is_not_clipped(tmp_path):
    """With one or two values the title used to be wider than the figure: nothing may touch its edges."""
    from dcscale.eval.ia import write_boxplot

    rng = np.random.default_rng(0)
    for values in ([10], [10, 50]):
        samples = [{"value": v, "ia": float(rng.uniform(0.3, 0.6))} for v in values for _ in range(8)]
        path = tmp_path / f"ia_{len(values)}.png"
        write_boxplot("cluster.k", values, samples, "10", path)
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L"))
        assert (pixels[:, :2] == 255).all() and (pixels[:, -2:] == 255).all()


def test_sweep_probe_panel_names_its_layers():
    """probe_top1 is each point's best layer, which differs from point to point: the plot draws each
    probed layer's own line (or names the only one)."""
    spec = importlib.util.spec_from_file_location("dcscale_sweep_plot", Path(__file__).resolve().parents[1]
                                                  / "tools" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep
    spec.loader.exec_module(sweep)
    rows = [{"cluster.k": "10", "probe_layer": "conv1", "probe_top1": 0.5, "probe_conv1_top1": 0.5,
             "probe_relu2_top1": 0.4, "loss": 1.0},
            {"cluster.k": "50", "probe_layer": "relu2", "probe_top1": 0.6, "probe_conv1_top1": 0.3,
             "probe_relu2_top1": 0.6, "loss": 0.9}]
    panels = dict(sweep.plot_panels(rows))
    assert panels["linear probe top-1"] == [("probe_conv1_top1", "conv1"), ("probe_relu2_top1", "relu2")]
    only = [{k: v for k, v in r.items() if "relu2" not in k} for r in rows]
    assert dict(sweep.plot_panels(only))["linear probe top-1 (conv1)"] == [("probe_conv1_top1", None)]


def test_a_demo_log_whose_run_is_gone_is_measured_again(digits_train_shards, digits_test_shards, tmp_path):
    """tools/digits_figures.py: a finished demo.log without its run directory (removed by hand) re-runs
    the demo, and drops the probe of the old run's network, instead of failing with a traceback."""
    from conftest import tiny_run_overrides

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("digits_figures", root / "tools" / "digits_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "figures"
    (out / "probe").mkdir(parents=True)
    (out / "demo.log").write_text("dcscale train: done 30 cycles, final loss 0.1\n")  # and no out/demo
    (out / "probe" / "after_demo.json").write_text("{}")
    overrides = [o for o in tiny_run_overrides(digits_train_shards, out / "unused")
                 if not o.startswith(("output.dir=", "data.train="))]
    block, rows = tool.demo_block(out, digits_train_shards, digits_test_shards, 1, overrides)
    assert block.startswith("```\ncycle   1 |") and "dcscale train: done 2 cycles" in block
    assert [row["cycle"] for row in rows] == [0, 1]
    assert not (out / "probe" / "after_demo.json").exists()
