"""Run a command-line entry point in the test's own process, with what it would print as a command.

Starting Python and importing torch costs seconds per case on a busy 2-core machine; for inputs that are
refused (or work that fails) the behaviour under test is the exit code and the lines on stdout/stderr,
which the entry point produces the same way in this process. Two things differ from a fresh process and
are put back here: under pytest `logging.basicConfig` finds pytest's handlers and adds no stderr handler
(so a warning logged by the command would go unseen), and Python warnings go to pytest's summary instead
of stderr. Each tested file still runs its launchers as real processes somewhere."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

# Python hides these by default in a command's process: they would not reach its stderr either.
HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    args: list[str] | None = None


def run_in_process(entry: Callable[[list[str]], int], argv: list[str], capsys,
                   log_format: str = "dcscale: %(levelname)s: %(message)s") -> Result:
    """entry(argv) in this process: its exit code (a return value or SystemExit) and what it printed."""
    capsys.readouterr()  # start from nothing
    handler = logging.StreamHandler(sys.stderr)  # (capsys's stderr, as the command's would be its own)
    handler.setFormatter(logging.Formatter(log_format))
    logging.getLogger().addHandler(handler)
    saved_argv = sys.argv[:]  # (dcscale's main sets sys.argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                code = entry(argv)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        logging.getLogger().removeHandler(handler)
        sys.argv = saved_argv
    out, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT)]
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
    return Result(int(code or 0), out, err, list(argv))


def dcscale(argv: list[str], capsys) -> Result:
    """`dcscale ARGV` in this process."""
    from dcscale.cli import main

    return run_in_process(main, argv, capsys)
