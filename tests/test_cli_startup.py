"""`dcscale --help` and `dcscale config` start without importing torch (seconds on a loaded machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dcscale", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    modules = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, modules


def test_help_lists_every_subcommand_without_importing_torch():
    done, modules = imported("--help")
    assert done.returncode == 0
    for command in ("config", "shards", "train", "probe", "ia", "report", "export", "embed"):
        assert f"    {command} " in done.stdout
    assert not any(m == "torch" or m.startswith("torch.") for m in modules)


def test_config_prints_without_importing_torch():
    done, modules = imported("config", "configs/digits_demo.yaml", "cluster.k=7")
    assert done.returncode == 0 and "  k: 7" in done.stdout
    assert "torch" not in modules and "faiss" not in modules


def test_subcommand_help_still_shows_its_options():
    done = subprocess.run([sys.executable, "-m", "dcscale", "ia", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "--vary" in done.stdout
