"""`dcscale probe` under torchrun (2 real gloo ranks): every rank keeps its own rows (no rank holds the
split's N x D), the classifier steps on the ranks' summed gradients, and the numbers are those of one
process: the cached path (fast) and the online one (deepcluster: the network on every augmented batch).

Tolerance: the two runs take the same steps on the same batches, but a gradient is summed over ranks in
another order than over one batch, so the weights may differ in the last bits; top-1 may therefore move
by one test image (1/360) at most. In practice the numbers are identical (checked on these runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dcscale.cli import main

N_TRAIN, N_TEST = 1437, 360


def _probe_one_and_two(tmp_path, capsys, argv: list[str]) -> tuple[dict, dict]:
    assert main(["probe", *argv, "--json", str(tmp_path / "one.json"), "--cache-dir", str(tmp_path / "c1")]) == 0
    capsys.readouterr()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "dcscale", "probe", *argv, "--json", str(tmp_path / "two.json"),
                          "--cache-dir", str(tmp_path / "c2")],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("probe: 1 layer(s)") == 1  # rank 0 alone reports
    return (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))


def _same_numbers(one: dict, two: dict) -> None:
    assert two.keys() == one.keys()
    for layer in one:
        a, b = one[layer], two[layer]
        assert abs(a["top1"] - b["top1"]) <= 1 / N_TEST + 1e-12
        assert abs(a["top5"] - b["top5"]) <= 1 / N_TEST + 1e-12
        if "epoch_losses" in a:  # the settle check sees the same losses (every rank's rows)
            assert np.allclose(a["epoch_losses"], b["epoch_losses"], rtol=1e-4)
            assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * a["train_loss"] and a["settled"] == b["settled"]
        sizes = (a["dim"], a["train_n"], a["test_n"])
        assert sizes == (b["dim"], b["train_n"], b["test_n"]) == (a["dim"], N_TRAIN, N_TEST)


def test_cached_features_stay_on_their_ranks(digits_train_shards, digits_test_shards, tmp_path, capsys):
    one, two = _probe_one_and_two(tmp_path, capsys, ["--train", str(digits_train_shards), "--test",
                                                     str(digits_test_shards), "--layer", "pixels", "--workers", "0",
                                                     "--epochs", "5"])
    _same_numbers(one["layers"], two["layers"])
    assert one["layers"]["pixels"]["top1"] > 0.8  # chance is 0.1
    rows = two["layers"]["pixels"]["feature_rows_by_rank"]
    assert rows == {"train": [718, 719], "test": [180, 180]}  # each rank its slice, no more
    # The arrays each rank trained from (its cache files): its rows x D, never the split's N x D.
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        shapes = [np.load(next((tmp_path / "c2").glob(f"*_{split}-*_rank{r}of2.feats.npy"))).shape for r in (0, 1)]
        assert shapes == [(rows[split][0], 64), (rows[split][1], 64)] and all(s[0] < n for s in shapes)
        whole = np.load(next((tmp_path / "c1").glob(f"*_{split}-*.feats.npy")))
        assert whole.shape == (n, 64)  # one process: the whole split, as before


def test_online_protocol_over_two_ranks(digits_train_shards, digits_test_shards, tmp_path, capsys):
    cfg = tmp_path / "lenet.yaml"
    cfg.write_text("seed: 3\nmodel: {arch: lenet5}\ncluster: {k: 10}\ndata: {image_size: 32}\n")
    one, two = _probe_one_and_two(tmp_path, capsys, ["--random-init", "--config", str(cfg), "--train",
                                                     str(digits_train_shards), "--test", str(digits_test_shards),
                                                     "--protocol", "deepcluster", "--layer", "relu2", "--epochs", "1",
                                                     "--workers", "0"])
    _same_numbers(one["layers"], two["layers"])
    assert one["layers"]["relu2"]["train_top1"] == pytest.approx(two["layers"]["relu2"]["train_top1"], abs=2 / N_TRAIN)
