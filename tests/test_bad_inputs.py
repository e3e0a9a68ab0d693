"""Every bad input a user can give, through the real commands: exit code 2, exactly one line on stderr,
no traceback, and nothing started (a `dcscale train` prints no config for inputs it refuses).

The launchers (slurm.py, torchrun.sh) and one `dcscale train` case run as real processes; the other
`dcscale` cases run its entry point in this process (tests/cli_in_process.py: the same code, exit code and
lines, without starting Python and torch for each)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_in_process import run_in_process
from conftest import tiny_run_overrides

from dcscale.cli import main as dcscale_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
DCSCALE = [sys.executable, "-m", "dcscale"]
SLURM = [sys.executable, str(ROOT / "launch" / "slurm.py")]
TORCHRUN = [str(ROOT / "launch" / "torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "3", "--"]
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00"


@pytest.fixture(scope="module")
def trained_run(digits_train_shards, tmp_path_factory):
    """A finished one-cycle run: something to resume."""
    run_dir = tmp_path_factory.mktemp("bad_inputs") / "run"
    proc = subprocess.run([*DCSCALE, "train", "--config", CONFIG,
                           *tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 1})],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _damaged_metrics(tmp_path: Path, trained_run: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(BINARY)
    return run_dir


def _shards(train, test, **extra):
    return [f"data.train={train}", f"data.test={test}", *(f"{k}={v}" for k, v in extra.items())]


# name -> (command builder(tmp_path, train shards, test shards, fixtures), text the one line must hold)
CASES = {
    "binary config file": (
        lambda t, tr, te, f: [*DCSCALE, "config", _file(t, "c.yaml", BINARY)], "not a text file"),
    "non-UTF-8 config file": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config",
                              _file(t, "c.yaml", "seed: 1  # caf\xe9\n".encode("latin-1"))],
        "not a text file (byte 14 is not UTF-8)"),
    "duplicate key in a YAML file": (
        lambda t, tr, te, f: [*DCSCALE, "config", _file(t, "c.yaml", b"cluster:\n  k: 10\n  pca_dim: 8\n  k: 20\n")],
        "(line 4): key 'k' is given twice in the same section"),
    "dist.timeout_min=.inf (config)": (
        lambda t, tr, te, f: [*DCSCALE, "config", CONFIG, "dist.timeout_min=.inf"],
        "dist.timeout_min = inf in the command line: expected a finite number"),
    "dist.timeout_min=.inf (train)": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), "dist.timeout_min=.inf"],
        "dist.timeout_min = inf in the command line: expected a finite number"),
    "cluster.wait_timeout_min=1e300 (config)": (
        lambda t, tr, te, f: [*DCSCALE, "config", CONFIG, "cluster.wait_timeout_min=1e300"],
        "cluster.wait_timeout_min = 1e+300 in the command line: expected a number of minutes > 0 and at most 525600"),
    "cluster.wait_timeout_min=1e300 (train)": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te),
                              "cluster.wait_timeout_min=1e300"],
        "cluster.wait_timeout_min = 1e+300"),
    "data.mean NaN": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), "data.mean=[.nan]"],
        "data.mean = [nan] in the command line: expected a list of finite numbers or null"),
    "data.std near zero": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), "data.std=[1e-12]"],
        "data.std = [1e-12] in the command line: expected numbers >= 0.001"),
    "train.lr=inf": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), "train.lr=inf"],
        "train.lr = 'inf' in the command line: expected a finite number"),
    "cluster=5": (
        lambda t, tr, te, f: [*DCSCALE, "config", CONFIG, "cluster=5"],
        "'cluster' in the command line is a config section, not a key: set one of its keys, e.g. cluster.k=..."),
    "dist.backend=nccl without CUDA": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), "dist.backend=nccl"],
        "dist.backend = 'nccl' needs CUDA GPUs and torch sees none here"),
    "eval.knn_k beyond the memory bank": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG,
                              *_shards(tr, te, **{"eval.knn_every": 1, "eval.knn_k": 5000})],
        "eval.knn_k = 5000 is more than the 1437 images of data.train, the k-NN monitor's memory bank"),
    "data.train not a shard set": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(t, te)],
        "data.train: no manifest.json in"),
    "data.test missing": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, t / "nope")],
        "data.test: shard set directory not found"),
    "resume path missing (train)": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG, *_shards(tr, te), f"resume={t / 'x.pt'}"],
        "resume: checkpoint not found"),
    "binary tail in metrics.jsonl at resume": (
        lambda t, tr, te, f: [*DCSCALE, "train", "--config", CONFIG,
                              *tiny_run_overrides(tr, _damaged_metrics(t, f["trained_run"]), **{"train.cycles": 2}),
                              "resume=auto"],
        "metrics.jsonl line 2: binary data, not text (damaged)"),
    "binary tail in metrics.jsonl (report)": (
        lambda t, tr, te, f: [*DCSCALE, "report", str(_damaged_metrics(t, f["trained_run"]))],
        "metrics.jsonl line 2: binary data, not text (damaged)"),
    "slurm.py --dry-run with a missing resume= path": (
        lambda t, tr, te, f: [*SLURM, "--config", CONFIG, "--dry-run", *_shards(tr, te), f"resume={t / 'x.pt'}",
                              f"output.dir={t / 'run'}"],
        "launch/slurm.py: error: resume: checkpoint not found"),
    "torchrun.sh with a bad config": (
        lambda t, tr, te, f: [*TORCHRUN, "--config", CONFIG, *_shards(tr, te), "train.lr=inf"],
        "dcscale: error: train.lr = 'inf' in the command line: expected a finite number"),
    "torchrun.sh with a missing shard set": (
        lambda t, tr, te, f: [*TORCHRUN, "--config", CONFIG, *_shards(t / "nope", te)],
        "dcscale: error: data.train: shard set directory not found"),
}

NEEDS_A_RUN = {"binary tail in metrics.jsonl at resume", "binary tail in metrics.jsonl (report)"}
# the `dcscale` case that runs as a real process too: a run that resumes, reads its files, then refuses
REAL_PROCESS = {"binary tail in metrics.jsonl at resume"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name, tmp_path, digits_train_shards, digits_test_shards, request,
                                       monkeypatch, capsys):
    if name == "dist.backend=nccl without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    build, message = CASES[name]
    fixtures = {"trained_run": request.getfixturevalue("trained_run")} if name in NEEDS_A_RUN else {}
    argv = build(tmp_path, digits_train_shards, digits_test_shards, fixtures)
    started = time.monotonic()
    if argv[:len(DCSCALE)] == DCSCALE and name not in REAL_PROCESS:
        monkeypatch.chdir(tmp_path)
        proc = run_in_process(dcscale_main, argv[len(DCSCALE):], capsys)
        proc.args = argv  # (the checks below read the command from it)
    else:
        proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0], lines[0]
    if name.startswith("torchrun.sh"):  # checked once, before torchrun: no worker ever started
        assert time.monotonic() - started < 30 and proc.stdout == ""
    if proc.args[3:4] == ["train"] and name != "binary tail in metrics.jsonl at resume":
        assert proc.stdout == "", "the resolved config is printed only for inputs that pass the checks"
