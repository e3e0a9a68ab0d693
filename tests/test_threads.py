"""Thread counts that fit the machine: a small k-means or search runs on one faiss thread, and the
cores counted free are those idle now (real busy processes take them away)."""

from __future__ import annotations

import subprocess
import sys
import time

from dcscale import dist
from dcscale.cluster.kmeans import ONE_THREAD_WORK, fitting_threads
from dcscale.host import usable_cores


def test_small_problems_take_one_thread_without_measuring():
    def never():
        raise AssertionError("a small problem must not measure the cores")

    assert fitting_threads(60_000, 84, 5, never) == 1  # the paper's FMNIST k-means (K = 5)
    assert fitting_threads(1_000_000, 256, 10_000, lambda: 7) == 7
    assert fitting_threads(ONE_THREAD_WORK, 1, 1, lambda: 3) == 3


def test_busy_cores_are_not_counted_free():
    assert 1 <= dist.free_cores() <= usable_cores()
    spin = "import time\nt = time.time() + 20\nwhile time.time() < t: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(usable_cores())]
    try:
        time.sleep(0.5)  # every core of ours now runs a spinner
        assert dist.free_cores() == 1
        assert dist.free_core_share(2) == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
