"""`dcscale train` end to end: plainly and under torchrun (gloo, 2 processes on CPU).

Runs that are refused or stop with an error at their first cycle run `dcscale`'s entry point in this process
(tests/cli_in_process.py: same exit code and lines, without starting Python and torch again)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_in_process import dcscale
from conftest import metrics, tiny_run_overrides

from dcscale.config import load_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CONFIG = str(Path(__file__).parent / "train_test.yaml")


def _overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_run_overrides(shards, run_dir, **extra)


def _cmd(nproc: int, overrides: list[str]) -> list[str]:
    train = ["-m", "dcscale", "train", "--config", str(Path(__file__).parent / "train_test.yaml"), *overrides]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]


def run_train(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(nproc, overrides), env=ENV, capture_output=True, text=True, timeout=timeout)


def _two_process_overrides(train: Path, test: Path, run_dir: Path) -> list[str]:
    return _overrides(train, run_dir, **{"checkpoint.every_steps": 4, "data.test": test, "eval.knn_every": 2})


@pytest.fixture(scope="module")
def two_process_run(digits_train_shards, digits_test_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two") / "run"
    proc = run_train(2, _two_process_overrides(digits_train_shards, digits_test_shards, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_two_process_run_logs_every_cycle(two_process_run):
    run_dir, proc = two_process_run
    rows = metrics(run_dir)
    assert [r["cycle"] for r in rows] == [0, 1]
    required = {"cycle", "loss", "nmi_prev", "nmi_gt", "empty_clusters", "clustered", "objective", "t_extract",
                "t_pca", "t_kmeans", "t_assign", "t_train", "peak_mem_mb", "kmeans_iterations"}
    assert required <= set(rows[0])
    assert all(1 <= r["kmeans_iterations"] <= 20 for r in rows)  # the config's niter, or fewer (early stop)
    assert rows[0]["nmi_prev"] is None and 0 <= rows[1]["nmi_prev"] <= 1
    assert 0 < rows[0]["nmi_gt"] <= 1  # cycle 0: the Initial Alignment
    assert all(r["clustered"] and np.isfinite(r["loss"]) for r in rows)
    assert "knn_top1" not in rows[0] and 0.5 < rows[1]["knn_top1"] <= 1  # k-NN monitor every 2 cycles
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "rank 0 writes TensorBoard events"
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1, "only rank 0 writes"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    labels = np.load(run_dir / "labels.npy")
    assert labels.dtype == np.int32 and (labels >= 0).all()
    assert proc.stdout.count("cycle   0 |") == 1, "one console line per cycle, from rank 0 only"


def test_saved_config_reproduces_the_run(two_process_run, digits_train_shards, digits_test_shards):
    run_dir, _ = two_process_run
    saved = load_config(run_dir / "config.yaml")
    assert saved == load_config(Path(__file__).parent / "train_test.yaml",
                                _two_process_overrides(digits_train_shards, digits_test_shards, run_dir))


@pytest.fixture(scope="module")
def one_cycle_run(digits_train_shards, tmp_path_factory) -> Path:
    """A one-process, one-cycle run with a checkpoint every 5 steps (which leaves its labels as they are)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    proc = run_train(1, _overrides(digits_train_shards, run_dir, **{"train.cycles": 1, "checkpoint.every_steps": 5}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_one_and_two_processes_give_the_same_cycle0_labels(one_cycle_run, digits_train_shards, tmp_path):
    one, two = one_cycle_run, tmp_path / "two"
    p2 = run_train(2, _overrides(digits_train_shards, two, **{"train.cycles": 1}))
    assert p2.returncode == 0, p2.stderr[-3000:]
    np.testing.assert_array_equal(np.load(one / "labels.npy"), np.load(two / "labels.npy"))


def test_halt_after_skips_clustering_and_keeps_labels(digits_train_shards, tmp_path):
    # (also runs the float16 feature store and subsampled k-means training end to end)
    run_dir = tmp_path / "halt"
    proc = run_train(1, _overrides(digits_train_shards, run_dir, **{
        "train.cycles": 3, "cluster.halt_after": 1, "cluster.feature_dtype": "float16",
        "cluster.max_points_per_centroid": 40}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["clustered"] for r in rows] == [True, False, False]
    for r in rows[1:]:
        assert r["t_extract"] == r["t_pca"] == r["t_kmeans"] == r["t_assign"] == r["kmeans_iterations"] == 0
        assert r["nmi_gt"] == rows[0]["nmi_gt"], "the cycle-0 labels are kept"
    assert rows[0]["t_extract"] > 0


def test_killed_run_resumes_to_the_uninterrupted_result(two_process_run, digits_train_shards, digits_test_shards,
                                                        tmp_path):
    reference_dir, _ = two_process_run
    run_dir = tmp_path / "killed"
    overrides = _two_process_overrides(digits_train_shards, digits_test_shards, run_dir)
    proc = subprocess.Popen(_cmd(2, overrides), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Kill the whole job (torchrun and both ranks) with SIGKILL as soon as cycle 1 is mid-epoch.
    deadline = time.time() + 180
    while not list((run_dir / "checkpoints").glob("cycle00001_epoch*_step*.pt")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    assert len(done) < 2, "killed before the end"

    resumed = run_train(2, overrides + ["resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    ref, got = metrics(reference_dir), metrics(run_dir)
    assert [r["cycle"] for r in got] == [0, 1]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["nmi_gt"] == pytest.approx(a["nmi_gt"], abs=1e-9)
        assert b.get("knn_top1") == a.get("knn_top1")
    np.testing.assert_array_equal(np.load(reference_dir / "labels.npy"), np.load(run_dir / "labels.npy"))


def _open_files_under(folder: Path) -> list[str]:
    """The files under `folder` this process holds open (its descriptors in /proc/self/fd)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the descriptor listdir itself used)
            continue
        if target.startswith(str(folder) + os.sep):
            held.append(target)
    return held


def test_nan_loss_stops_with_a_clear_message(digits_train_shards, tmp_path, capsys):
    # The message names the checkpoint a resume would start from, or says that there is none yet.
    for every_steps, left in ((1, f"the newest checkpoint, {tmp_path / 'nan1' / 'checkpoints' / 'last.pt'}, was "
                                  f"written before it"),
                              ("null", "no checkpoint was written yet, so a new run starts over")):
        run_dir = tmp_path / f"nan{every_steps}"
        threads_before = threading.active_count()
        proc = dcscale(["train", "--config", CONFIG, *_overrides(digits_train_shards, run_dir, **{
            "train.lr": 1e30, "train.cycles": 1, "checkpoint.every_steps": every_steps})], capsys)
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert "loss is NaN or infinite at cycle 0" in last and "step" in last
        assert last.endswith(f"; stopping ({left})")
        assert "Traceback" not in proc.stderr
        if (run_dir / ".lock").exists():  # the stopped run let go of its directory (flock: per open file)
            with open(run_dir / ".lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # ... and left no file open nor thread running behind it (TensorBoard's writer: a notebook would keep one
        # per failed run until it exits)
        assert not _open_files_under(run_dir)
        assert threading.active_count() == threads_before, [t.name for t in threading.enumerate()]


def test_nan_features_stop_before_clustering(digits_train_shards, tmp_path, capsys):
    """Weights that make the features infinite (as an fp16 overflow would) stop the run at extraction
    with one line, instead of a PCA and k-means of NaNs."""
    import torch

    from dcscale.models import build_model
    from dcscale.train.checkpoint import write_checkpoint_file

    cfg = load_config(Path(__file__).parent / "train_test.yaml", _overrides(digits_train_shards, tmp_path / "x"))
    model = build_model(cfg.model.arch, in_channels=1, image_size=cfg.data.image_size, num_classes=cfg.cluster.k)
    weights = model.state_dict()
    first_conv = next(k for k, v in weights.items() if k.startswith("body.") and v.dim() == 4)
    weights[first_conv] = torch.full_like(weights[first_conv], float("inf"))
    write_checkpoint_file({"model": weights}, tmp_path / "inf_init.pt")
    proc = dcscale(["train", "--config", CONFIG,
                    *_overrides(digits_train_shards, tmp_path / "run", **{"model.init": tmp_path / "inf_init.pt"})], capsys)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cycle 0:" in last and "gave NaN or infinite features" in last  # (the PCA sample's pass comes first)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "labels.npy").exists()


def test_bad_config_fails_before_any_work(digits_train_shards, tmp_path, capsys):
    proc = run_train(1, _overrides(digits_train_shards, tmp_path / "bad", **{"cluster.kk": 3}))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("dcscale: error: unknown config key 'cluster.kk' in the command line "
                                   "(did you mean 'cluster.k'?)")
    assert not (tmp_path / "bad").exists()
    proc = dcscale(["train", "--config", CONFIG, f"output.dir={tmp_path / 'bad'}"], capsys)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("dcscale: error: data.train is not set in ")


def test_a_killed_rank_ends_the_job_without_a_hang(digits_train_shards, tmp_path):
    run_dir = tmp_path / "dead"
    overrides = _overrides(digits_train_shards, run_dir, **{"train.cycles": 50, "dist.timeout_min": 10,
                                                            "cluster.wait_timeout_min": 10})
    proc = subprocess.Popen(_cmd(2, overrides), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "dcscale train"], capture_output=True, text=True)
    workers = [int(p) for p in ranks.stdout.split()]
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    t0 = time.time()
    try:
        proc.wait(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode != 0
    assert time.time() - t0 < 60  # far below the 10-minute collective timeout


def _digits_with_broken_images(root: Path, broken: set[int]) -> Path:
    """The digits training images, with the given global indices replaced by undecodable bytes."""
    from sklearn.datasets import load_digits

    from dcscale.data.manifest import FORMAT_VERSION, Manifest, save_manifest
    from dcscale.data.writers import Encoded, ShardSetWriter

    digits = load_digits()
    images = np.round(digits.images[:400] * 255 / 16).astype(np.uint8)
    root.mkdir()
    writer = ShardSetWriter(root, samples_per_shard=150)
    for i, (image, label) in enumerate(zip(images, digits.target[:400])):
        if i in broken:
            writer.write(Encoded(data=b"\x89PNG\r\n\x1a\nnot a png", ext="png", shape=(1, 8, 8)), label=int(label))
        else:
            writer.write(image, label=int(label))
    stats = writer.close()
    save_manifest(Manifest(FORMAT_VERSION, stats.shards, stats.total, True, 10, [str(c) for c in range(10)],
                           "digits with broken images", [1, 8, 8], 1), root)
    return root


def test_undecodable_images_are_counted_and_the_run_completes(tmp_path):
    shards = _digits_with_broken_images(tmp_path / "broken", {7, 301})
    run_dir = tmp_path / "run"
    proc = run_train(2, _overrides(shards, run_dir, **{"train.cycles": 2, "cluster.halt_after": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["skipped_images"] for r in rows] == [2, 2]
    assert "2 undecodable image(s) skipped" in proc.stderr
    labels = np.load(run_dir / "labels.npy")
    assert labels[7] == -1 and labels[301] == -1 and (np.delete(labels, [7, 301]) >= 0).all()


def test_mid_epoch_checkpoint_refuses_another_batch_size(one_cycle_run, digits_train_shards, tmp_path, capsys):
    mid = sorted((one_cycle_run / "checkpoints").glob("cycle00000_epoch000_step*.pt"))[-1]
    # (a new run from this checkpoint: in its own directory the run's config could not change at all)
    proc = dcscale(["train", "--config", CONFIG,
                    *_overrides(digits_train_shards, tmp_path / "new", **{"resume": mid, "train.batch_size": 32})],
                   capsys)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dcscale: error: {mid} was written mid-epoch by 1 process(es) with train.batch_size=64; "
        "resume it with the same (now 1, 32)")


def test_a_rank_whose_whole_slice_is_undecodable_still_takes_part(tmp_path):
    shards = _digits_with_broken_images(tmp_path / "half", set(range(200, 400)))  # rank 1's slice
    run_dir = tmp_path / "run"
    proc = run_train(2, _overrides(shards, run_dir, **{"train.cycles": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(run_dir)[0]["skipped_images"] == 200
    labels = np.load(run_dir / "labels.npy")
    assert (labels[200:] == -1).all() and (labels[:200] >= 0).all()
