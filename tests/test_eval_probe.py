"""`dcscale probe`: the linear probe learns separable data, stays at chance on shuffled labels,
caches features, and works from a checkpoint, a random init or raw pixels; the deepdive and
deepcluster protocols run the references' settings, layers, pooling and augmentation on digits."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_in_process import run_in_process

from dcscale.cli import main
from dcscale.config import config_to_dict, load_config
from dcscale.data.build import write_shard_set
from dcscale.data.converters import SourceData
from dcscale.errors import DcscaleError
from dcscale.eval.features import pool_flatten, pool_size
from dcscale.eval.probe_classifier import ProbeSettings, _lr_at, settle_numbers, train_linear_probe
from dcscale.eval.probe_protocols import (ProbeTrainTransform, TenCropTransform, deepcluster_layers, deepcluster_pool,
                                          deepdive_features, deepdive_layers, protocol_settings)
from dcscale.models import build_model, build_model_from_config

CLASSES = 3


def _images(n_per_class: int, seed: int):
    """8x8 grey images: class c is a bright 3x3 block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    spots = [(1, 1), (1, 5), (5, 3)]
    images, labels = [], []
    for c in range(CLASSES):
        for _ in range(n_per_class):
            img = rng.normal(60, 25, (8, 8))
            r, q = spots[c]
            img[r - 1:r + 2, q - 1:q + 2] += 120
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    order = rng.permutation(len(labels))
    return [images[i] for i in order], [labels[i] for i in order]


def _shardset(out, images, labels):
    source = SourceData(samples=list(zip(images, labels)), num_samples=len(labels),
                        class_names=[str(c) for c in range(CLASSES)], description="synthetic")
    write_shard_set(source, out, samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    tr_x, tr_y = _images(60, seed=1)
    te_x, te_y = _images(50, seed=2)
    shuffled = list(np.random.default_rng(3).permutation(tr_y))
    te_shuffled = list(np.random.default_rng(4).permutation(te_y))
    return {
        "train": _shardset(root / "train", tr_x, tr_y),
        "test": _shardset(root / "test", te_x, te_y),
        "train_shuffled": _shardset(root / "train_shuffled", tr_x, shuffled),
        "test_shuffled": _shardset(root / "test_shuffled", te_x, te_shuffled),
    }


def _probe(capsys, *argv):
    code = main(["probe", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_pixel_probe_learns_separable_data(blobs, tmp_path, capsys):
    out = _probe(capsys, "--train", blobs["train"], "--test", blobs["test"], "--layer", "pixels",
                 "--json", tmp_path / "p.json", "--workers", 0)
    assert "probe pixels: top1" in out
    res = json.loads((tmp_path / "p.json").read_text())["layers"]["pixels"]
    assert res["top1"] > 0.9  # chance is 1/3
    assert res["test_n"] == 150 and res["train_n"] == 180 and res["dim"] == 64


def test_pixel_probe_is_at_chance_on_shuffled_labels(blobs, tmp_path, capsys):
    _probe(capsys, "--train", blobs["train_shuffled"], "--test", blobs["test_shuffled"], "--layer", "pixels",
           "--json", tmp_path / "p.json", "--workers", 0)
    res = json.loads((tmp_path / "p.json").read_text())["layers"]["pixels"]
    assert abs(res["top1"] - 1 / CLASSES) < 0.15  # 150 test images: 3 standard deviations
    assert res["train_top1"] > res["top1"] + 0.1  # it fits noise on train, which does not transfer


def test_linear_probe_classifier_directly():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (4, 20)) * 3
    y = rng.integers(0, 4, 400)
    x = centers[y] + rng.normal(0, 1, (400, 20))
    res = train_linear_probe(x[:300], y[:300], x[300:], y[300:], ProbeSettings(epochs=10, lr=0.05, batch_size=32))
    assert res["top1"] > 0.95 and res["top5"] == 1.0
    shuffled = rng.permutation(y)
    res = train_linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], ProbeSettings(epochs=10))
    assert res["top1"] < 0.45  # chance 0.25


