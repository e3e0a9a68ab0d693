"""`dcscale probe`: the linear probe learns separable data, stays at chance on shuffled labels,
caches features, and works from a checkpoint, a random init or raw pixels."""

import json

import numpy as np
import pytest
import torch

from dcscale.cli import main
from dcscale.config import config_to_dict, load_config
from dcscale.data.build import write_shard_set
from dcscale.data.converters import SourceData
from dcscale.eval.features import pool_flatten, pool_size
from dcscale.eval.probe import ProbeSettings, train_linear_probe
from dcscale.models import build_model_from_config

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
    assert lines[-1].startswith("probe: 4 layer(s) of checkpoint")
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
