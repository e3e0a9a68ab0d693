"""The import contracts of pyproject.toml ([tool.importlinter]: the layers, and training, evaluation and
export independent of each other) hold for this checkout, with no exception listed: checked by
import-linter's `lint-imports` (the dev extra installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_the_import_contracts_are_kept():
    # PYTHONPATH: analyse this checkout's dcscale, whichever one the environment has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " 0 broken" in done.stdout


def test_no_contract_lists_an_exception():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["type"] for c in contracts} >= {"layers", "independence"}
    assert not [c["name"] for c in contracts if c.get("ignore_imports")], "fix the import instead"


def test_training_does_not_import_the_launchers_submitit():
    """`dcscale train` (its module and the input checks) never loads submitit: only launch/ does."""
    code = ("import sys, dcscale.train.run, dcscale.train.check, dcscale.cli; "
            "print('submitit' in sys.modules, 'dcscale.slurm_job' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
