"""Checkpoints: written atomically by rank 0, found again by `resume: auto`.

Layout in the run directory: `checkpoints/last.pt` (always the newest) and periodic
`checkpoints/cycle{C:05d}_epoch{E:03d}_step{S:08d}.pt`, of which `checkpoint.keep_last` are kept. A checkpoint is
written to a temporary file in the same directory, flushed to disk, then renamed, so a kill at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dcscale.errors import DcscaleError

_PERIODIC = re.compile(r"cycle(\d+)_epoch(\d+)_step(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_write(path: Path, write) -> None:
    """`write(binary_file)` into a temporary file beside `path`, flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write `state` as last.pt and as a periodic file; prune old periodic files."""
    folder = checkpoint_dir(run_dir)
    periodic = folder / f"cycle{state['cycle']:05d}_epoch{state['epoch']:03d}_step{state['step']:08d}.pt"
    atomic_torch_save(state, periodic)
    # last.pt is a hard link to the periodic file when possible (no second write of a large file).
    tmp_last = folder / f".last.pt.{os.getpid()}.tmp"
    try:
        if tmp_last.exists():
            tmp_last.unlink()
        os.link(periodic, tmp_last)
        os.replace(tmp_last, folder / "last.pt")
    except OSError:
        atomic_torch_save(state, folder / "last.pt")
    _prune(folder, keep_last)
    return periodic


def _prune(folder: Path, keep_last: int) -> None:
    periodic = sorted(p for p in folder.glob("cycle*_epoch*_step*.pt") if _PERIODIC.search(p.name))
    for old in periodic[: max(len(periodic) - max(keep_last, 1), 0)]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def find_resume_checkpoint(resume: str | None, run_dir: str | Path) -> Path | None:
    """`auto`: the run directory's last.pt if any (None for a fresh run); else the given path."""
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise DcscaleError(f"resume checkpoint not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
        raise DcscaleError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
