"""cluster.labels: ground_truth, the supervised ceiling of the Deep Dive's tables: the same network, schedule
and sampler trained on the shard set's own classes, which are never clustered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import metrics, tiny_run_overrides

from dcscale.data.shardset import ShardSet

TRAIN_CONFIG = str(Path(__file__).parent / "train_test.yaml")


def train(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcscale", "train", "--config", TRAIN_CONFIG, *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)


def test_ground_truth_labels_train_on_the_classes_without_clustering(digits_train_shards, tmp_path):
    run_dir = tmp_path / "run"
    done = train(tiny_run_overrides(digits_train_shards, run_dir, **{"cluster.labels": "ground_truth",
                                                                      "train.cycles": 3, "train.lr": 0.2}))
    assert done.returncode == 0, done.stderr[-2000:]
    labels = np.load(run_dir / "labels.npy")
    np.testing.assert_array_equal(labels, ShardSet(digits_train_shards).labels())
    rows = metrics(run_dir)
    assert [m["clustered"] for m in rows] == [False, False, False]  # never clustered, no clustering time
    assert all(m["nmi_gt"] == 1.0 and m["t_extract"] == 0.0 and m["t_kmeans"] == 0.0 for m in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # the head is kept across cycles: it learns the classes


def test_ground_truth_labels_need_k_equal_to_the_classes(digits_train_shards, tmp_path):
    done = train(tiny_run_overrides(digits_train_shards, tmp_path / "run", **{"cluster.labels": "ground_truth",
                                                                               "cluster.k": 7}))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"dcscale: error: cluster.labels = 'ground_truth': cluster.k = 7 must be the 10 classes of "
        f"{digits_train_shards} (the head predicts them); set cluster.k=10")
    assert not (tmp_path / "run" / "checkpoints").exists()
