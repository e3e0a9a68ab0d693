"""Output paths given on the command line (--out, --json, --cache-dir): checked before the work starts
(a file in the way, a read-only directory), and a write that fails later (a full disk) is one line
naming the path and the system's reason instead of a traceback.

Only writes go through here: an OSError elsewhere (a bug, an unreadable input) is not relabelled.
"""

from __future__ import annotations

import errno
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from dcscale.errors import DcscaleError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WRITE_ONLY_ERRNOS = (*FULL, errno.EROFS)  # errors only a write gives


def output_error(flag: str, path: str | Path, err: OSError) -> DcscaleError:
    """One line for a failed write under `flag`'s `path`: which file, and why."""
    reason = err.strerror or str(err)
    if err.errno in FULL:
        reason += " (the disk or quota is full)"
    elif err.errno in (errno.EEXIST, errno.ENOTDIR):
        reason += " (a file is in the way of a directory)"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason += " (give a writable location)"
    failed = err.filename if err.filename is not None else path
    where = f" ({failed})" if str(failed) != str(path) else ""
    return DcscaleError(f"{flag} {path}: cannot write{where}: {reason}")


def output_dir(path: str | Path, flag: str) -> Path:
    """`path` as a directory this process can write into, created if needed (with its parents)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DcscaleError(f"{flag} {path}: it is a file, not a directory")
    probe = path / f".dcscale-write-test.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as err:
        if err.filename is not None and Path(os.fsdecode(err.filename)) == probe:
            err = OSError(err.errno, err.strerror)  # (the test file's name says nothing to the user)
        raise output_error(flag, path, err) from None
    return path


def output_file(path: str | Path, flag: str) -> Path:
    """`path` as a file this process can write (not a directory; its directory writable)."""
    path = Path(path)
    if path.is_dir():
        raise DcscaleError(f"{flag} {path}: it is a directory; give a file path")
    output_dir(path.parent, f"{flag} {path}: its directory")
    return path


@contextmanager
def writing(flag: str, path: str | Path):
    """Around writes into `flag`'s `path`: an OSError becomes `output_error`'s one line."""
    try:
        yield
    except OSError as err:
        raise output_error(flag, path, err) from None
