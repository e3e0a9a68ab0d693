"""tools/sweep.py: a grid of real (tiny) training runs, collected into a CSV table and a PNG plot."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "tools" / "sweep.py"


def _sweep(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SWEEP), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture
def base(tmp_path, digits_train_shards, digits_test_shards):
    cfg = tmp_path / "base.yaml"
    cfg.write_text(f"seed: 0\ndata: {{train: {digits_train_shards}, test: {digits_test_shards}, image_size: 16, "
                   "workers: 0}\nmodel: {arch: lenet5}\ncluster: {k: 10, pca_dim: 16}\n"
                   "train: {cycles: 2, batch_size: 64}\n")
    return cfg


def _rows(out):
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


def _valid_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_local_sweep_collects_every_run(base, tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("--config", base, "--grid", "cluster.halt_after=1,null", "--probe-layer", "pixels",
                 "--probe-epochs", "2", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "2/2 runs ok (2 run now)" in res.stdout
    rows = _rows(out)
    assert [r["cluster.halt_after"] for r in rows] == ["1", "null"]
    for r in rows:
        assert r["status"] == "ok" and r["cycles"] == "2"
        assert float(r["nmi_gt"]) > 0.2 and float(r["loss"]) > 0
        assert 0.5 < float(r["probe_top1"]) <= 1.0 and r["probe_layer"] == "pixels"
        assert Path(r["run_dir"], "checkpoints", "last.pt").is_file()
    # halt_after=1: cycle 1 kept cycle 0's labels, so it has no NMI with the previous cycle.
    assert rows[0]["nmi_prev"] == "" and rows[1]["nmi_prev"] != ""
    _valid_png(out / "sweep.png")

    # Finished points are not run again; the table is rebuilt from the run directories.
    again = _sweep("--config", base, "--grid", "cluster.halt_after=1,null", "--probe-layer", "pixels", "--out", out)
    assert again.returncode == 0 and "2/2 runs ok (0 run now)" in again.stdout
    assert _rows(out) == rows


def _load_sweep_module():
    spec = importlib.util.spec_from_file_location("dcscale_sweep_tool", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_grid_is_a_cross_product_of_resolved_configs(base, tmp_path):
    sweep = _load_sweep_module()
    args = sweep.build_parser().parse_args(["--config", str(base), "--grid", "cluster.halt_after=1,null",
                                            "--grid", "model.sobel=false,true", "--set", "train.lr=0.1",
                                            "--nproc", "2", "--out", str(tmp_path / "s")])
    grid = sweep.parse_grid(args.grid)
    assert grid == {"cluster.halt_after": [1, None], "model.sobel": [False, True]}
    points = sweep.make_points(args, grid)
    assert [p.run_dir.name for p in points] == ["halt_after-1__sobel-false", "halt_after-1__sobel-true",
                                                "halt_after-null__sobel-false", "halt_after-null__sobel-true"]
    train, probe = points[3].commands
    assert "torch.distributed.run" in train and "--nproc-per-node=2" in train
    assert train[-4:] == ["train.lr=0.1", "cluster.halt_after=null", "model.sobel=true",
                          f"output.dir={points[3].run_dir}"]
    assert probe[probe.index("--layer") + 1] == "all"
    assert probe[probe.index("--checkpoint") + 1] == str(points[3].run_dir / "checkpoints" / "last.pt")


def test_submitit_sweep_runs_a_job_array(base, tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("--config", base, "--grid", "train.lr=0.01", "--set", "train.cycles=1", "--probe-layer", "none",
                 "--launcher", "submitit", "--submitit-cluster", "local", "--timeout-min", "5", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "submitted 1 jobs (local)" in res.stdout
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["cycles"] == "1" and row["train.lr"] == "0.01"
    assert row["probe_top1"] == ""


def test_missing_runs_and_bad_grids(base, tmp_path):
    res = _sweep("--config", base, "--grid", "cluster.k=5,8", "--collect-only", "--out", tmp_path / "s")
    assert res.returncode == 1 and "0/2 runs ok" in res.stdout
    assert [r["status"] for r in _rows(tmp_path / "s")] == ["missing", "missing"]
    bad = _sweep("--config", base, "--grid", "cluster.kk=5", "--out", tmp_path / "b")
    assert bad.returncode == 2 and "unknown config key 'cluster.kk'" in bad.stderr
    bad = _sweep("--config", base, "--grid", "cluster.k=5,1", "--out", tmp_path / "b")
    assert bad.returncode == 2 and "cluster.k" in bad.stderr and not (tmp_path / "b" / "runs").exists()


@pytest.mark.parametrize("fixed, message", [
    ("data.train=/nonexistent/shards", "sweep: error: data.train: shard set directory not found: /nonexistent/shards"),
    ("resume=/nonexistent/last.pt", "sweep: error: resume: checkpoint not found: /nonexistent/last.pt"),
    ("eval.knn_every=1", None),  # (valid: a control that the check passes good inputs)
])
def test_an_input_every_point_would_fail_on_fails_once_up_front(base, tmp_path, fixed, message):
    out = tmp_path / "s"
    res = _sweep("--config", base, "--grid", "cluster.k=5,8", "--set", fixed, "--collect-only", "--out", out,
                 timeout=120)
    if message is None:
        assert res.returncode == 1 and "0/2 runs ok" in res.stdout, res.stderr
        return
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [message], res.stderr
    assert not (out / "runs").exists()