def test_settle_check_rule():
    # the final weights' train loss against the best epoch's mean batch loss: 10% and 0.05 nats of slack
    assert settle_numbers([1.2, 1.0, 1.05], 1.09)["settled"]
    assert not settle_numbers([1.2, 1.0, 1.05], 1.15)["settled"]
    assert settle_numbers([0.05, 0.02, 0.03], 0.06)["settled"]  # 3x, but near zero: a separable set
    assert not settle_numbers([0.05, 0.02, 0.03], 0.08)["settled"]
    assert settle_numbers([0.5, 0.4], 0.41) == {"epoch_losses": [0.5, 0.4], "train_loss": 0.41, "settled": True}


def test_probe_that_does_not_settle_says_so(digits_train_shards, digits_test_shards, tmp_path, capsys):
    # A learning rate far too high for the features: SGD bounces and stops at a bad point of the bounce
    # (the Deep Dive probe does this on some Fashion-MNIST networks). One warning line says so and what to
    # try; the probe's own numbers are still reported.
    argv = ["probe", "--train", str(digits_train_shards), "--test", str(digits_test_shards), "--layer", "pixels",
            "--workers", "0", "--epochs", "5", "--schedule", "constant"]
    bouncing = run_in_process(main, [*argv, "--lr", "100", "--json", str(tmp_path / "hi.json")], capsys)
    assert bouncing.returncode == 0, bouncing.stderr
    warned = [line for line in bouncing.stderr.splitlines() if "did not settle" in line]
    assert len(warned) == 1 and warned[0].startswith("dcscale: WARNING: probe pixels:")
    assert "lower --lr (e.g. 10)" in warned[0] and "higher train top-1" in warned[0]
    assert "probe pixels: top1" in bouncing.stdout
    res = json.loads((tmp_path / "hi.json").read_text())["layers"]["pixels"]
    assert not res["settled"] and len(res["epoch_losses"]) == 5
    assert res["train_loss"] > 1.1 * min(res["epoch_losses"])

    settled = run_in_process(main, [*argv, "--lr", "0.1", "--json", str(tmp_path / "lo.json")], capsys)
    assert settled.returncode == 0 and "did not settle" not in settled.stderr
    low = json.loads((tmp_path / "lo.json").read_text())["layers"]["pixels"]
    assert low["settled"] and low["train_top1"] > res["train_top1"]


def test_pool_to_about_pool_dim():
    # The original AlexNet protocol: conv1 96x55x55 -> 96x10x10, conv2 256x27x27 -> 256x6x6, conv3 384x13x13 -> 5x5.
    assert pool_size(96, 55, 9600) == 10
    assert pool_size(256, 27, 9600) == 6
    assert pool_size(384, 13, 9600) == 5
    assert pool_size(6, 28, 9600) == 28  # never upsampled
    act = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).reshape(2, 4, 6, 6)
    pooled = pool_flatten(act, 16)  # 4 channels x 2 x 2
    assert pooled.shape == (2, 16)
    assert torch.isclose(pooled[0, 0], act[0, 0, :3, :3].mean())
    assert pool_flatten(torch.ones(3, 7), 16).shape == (3, 7)


