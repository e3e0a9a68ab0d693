"""Checkpoints: written atomically by rank 0, verified on every load, found again by `resume: auto`.

Layout in the run directory: `checkpoints/last.pt` (always the newest) and periodic
`checkpoints/cycle{C:05d}_epoch{E:03d}_step{S:08d}.pt`, of which `checkpoint.keep_last` are kept. A checkpoint is
written to a temporary file in the same directory, flushed to disk, then renamed, so a kill at any
moment leaves either the old file or the new one, never half of one. last.pt is a file of its own
(the same bytes as the newest periodic one), so damage to one leaves the other.

What a checkpoint holds and how it is verified on load: dcscale.cycle.checkpoint (one reader for
resume, export, the probe, embed and IA). A damaged file is refused, and `resume: auto` falls back to
the newest intact one.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# (FORMAT, load_error and write_checkpoint_file are read here too by older callers: the format's own module)
from dcscale.cycle.checkpoint import (FORMAT, CheckpointError, load_checkpoint, load_error,  # noqa: F401 (re-exported)
                                      serialize, write_checkpoint_file)
from dcscale.errors import DcscaleError
from dcscale.safefile import atomic_write

_PERIODIC = re.compile(r"cycle(\d+)_epoch(\d+)_step(\d+)\.pt$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write `state` as last.pt and (keep_last > 0) as a periodic file; prune older periodic files.

    last.pt is written first, so it is never older than the newest periodic file. A failed write
    (a full disk) raises a one-line error saying that the previous checkpoints are intact."""
    folder = checkpoint_dir(run_dir)
    position = (state["cycle"], state["epoch"], state["step"])
    periodic = folder / "cycle{:05d}_epoch{:03d}_step{:08d}.pt".format(*position)
    intact = newest_checkpoint(run_dir)
    data = serialize(state)
    target = folder / "last.pt"
    try:
        atomic_write(target, lambda f: f.write(data))
        intact = target
        if keep_last > 0:
            target = periodic
            atomic_write(target, lambda f: f.write(data))
    except OSError as err:
        raise write_failure(err, intact, target) from None
    _prune(folder, keep_last, position)
    return folder / "last.pt"


def write_failure(err: OSError, intact: Path | None, target: Path | None = None) -> DcscaleError:
    """One line for a write to `target` that failed (a full disk, a directory made read-only): what
    failed, and that the checkpoints already written are untouched (every write goes to a temporary
    file first)."""
    what = f"cannot write {target or err.filename or 'a file'}: {err.strerror or err}"
    if err.errno in NO_SPACE:
        what += " (the disk or quota is full)"
    if intact is not None:
        return DcscaleError(f"{what}; nothing was lost: the newest checkpoint {intact} is intact "
                            f"(free space, then run again with resume=auto)")
    return DcscaleError(f"{what}; no checkpoint had been written yet, so a new run starts over")


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """last.pt, or the newest periodic checkpoint, when the run has one (not verified)."""
    folder = checkpoint_dir(run_dir)
    if (folder / "last.pt").is_file():
        return folder / "last.pt"
    periodic = periodic_checkpoints(folder)
    return periodic[0][1] if periodic else None


def periodic_checkpoints(folder: Path) -> list[tuple[tuple[int, int, int], Path]]:
    """(position (cycle, epoch, step), path) of every periodic checkpoint, newest first."""
    found = []
    for path in folder.glob("cycle*_epoch*_step*.pt"):
        match = _PERIODIC.fullmatch(path.name)
        if match:
            found.append((tuple(int(g) for g in match.groups()), path))
    return sorted(found, reverse=True)


def _prune(folder: Path, keep_last: int, written: tuple[int, int, int]) -> None:
    """Remove periodic files older than the `keep_last` newest, never one newer than the one just
    written (not this run's; the run directory's lock keeps other writers out anyway)."""
    ours = [path for position, path in periodic_checkpoints(folder) if position <= written]
    for old in ours[keep_last:]:
        old.unlink(missing_ok=True)


def reset_timeline(run_dir: str | Path, resumed_from: Path | None, position: tuple[int, int, int] | None) -> list[str]:
    """Make the run directory's checkpoints one history that ends where this run starts.

    Called by the run directory's lock holder before its first checkpoint. Temporary files left by
    a killed writer go. (A new run never gets here into a directory holding another run's
    checkpoints: the loop refuses it first.) A resumed run removes periodic files beyond its starting
    point (damaged ones it fell back from, or a history it was told to leave by `resume: PATH`) and
    makes last.pt a copy of the checkpoint it started from. Returns notes for the user.
    """
    folder = checkpoint_dir(run_dir)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    last = folder / "last.pt"
    periodic = periodic_checkpoints(folder)
    if resumed_from is None or not in_run_dir(resumed_from, run_dir):
        return []
    beyond = [path for pos, path in periodic if pos > position]
    for path in beyond:
        path.unlink()
    notes = [f"removed {len(beyond)} checkpoint(s) after the starting point: {', '.join(p.name for p in beyond)}"] \
        if beyond else []
    if resumed_from.resolve() != last.resolve():
        data = resumed_from.read_bytes()
        atomic_write(last, lambda f: f.write(data))
    return notes


def in_run_dir(path: Path, run_dir: str | Path) -> bool:
    """Whether a checkpoint is one of the run directory's own (not another run's)."""
    return path.resolve().parent == checkpoint_dir(run_dir).resolve()


def find_resume_checkpoint(resume: str | None, run_dir: str | Path) -> tuple[Path | None, dict | None, str | None]:
    """(path, loaded checkpoint, note) to resume from, or (None, None, None) for a fresh run.

    `auto`: the run directory's newest intact checkpoint (last.pt, else the newest good periodic
    one, with a note naming what was skipped and why); a run directory with checkpoints but none
    intact is an error, not a fresh start. A given path must exist and be intact.
    """
    if resume is None:
        return None, None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"resume checkpoint not found: {path}")
        return path, load_checkpoint(path), None
    folder = checkpoint_dir(run_dir)
    candidates = ([folder / "last.pt"] if (folder / "last.pt").is_file() else [])
    candidates += [path for _, path in periodic_checkpoints(folder)]
    refused: list[str] = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            refused.append(str(err))
            continue
        note = None
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            note = f"{refused[0]}{more}; resuming from {path}, the newest intact checkpoint"
        return path, ckpt, note
    if refused:
        more = f" (and {len(refused) - 1} more, none intact)" if len(refused) > 1 else ""
        raise CheckpointError(f"no intact checkpoint to resume from in {folder}: {refused[0]}{more}; move the "
                              f"run directory aside and start a new run, or give resume=PATH")
    return None, None, None


