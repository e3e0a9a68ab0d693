"""`dcscale report`: PNGs from a run's metrics.jsonl; the README's digits blocks that
tools/digits_figures.py rewrites."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
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


def test_readme_digits_blocks_are_rewritten_in_place():
    """`tools/digits_figures.py --readme README.md` finds the demo, IA and probe blocks and replaces only them."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("digits_figures", root / "tools" / "digits_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = (root / "README.md").read_text()
    blocks = {"demo": "```\ncycle 1 | new\n```", "ia": "| K | new |", "probe": "| features | new |"}
    new = tool.replace_blocks(readme, blocks)
    for name, body in blocks.items():
        assert f"<!-- digits_figures:{name} -->\n{body}\n<!-- /digits_figures:{name} -->" in new
    assert tool.replace_blocks(new, blocks) == new

    def outside_blocks(text):
        return re.sub(r"(<!-- digits_figures:(\w+) -->\n).*?(<!-- /digits_figures:\2 -->)", r"\1\3", text, flags=re.S)

    assert outside_blocks(new) == outside_blocks(readme) != new, "only the blocks' bodies change"
    with pytest.raises(SystemExit, match="no <!-- digits_figures:demo --> block"):
        tool.replace_blocks("# README\n", blocks)