def test_probe_checkpoint_random_init_and_cache(blobs, tmp_path, capsys):
    cfg = load_config(None, ["model.arch=lenet5", "cluster.k=7", "data.image_size=32", "seed=5"])
    torch.manual_seed(5)
    model = build_model_from_config(cfg, in_channels=1, image_size=32)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "image_shape": [1, 32, 32]}, ckpt)
    common = ["--train", blobs["train"], "--test", blobs["test"], "--epochs", 5, "--workers", 0]

    out = _probe(capsys, "--checkpoint", ckpt, "--layer", "all", "--json", tmp_path / "c.json", *common)
    layers = json.loads((tmp_path / "c.json").read_text())["layers"]
    assert list(layers) == model.probe_layers()  # one line and one entry per layer
    lines = out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == [f"probe {n}" for n in layers]
    assert lines[-1].startswith("probe: 4 layer(s) of checkpoint, protocol fast")
    assert all(r["top1"] > 0.6 for r in layers.values())  # chance is 1/3
    cached = sorted(p.name for p in (tmp_path / "c_cache").iterdir())
    assert len(cached) == 2 * 2 * len(layers)  # feats + labels, train + test, per layer

    # Second run reads the cache: same numbers.
    _probe(capsys, "--checkpoint", ckpt, "--layer", "all", "--json", tmp_path / "c.json", *common)
    again = json.loads((tmp_path / "c.json").read_text())["layers"]
    assert again == {k: {**v, "extract_s": again[k]["extract_s"], "train_s": again[k]["train_s"]}
                     for k, v in layers.items()}

    # The same weights from --random-init with the same seed give the same features and accuracy.
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("seed: 5\nmodel: {arch: lenet5}\ncluster: {k: 7}\ndata: {image_size: 32}\n")
    _probe(capsys, "--random-init", "--config", cfg_file, "--layer", "relu2", "--json", tmp_path / "r.json", *common)
    rand = json.loads((tmp_path / "r.json").read_text())["layers"]["relu2"]
    assert rand["top1"] == layers["relu2"]["top1"]


