"""Facts about the machine this process runs on: its cores, its physical memory, and handing freed
heap memory back to the operating system. The ground floor: imports nothing of dcscale.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: what taskset, cgroups or SLURM granted).
    Not OMP_NUM_THREADS: torchrun sets that to 1 for every process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (no affinity call on macOS)
        return os.cpu_count() or 1


# Why trim: glibc keeps freed blocks below its mmap threshold in the heap, and that threshold rises (up
# to 32 MB on 64-bit) each time a larger mmapped block is freed. So after a phase frees its chunked
# temporaries (projection chunks, 64 MB gather pieces, faiss's search buffers) the process keeps them
# resident, and every later phase's peak starts that much higher, whatever the rank's share of the
# data. malloc_trim(0) returns every whole free page. Elsewhere (macOS, musl) this does nothing.
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
