"""Progress of long phases: a bar on a terminal, a line every DCSCALE_PROGRESS_S seconds in logs
(SLURM writes to files), nothing on ranks other than rank 0."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from dcscale.errors import DcscaleError

log = logging.getLogger("dcscale")


PROGRESS_ENV = "DCSCALE_PROGRESS_S"  # seconds between progress lines in logs (0: every 10%)


DEFAULT_PROGRESS_S = 60.0


def progress_interval() -> float:
    """Seconds between progress lines in logs, from $DCSCALE_PROGRESS_S (default 60)."""
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise DcscaleError(f"{PROGRESS_ENV}={raw!r}: expected seconds >= 0 between progress lines (0: every 10%)")
    return value


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The progress of one long phase, shown by rank 0 only (`enabled`).

    On a terminal: a tqdm bar with rate and time left, gone when the phase ends. In a log file (SLURM,
    a pipe): one line at every tenth of the phase and at least every $DCSCALE_PROGRESS_S seconds, from
    that many seconds into the phase on (phases shorter than that print nothing), then a last line.
    `update(n, **values)` counts n more units done; values (e.g. objective=...) are shown with it.
    """

    def __init__(self, desc: str, total: int | None, unit: str, enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.done, self.values = 0, {}
        self.bar, self.lines = None, 0
        self.enabled = enabled
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False, dynamic_ncols=True)
            return
        self.every = progress_interval()
        self.start = self.last = time.perf_counter()
        self.tenth = 0  # the last tenth of the total a line was printed for

    def update(self, n: int = 1, **values) -> None:
        if not self.enabled:
            return
        self.done += n
        self.values.update(values)
        if self.bar is not None:
            if values:
                self.bar.set_postfix({k: f"{v:.6g}" for k, v in values.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.start < self.every or (self.total and self.done >= self.total):
            return  # a short phase prints nothing; the end has its own line
        tenth = 10 * self.done // self.total if self.total else self.tenth
        if tenth > self.tenth or (self.every > 0 and now - self.last >= self.every):
            self.tenth = tenth
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        where = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if final:
            text = f"{self.desc}: done, {where} in {_clock(elapsed)}, {rate:,.1f} {self.unit}/s"
        else:
            share = f"{100 * self.done // self.total}% " if self.total else ""
            left = f", ~{_clock((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
            text = f"{self.desc}: {share}({where}), {rate:,.1f} {self.unit}/s, {_clock(elapsed)} elapsed{left}"
        values = "".join(f", {k} {v:.6g}" for k, v in self.values.items())
        log.info("%s%s", text, values)
        self.last, self.lines = now, self.lines + 1

    def close(self, finished: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.lines and finished:  # a phase that printed progress says when it ended
            self._line(time.perf_counter(), final=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(finished=error_type is None)


def progress(iterable, total: int | None, desc: str, enabled: bool, unit: str = "batches"):
    """`iterable`, counted as a Progress (one unit per item) when enabled."""
    if not enabled:
        return iterable
    return _counted(iterable, Progress(desc, total, unit))


def _counted(iterable, bar: Progress):
    with bar:
        for item in iterable:
            yield item
            bar.update(1)