def test_probe_errors_are_one_line(blobs, tmp_path, capsys):
    assert main(["probe", "--train", str(blobs["train"]), "--test", str(blobs["test"]), "--layer", "relu9"]) == 2
    assert "needs a network" in capsys.readouterr().err
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("model: {arch: lenet5}\ndata: {image_size: 32}\n")
    assert main(["probe", "--random-init", "--config", str(cfg_file), "--train", str(blobs["train"]),
                 "--test", str(blobs["test"]), "--layer", "relu9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcscale: error: unknown layer 'relu9'") and err.count("\n") == 1
    assert main(["probe", "--random-init", "--train", str(blobs["train"]), "--test", str(blobs["test"]),
                 "--layer", "relu1"]) == 2
    assert "--random-init needs --config" in capsys.readouterr().err


# ---- protocols: fast (ours), deepdive (the Deep Dive authors'), deepcluster (eval_linear.py) --------

DEEPDIVE = {"epochs": 20, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 256,
            "schedule": "inv_sqrt", "standardise": False, "init": "torch"}
DEEPCLUSTER = {**DEEPDIVE, "epochs": 90}


def _settings_without_seed(report):
    return {k: v for k, v in report["settings"].items() if k != "seed"}


def test_protocol_settings_are_the_references():
    assert {k: v for k, v in asdict(protocol_settings("deepdive", None)).items() if k != "seed"} == DEEPDIVE
    assert {k: v for k, v in asdict(protocol_settings("deepcluster", None)).items() if k != "seed"} == DEEPCLUSTER
    cfg = load_config(None, ["eval.probe_epochs=7", "eval.probe_lr=0.2"])
    fast = protocol_settings("fast", cfg)
    assert (fast.epochs, fast.lr, fast.schedule, fast.standardise, fast.init) == (7, 0.2, "cosine", True, "normal")
    # lr_0 / sqrt(1 + lr_0 * wd * t) at iteration t, as both references' learning_rate_decay
    s = protocol_settings("deepcluster", None)
    assert _lr_at(s, 0, 0) == 0.01
    assert _lr_at(s, 5, 10 ** 6) == pytest.approx(0.01 / np.sqrt(2))


def test_deepdive_layers_are_the_authors_modules():
    lenet = build_model("lenet5", in_channels=1, image_size=32)
    micro = build_model("alexnet_micro", in_channels=3, image_size=32, sobel=True)
    assert deepdive_layers(None, lenet) == ["conv2"]  # their LeNet: target_layer="conv_2"
    assert deepdive_layers(None, micro) == ["relu5"]  # their AlexNets: target_layer="relu_5"
    with torch.no_grad():
        lenet.body.features.bn2.running_var.fill_(4.0)  # a trained batch norm: not the identity
        x = torch.randn(3, 1, 32, 32)
        conv2 = deepdive_features(lenet, ["conv2"])(x)["conv2"]
        trunk = lenet.body.features
        expected = trunk.conv2(trunk.pool1(trunk.relu1(trunk.bn1(trunk.conv1(x)))))
        assert conv2.shape == (3, 1600)  # their features_size=1600: 16x10x10, unpooled
        assert torch.allclose(conv2, expected.flatten(1))  # the convolution's own output, before batch norm
        relu5 = deepdive_features(micro, ["relu5"])(torch.randn(2, 3, 32, 32))["relu5"]
        assert relu5.shape == (2, 512) and relu5.min() >= 0  # their features_size=512: 128x2x2 after ReLU
    with pytest.raises(DcscaleError, match="unknown layer 'fc1'"):
        deepdive_layers("fc1", lenet)


def test_deepcluster_pooling_is_eval_linears_table():
    alexnet = build_model("alexnet", in_channels=3, image_size=224)
    layers = [f"relu{i}" for i in range(1, 6)]
    assert deepcluster_layers(None, alexnet) == layers
    with torch.no_grad():
        acts = alexnet.eval().layer_activations(torch.randn(1, 3, 224, 224), layers)
        pooled = {name: deepcluster_pool(act) for name, act in acts.items()}
    # eval_linear.py RegLog: 9600, 9216, 9600, 9600, 9216 values
    assert [pooled[n].shape[1] for n in layers] == [9600, 9216, 9600, 9600, 9216]
    assert torch.allclose(pooled["relu1"], F.avg_pool2d(acts["relu1"], 6, 6, 3).flatten(1))
    assert torch.allclose(pooled["relu5"], F.avg_pool2d(acts["relu5"], 2, 2, 0).flatten(1))
    # Maps the table was not written for: the same ~9,600 target, small maps kept whole.
    assert deepcluster_pool(torch.ones(2, 6, 28, 28)).shape == (2, 6 * 28 * 28)
    assert deepcluster_pool(torch.ones(2, 48, 32, 32)).shape == (2, 48 * 14 * 14)


def test_deepcluster_training_crops_and_ten_crops():
    tf = ProbeTrainTransform(image_size=4, channels=1, resize=6, crop_from=6, mean=(0.0,), std=(1 / 255,))
    image = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6)
    uniforms = torch.tensor([[0.99, 0.0, 0.9], [0.0, 0.6, 0.1]], dtype=torch.float64)
    out = tf.augment(torch.cat([image, image]), uniforms)
    assert torch.allclose(out[0, 0], image[0, 0, 2:6, 0:4].float())  # crop at (2, 0), not flipped
    assert torch.allclose(out[1, 0], image[0, 0, 0:4, 1:5].float().flip(-1))  # crop at (0, 1), flipped
    ten = TenCropTransform(image_size=4, channels=1, resize=6, mean=(0.0,), std=(1 / 255,))
    crops = ten.finish(ten.collate([image[0]]))
    assert crops.shape == (10, 1, 4, 4)
    assert torch.allclose(crops[4, 0], image[0, 0, 1:5, 1:5].float())  # the centre
    assert torch.equal(crops[5:], crops[:5].flip(-1))  # and the mirror images


