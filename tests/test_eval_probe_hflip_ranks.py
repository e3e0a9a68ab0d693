"""`dcscale probe --protocol deepdive --hflip` under torchrun (2 real gloo ranks) gives the numbers of one
process. This is the online path with the Deep Dive settings (20 epochs by default, nn.Linear's own init, no
standardisation, an inverse-square-root schedule) and its own augmentation: every rank must flip the same
images as one process would, since a flip is drawn from the image's position in the epoch's order, not
from the rank that reads it.

Tolerance: both runs take the same steps on the same flipped batches, but one process sums a batch's
gradient in one matmul while two ranks each sum their rows and all-reduce the two sums: another order of
float additions. Measured on this run (2 epochs, LeNet-5 conv2, digits): the classifier's weights differ by
at most 7.5e-9 (largest weight 0.046), the two ranks' weights are bit-identical, and top-1, top-5 and the
train accuracy are identical. A logit margin that small could still move one image, so top-1 and top-5 may
differ by one test image (1/360) and the train accuracy by two training images, as in
tests/test_eval_probe_ranks.py. A flip drawn differently on a rank moves far more: drawing each rank's
flips from its own position in its share (instead of the position in the epoch) moved top-1 by 7 test
images here, and this test failed."""

from __future__ import annotations

from test_eval_probe_ranks import N_TRAIN, _probe_one_and_two, _same_numbers


def test_deepdive_hflip_over_two_ranks(digits_train_shards, digits_test_shards, tmp_path, capsys):
    cfg = tmp_path / "lenet.yaml"
    cfg.write_text("seed: 3\nmodel: {arch: lenet5}\ncluster: {k: 10}\ndata: {image_size: 32}\n")
    one, two = _probe_one_and_two(tmp_path, capsys, ["--random-init", "--config", str(cfg), "--train",
                                                     str(digits_train_shards), "--test", str(digits_test_shards),
                                                     "--protocol", "deepdive", "--hflip", "--epochs", "2",
                                                     "--workers", "0"])
    for report in (one, two):
        assert report["protocol"] == "deepdive" and "RandomHorizontalFlip" in report["augmentation"]
    _same_numbers(one["layers"], two["layers"])
    a, b = one["layers"]["conv2"], two["layers"]["conv2"]
    assert abs(a["train_top1"] - b["train_top1"]) <= 2 / N_TRAIN + 1e-12
    assert a["top1"] > 0.3  # chance is 0.1: the probe learned (two epochs at lr 0.01 on a random network)
