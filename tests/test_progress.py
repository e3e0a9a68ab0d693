"""Progress of long phases: a bar on a terminal, periodic lines in logs (SLURM writes to files), and
k-means reporting its iterations while giving the same centroids as one faiss call."""

import logging
import re
import time

import faiss
import numpy as np
import pytest

from dcscale.cluster.kmeans import train_kmeans
from dcscale.errors import DcscaleError
from dcscale.progress import Progress, progress


def test_a_run_in_a_log_file_prints_progress_lines(halted_image_run):
    _, proc = halted_image_run  # stderr is a pipe; DCSCALE_PROGRESS_S=0: a line at every tenth
    lines = proc.stderr.splitlines()
    for phase, unit in (("extract", "images"), ("k-means", "iterations"), ("train", "steps")):
        mine = [ln for ln in lines if ln.startswith(f"dcscale: INFO: {phase}: ")]
        middle = [ln for ln in mine if re.search(rf"\d+% \(\d+/\d+ {unit}\), [\d,.]+ {unit}/s, \d:\d\d:\d\d elapsed, "
                                                 rf"~\d:\d\d:\d\d left", ln)]
        assert len(middle) >= 2, f"{phase}: {mine}"
        assert any(f"{phase}: done, " in ln for ln in mine)
    kmeans = [ln for ln in lines if "k-means: " in ln]
    assert all(", objective " in ln for ln in kmeans)  # k-means reports its iterations' objective


def test_progress_lines_every_tenth_after_the_quiet_start(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dcscale")
    monkeypatch.setenv("DCSCALE_PROGRESS_S", "0.05")
    for _ in progress(range(100), 100, "phase", enabled=True, unit="items"):
        time.sleep(0.002)
    lines = [r.getMessage() for r in caplog.records]
    shares = [int(m.group(1)) for m in (re.match(r"phase: (\d+)% \(", ln) for ln in lines) if m]
    assert shares and shares == sorted(set(shares)) and shares[0] >= 10 and shares[-1] <= 90
    assert lines[-1].startswith("phase: done, 100/100 items in ")

    caplog.clear()  # the default: a phase shorter than a minute prints nothing
    monkeypatch.delenv("DCSCALE_PROGRESS_S")
    for _ in progress(range(100), 100, "phase", enabled=True):
        pass
    with Progress("quiet", 10, "items", enabled=False) as shown:  # (other ranks)
        shown.update(10)
    assert caplog.records == []


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_bad_progress_interval_is_one_line(monkeypatch, value):
    monkeypatch.setenv("DCSCALE_PROGRESS_S", value)
    with pytest.raises(DcscaleError, match=r"^DCSCALE_PROGRESS_S=.*: expected seconds >= 0 between progress lines"):
        Progress("phase", 10, "items")


def _one_faiss_call(x, k, niter, seed):
    """k-means as faiss runs it in one call (what train_kmeans did before it reported iterations)."""
    clus = faiss.Clustering(x.shape[1], k)
    clus.niter, clus.seed = niter, seed
    clus.max_points_per_centroid, clus.min_points_per_centroid = x.shape[0] // k + 1, 1
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    stats = clus.iteration_stats
    return faiss.vector_to_array(clus.centroids).reshape(k, -1), [stats.at(i).obj for i in range(stats.size())]


@pytest.mark.parametrize("n, k, niter", [(600, 10, 20), (200, 150, 25), (1500, 300, 12)])
def test_kmeans_reports_every_iteration_and_stays_bit_identical(n, k, niter):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x[: n // 2] = x[0]  # many equal rows: empty clusters, faiss's splitting, and its early stop
    seen = []
    result = train_kmeans(x, k, niter, seed=7, gpu=False, on_iteration=seen.append)
    centroids, objectives = _one_faiss_call(x, k, niter, 7)
    np.testing.assert_array_equal(result.centroids, centroids)
    assert result.iteration_objectives == objectives == seen
    if n == 200:
        assert len(seen) < niter, "this case converges early: faiss's early stop is kept"