def _digits_probe(capsys, train, test, tmp_path, name, *argv):
    cfg_file = tmp_path / "lenet.yaml"
    cfg_file.write_text("seed: 3\nmodel: {arch: lenet5}\ncluster: {k: 10}\ndata: {image_size: 32}\n")
    out = _probe(capsys, "--random-init", "--config", cfg_file, "--train", train, "--test", test,
                 "--workers", 0, "--json", tmp_path / f"{name}.json", *argv)
    return out, json.loads((tmp_path / f"{name}.json").read_text())


def test_deepdive_protocol_on_digits(digits_train_shards, digits_test_shards, tmp_path, capsys):
    out, report = _digits_probe(capsys, digits_train_shards, digits_test_shards, tmp_path, "dd",
                                "--protocol", "deepdive")
    assert report["protocol"] == "deepdive" and report["overridden"] == []
    assert _settings_without_seed(report) == DEEPDIVE  # the default run: exactly the authors' settings
    assert report["pool_dim"] is None and report["augmentation"].startswith("none")
    assert list(report["layers"]) == ["conv2"] and report["layers"]["conv2"]["dim"] == 1600
    assert report["layers"]["conv2"]["top1"] > 0.8  # chance is 0.1
    assert report["layers"]["conv2"]["settled"]  # (the authors' rate suits this untrained network)
    assert "protocol deepdive" in out.strip().splitlines()[-1]

    # --hflip (their FMNIST jobs): the network runs on every flipped batch; --epochs overrides 20.
    _, flipped = _digits_probe(capsys, digits_train_shards, digits_test_shards, tmp_path, "ddf",
                               "--protocol", "deepdive", "--hflip", "--epochs", 2)
    assert flipped["overridden"] == ["epochs"]
    assert _settings_without_seed(flipped) == {**DEEPDIVE, "epochs": 2}
    assert "RandomHorizontalFlip" in flipped["augmentation"]
    assert flipped["layers"]["conv2"]["top1"] > 0.3


def test_deepcluster_protocol_on_digits(digits_train_shards, digits_test_shards, tmp_path, capsys):
    _, report = _digits_probe(capsys, digits_train_shards, digits_test_shards, tmp_path, "dc",
                              "--protocol", "deepcluster", "--epochs", 2)
    assert report["protocol"] == "deepcluster" and report["overridden"] == ["epochs"]
    assert _settings_without_seed(report) == {**DEEPCLUSTER, "epochs": 2}
    assert list(report["layers"]) == ["relu1", "relu2"]  # every conv layer's ReLU output
    assert [r["dim"] for r in report["layers"].values()] == [4704, 1600]  # below 9,600: kept whole
    # digits shard sets are 8x8, input 32, no data.resize: eval_linear.py's 256/224 ratio gives 37
    assert report["augmentation"] == "Resize(37), CenterCrop(37), RandomCrop(32), RandomHorizontalFlip()"
    assert "resize=37" in report["test_transform"]
    assert report["layers"]["relu1"]["top1"] > 0.3  # chance is 0.1; two epochs at lr 0.01
    assert not (tmp_path / "dc_cache").exists()  # augmented afresh every batch: nothing to cache

    _, ten = _digits_probe(capsys, digits_train_shards, digits_test_shards, tmp_path, "dc10",
                           "--protocol", "deepcluster", "--epochs", 1, "--layer", "relu1", "--ten-crop")
    assert ten["test_transform"] == "Resize(37), TenCrop(32)" and ten["layers"]["relu1"]["test_n"] == 360


def test_protocol_errors_are_one_line(blobs, capsys):
    common = ["probe", "--train", str(blobs["train"]), "--test", str(blobs["test"])]
    for argv, message in ((["--protocol", "deep", "--layer", "pixels"],
                           "--protocol deep: expected one of fast, deepdive, deepcluster"),
                          (["--layer", "pixels", "--ten-crop"], "--ten-crop applies to --protocol deepcluster only"),
                          (["--protocol", "deepdive"], "--protocol deepdive needs a network"),
                          ([], "--layer is required with --protocol fast")):
        assert main([*common, *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"dcscale: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1
        assert message in err
