"""A run directory belongs to one run at a time, and to one config.

Rank 0 holds an exclusive `flock` on `<output.dir>/.lock` for the life of the run, with its host
and pid written in the file: a second run on the same directory (another process group, a job
resubmitted while the first still runs) is refused with one line naming the holder. The kernel
drops the lock when the process ends, however it ends, so a crashed run never leaves it behind.

A resumed run compares its config with the one the checkpoint was written with
(`dcscale.config.resume_differences`): keys that only extend or watch the run may change and are
listed at the end of `config.yaml`, as YAML comments, with the cycle they took effect; any other
difference stops the run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dcscale.config import Config, format_value, resume_differences, resume_may_change, save_config
from dcscale.errors import DcscaleError
from dcscale.safefile import create_new, open_fd, refuse_links
from dcscale.train.checkpoint import checkpoint_dir, newest_checkpoint

LOCK_NAME = ".lock"
# What a run writes in its directory: none of them may be a link (it would lead the writes elsewhere).
RUN_FILES = (LOCK_NAME, "checkpoints", "tb", "metrics.jsonl", "config.yaml", "labels.npy", "clusters.json")
_HISTORY_HEADER = "# Changed when the run was resumed (key: old -> new, from that cycle on):"
_HELD: dict[Path, object] = {}  # run directory -> its open, locked lock file (this process)


def claim_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and lock it for this process; fail with one line if another run
    holds it or if it (or its checkpoints/) cannot be written."""
    key = run_dir.resolve()
    if key in _HELD:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        refuse_links(run_dir, RUN_FILES)
        handle = os.fdopen(open_fd(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT), "r+")
    except OSError as err:
        raise DcscaleError(f"output.dir {run_dir} is not writable: {err.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        err = in_use_error(run_dir, handle.read())
        handle.close()
        raise err from None
    except OSError as err:  # e.g. ENOLCK: a network filesystem mounted without lock support
        handle.close()
        raise DcscaleError(f"cannot lock {run_dir / LOCK_NAME}: {err.strerror} (the filesystem does not support "
                           f"flock; put output.dir on one that does)") from None
    if not _still_in_place(handle, run_dir / LOCK_NAME):  # a failed start removed it while this one waited
        handle.close()
        return claim_run_dir(run_dir)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        _check_writable(checkpoint_dir(run_dir))
    except OSError as err:
        handle.close()
        raise DcscaleError(f"output.dir {run_dir} is not writable: {err.strerror}") from None
    except DcscaleError:
        handle.close()
        raise
    _HELD[key] = handle


def _still_in_place(handle, path: Path) -> bool:
    """Whether the open lock file is still the one at `path` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def in_use_error(run_dir: Path, lock_text: str) -> DcscaleError:
    holder = lock_text.strip() or "a process that has not written its name yet"
    return DcscaleError(f"{run_dir} is in use by another run ({holder}); wait for it to end or stop it, "
                        f"or give another output.dir")


def check_run_dir_free(run_dir: Path) -> None:
    """(`dcscale train --check`) Fail with one line if a live run holds `run_dir`, as `claim_run_dir`
    would, without creating or writing anything: a shared lock is refused while another process
    holds the exclusive one, and is dropped at once."""
    path = run_dir / LOCK_NAME
    if run_dir.resolve() in _HELD or not os.path.lexists(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise DcscaleError(f"cannot open {path}: {err.strerror} (a run directory's lock file must be a plain "
                           f"file)") from None
    with os.fdopen(fd, "r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use_error(run_dir, handle.read()) from None
        except OSError:
            return  # no flock on this filesystem: claim_run_dir says so when the run starts


def _check_writable(folder: Path) -> None:
    """Fail now, not at the end of the first cycle, if checkpoints cannot be written."""
    try:
        folder.mkdir(exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}.tmp"
        create_new(probe).close()
        probe.unlink()
    except OSError as err:
        raise DcscaleError(f"{folder} is not writable: {err.strerror}") from None


@dataclass
class _Start:
    created: list[Path]  # run_dir and the parents this start creates, deepest first
    entries_before: set[str]  # what run_dir held before


_STARTS: dict[Path, _Start] = {}


def note_start(run_dir: Path) -> None:
    """(rank 0, before `claim_run_dir`) Remember what exists, so that `undo_failed_start` removes only
    what this run added."""
    run_dir = run_dir.absolute()
    _STARTS[run_dir] = _Start([p for p in (run_dir, *run_dir.parents) if not p.exists()],
                              set(os.listdir(run_dir)) if run_dir.is_dir() else set())


def undo_failed_start(run_dir: Path) -> None:
    """(rank 0) A run that stopped on an error before its first checkpoint leaves its directory as it found
    it: what it added (.lock, config.yaml, tb/, metrics.jsonl, labels.npy, an empty checkpoints/) is removed,
    and the directory itself (and parents) if this run created them. With a checkpoint there is work to
    keep: nothing is removed. The lock file goes last, while still held (a run that opened it meanwhile
    sees that it was replaced: `claim_run_dir`)."""
    start = _STARTS.pop(run_dir.absolute(), None)
    if start is None or run_dir.resolve() not in _HELD or newest_checkpoint(run_dir) is not None:
        return  # (not held: another run's directory, or this one never got it; leave it alone)
    added = sorted(set(os.listdir(run_dir)) - start.entries_before - {LOCK_NAME})
    for name in added:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if LOCK_NAME not in start.entries_before:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    release_run_dir(run_dir)
    for path in start.created:
        try:
            path.rmdir()
        except OSError:  # not empty: something else wrote there meanwhile
            break


def release_run_dir(run_dir: Path) -> None:
    handle = _HELD.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()  # (the file stays: removing it would race with a run taking the lock)


def check_same_run(saved: dict, cfg: Config, run_dir: Path) -> list[tuple[str, object, object]]:
    """The allowed changes between the run's config (`saved`, as written with its checkpoint) and
    `cfg`; any other difference is a one-line error."""
    changes, refused = resume_differences(saved, cfg)
    if refused:
        shown = ", ".join(f"{key} ({format_value(old)} -> {format_value(new)})" for key, old, new in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        may = ", ".join(k + "*" if k.endswith(".") else k
                        for k in resume_may_change(leave_out=("resume", "output.dir")))
        raise DcscaleError(f"{run_dir} holds a run with another config: {shown}{more} differ; a run directory "
                           f"belongs to one config: give a new output.dir to start a new run (only {may} may "
                           f"change when resuming)")
    return [c for c in changes if c[0] != "resume"]


def write_run_config(cfg: Config, run_dir: Path, changes: list, cycle: int, resumed: bool) -> None:
    """config.yaml: the resolved config, then (as comments, so `load_config` reads it unchanged) the
    history of changes made on resume, kept from the previous config.yaml when resuming."""
    path = run_dir / "config.yaml"
    history = []
    if resumed and path.is_file():
        lines = path.read_text(errors="replace").splitlines()
        if _HISTORY_HEADER in lines:
            history = [ln for ln in lines[lines.index(_HISTORY_HEADER) + 1:] if ln.startswith("# cycle ")]
    history += [f"# cycle {cycle}: {key}: {format_value(old)} -> {format_value(new)}" for key, old, new in changes]
    save_config(cfg, path, "\n" + "\n".join([_HISTORY_HEADER, *history]) + "\n" if history else "")
