"""Hand memory a phase has freed back to the operating system before the next phase starts.

glibc keeps freed blocks below its mmap threshold in the heap, and that threshold rises (up to 32 MB
on 64-bit) each time a larger mmapped block is freed. So after a phase frees its chunked temporaries
(projection chunks, 64 MB gather pieces, faiss's search buffers) the process keeps them
resident, and every later phase's peak starts that much higher, whatever the rank's share of the
data. malloc_trim(0) returns every whole free page. Elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (a few ms; call between phases, not per batch)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
