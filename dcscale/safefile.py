"""Files written without following symbolic links.

A run directory (or any output folder) may be shared: whoever can write there could plant a link
named like one of our files (`.lock`, `metrics.jsonl`, a checkpoint's temporary file) pointing at a
file of the run's owner, which an ordinary `open(path, "w")` would truncate. Every file dcscale
writes in such a folder is opened with O_NOFOLLOW (a link in its place is refused), and temporary
files are created with O_EXCL after removing whatever held their name (unlinking a link removes
the link, never its target).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dcscale.errors import DcscaleError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def link_refused(path: Path) -> DcscaleError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return DcscaleError(f"{path} is a symbolic link{target}: refused, dcscale never writes through a link in an output "
                        f"directory; remove the link, or give another output directory")


def open_fd(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """os.open with O_NOFOLLOW: a link at `path` is a one-line DcscaleError, not a write to its target."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_refused(Path(path)) from None
        raise


def open_append(path: str | Path):
    """A text file opened for appending (created when missing), never through a link."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def create_new(path: str | Path, text: bool = False):
    """A fresh file at `path`, opened for writing: whatever held the name (a stale temporary file, a
    planted link) is removed first, then the file is created exclusively, without following links."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise DcscaleError(f"{path} is a directory; expected a file there") from None
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return os.fdopen(fd, "w" if text else "wb")


def write_new_text(path: str | Path, text: str) -> None:
    with create_new(path, text=True) as f:
        f.write(text)


def refuse_links(folder: Path, names) -> None:
    """One line if any of `names` in `folder` is a symbolic link (files and subfolders the run writes):
    a link there would make the run write outside its directory."""
    for name in names:
        if (folder / name).is_symlink():
            raise link_refused(folder / name)


def atomic_write(path: str | Path, write) -> None:
    """`write(binary_file)` into a temporary file beside `path`, flushed to disk, then renamed over it:
    a reader (or a crash) sees the old file or the new one whole, never half of one.

    On failure (a full disk) the temporary file is removed and `path` is left as it was. The temporary
    name holds the pid (`.NAME.PID.tmp`), so two processes never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with create_new(tmp) as f:  # (a link planted at the temporary name is removed, not followed)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` (UTF-8) as the whole of `path`, atomically (`atomic_write`)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))
