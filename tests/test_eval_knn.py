"""Weighted k-NN accuracy (cosine similarity, exp(sim/T) votes) and the training run's k-NN monitor
(`knn_evaluate`)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcscale.config import load_config
from dcscale.dist import DistEnv
from dcscale.cycle import knn


def knn_accuracy(train, tr_y, test, te_y, k, temperature, num_classes=None):
    """knn_evaluate's scoring in one process, on arrays: the labelled training rows as the memory bank
    (`nearest_neighbours`), the labelled queries voted on (`vote`)."""
    tr_y, te_y = np.asarray(tr_y), np.asarray(te_y)
    bank, queries = tr_y >= 0, te_y >= 0
    sims, nbr = knn.nearest_neighbours(np.asarray(test)[queries], np.asarray(train)[bank], tr_y[bank], k)
    num_classes = num_classes or int(max(tr_y.max(), te_y.max())) + 1
    return float((knn.vote(sims, nbr, temperature, num_classes).numpy() == te_y[queries]).mean())


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_vote_by_hand():
    # Query at 0 degrees. Neighbours: one of class 0 at cos = 0.99, two of class 1 at cos = 0.5.
    train = np.array([_unit(math.degrees(math.acos(0.99))), _unit(60), _unit(-60), _unit(180)], np.float32)
    labels = np.array([0, 1, 1, 0])
    query, truth = np.array([_unit(0)], np.float32), np.array([0])
    # T = 0.07: exp(0.99/0.07) = e^14.1 beats 2 exp(0.5/0.07) = 2 e^7.1 -> class 0.
    assert knn_accuracy(train, labels, query, truth, k=3, temperature=0.07, num_classes=2) == 1.0
    # T = 10: e^0.099 = 1.10 loses to 2 e^0.05 = 2.10 -> class 1: the temperature matters.
    assert knn_accuracy(train, labels, query, truth, k=3, temperature=10.0, num_classes=2) == 0.0
    # k = 1: the nearest alone decides. Scale does not matter (cosine similarity).
    assert knn_accuracy(train * 7, labels, query * 0.1, truth, k=1, temperature=10.0, num_classes=2) == 1.0


def _reference(train, tr_y, test, te_y, k, t, c):
    """Plain numpy weighted k-NN, one query at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for q, y in zip(test, te_y):
        sims = train @ q
        nn = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(c)
        for j in nn:
            scores[tr_y[j]] += math.exp(sims[j] / t)
        correct += int(np.argmax(scores) == y)
    return correct / len(te_y)


def test_matches_reference_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (5, 16))
    tr_y, te_y = rng.integers(0, 5, 300), rng.integers(0, 5, 130)
    train = centers[tr_y] + rng.normal(0, 0.8, (300, 16))
    test = centers[te_y] + rng.normal(0, 0.8, (130, 16))
    expected = _reference(train, tr_y, test, te_y, 10, 0.1, 5)
    assert 0.4 < expected < 1.0
    monkeypatch.setattr(knn, "_CHUNK", 32)  # several similarity blocks
    assert knn_accuracy(train, tr_y, test, te_y, k=10, temperature=0.1, num_classes=5) == pytest.approx(expected)


def test_unlabelled_rows_are_ignored_and_k_above_n():
    train = np.array([_unit(0), _unit(90), _unit(5)], np.float32)
    labels = np.array([0, 1, -1])  # the -1 row would be the nearest to the 4-degree query
    test = np.array([_unit(4), _unit(80), _unit(45)], np.float32)
    truth = np.array([0, 1, -1])
    assert knn_accuracy(train, labels, test, truth, k=1, temperature=0.07, num_classes=2) == 1.0
    assert knn_accuracy(train, labels, test, truth, k=50, temperature=0.07, num_classes=2) == 1.0


def _digits_cfg(train, test):
    return load_config(None, [f"data.train={train}", f"data.test={test}", "data.image_size=32",
                              "data.workers=0", "model.arch=lenet5", "cluster.k=10", "eval.knn_k=20"])


def _monitor_value(cfg, seed=0):
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle.network import eval_transform_for, random_init_model

    model = random_init_model(cfg, 1, 32, seed, torch.device("cpu")).train()
    tf = eval_transform_for(cfg, 1, 32)
    value = knn.knn_evaluate(model, ShardSet(cfg.data.train), ShardSet(cfg.data.test), tf, DistEnv(), cfg).top1
    assert model.training  # the monitor puts the model back into training mode
    return value


def test_knn_monitor_on_digits(digits_train_shards, digits_test_shards):
    cfg = _digits_cfg(digits_train_shards, digits_test_shards)
    value = _monitor_value(cfg)
    assert 0.7 < value <= 1.0  # random LeNet features are already good on digits; chance is 0.1


SCRIPT = """
import sys
from dcscale import dist
from dcscale.config import load_config
from dcscale.data.shardset import ShardSet
from dcscale.cycle.network import eval_transform_for, random_init_model
from dcscale.cycle.knn import knn_evaluate
import torch
env = dist.init_distributed("gloo")
cfg = load_config(None, [f"data.train={sys.argv[1]}", f"data.test={sys.argv[2]}", "data.image_size=32",
                         "data.workers=0", "model.arch=lenet5", "cluster.k=10", "eval.knn_k=20"])
model = random_init_model(cfg, 1, 32, 0, torch.device("cpu"))
v = knn_evaluate(model, ShardSet(cfg.data.train), ShardSet(cfg.data.test), eval_transform_for(cfg, 1, 32), env,
                 cfg).top1
sys.stdout.write(f"rank {env.rank} knn {v!r}\\n")  # one write: the two ranks share the pipe (print writes twice)
sys.stdout.flush()
dist.shutdown()
"""


def test_knn_monitor_same_on_two_ranks(digits_train_shards, digits_test_shards, tmp_path):
    cfg = _digits_cfg(digits_train_shards, digits_test_shards)
    single = _monitor_value(cfg)
    script = tmp_path / "knn2.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(digits_train_shards), str(digits_test_shards)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    values = sorted(line for line in out.stdout.splitlines() if " knn " in line)
    assert values == [f"rank 0 knn {single!r}", f"rank 1 knn {single!r}"]
