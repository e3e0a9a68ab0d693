"""Reading a run's metrics.jsonl (written by training's MetricsLogger, read by it on resume and by
`dcscale report`)."""

from __future__ import annotations

from pathlib import Path

from dcscale.errors import DcscaleError


def metrics_lines(path: Path) -> list[str]:
    """The lines of a metrics.jsonl. A kill can cut the last line short, but only damage (a disk fault,
    a crash that left zeros, another program) leaves bytes that are not text: those stop with one line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DcscaleError(f"cannot read {path}: {err.strerror}") from None
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
            damaged = b"\x00" in raw
        except UnicodeDecodeError:
            damaged = True
        if damaged:
            raise DcscaleError(f"{path} line {number}: binary data, not text (damaged); keep the lines before it "
                               f"(head -n {number - 1} {path} > fixed && mv fixed {path}) and run again")
    return data.decode("utf-8").splitlines()
