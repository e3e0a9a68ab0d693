"""`dcscale export` and `dcscale.load_backbone`: torchvision state_dicts that load strictly and compute
what dcscale's network computes, backbone files that round-trip, one line for every bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import dcscale
from dcscale.cli import main
from dcscale.config import config_to_dict, load_config
from dcscale.data.transforms import eval_transform
from dcscale.errors import DcscaleError
from dcscale.models import build_model_from_config
from dcscale.train.checkpoint import write_checkpoint_file


def write_test_checkpoint(path: Path, arch: str, channels: int, size: int, k: int = 7, **model) -> nn.Module:
    """A checkpoint as training writes one, of a network whose every weight and batch-norm statistic
    is random (so a swapped layer changes the outputs); returns the network, in eval mode."""
    overrides = [f"model.arch={arch}", f"cluster.k={k}", f"data.image_size={size}"]
    cfg = load_config(None, overrides + [f"model.{key}={value}" for key, value in model.items()])
    net = build_model_from_config(cfg, in_channels=channels, image_size=size)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo in ((m.weight, 0.5), (m.running_var, 0.5)):
                    t.copy_(torch.rand(t.shape, generator=gen) + lo)
                for t in (m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        net.head.weight.mul_(100)  # logits of order 1, not 0.01
    write_checkpoint_file({"format": 2, "model": net.state_dict(), "config": config_to_dict(cfg),
                           "image_shape": [channels, size, size], "cycle": 3, "epoch": 0, "step": 0, "k": k},
                          path)
    return net.eval()


def export(tmp_path: Path, ckpt: Path, fmt: str, capsys, name: str = "out.pt") -> tuple[Path, str]:
    out = tmp_path / name
    assert main(["export", str(ckpt), "--out", str(out), "--format", fmt]) == 0
    return out, capsys.readouterr().out


def test_resnet50_loads_into_torchvision_strictly_with_the_same_outputs(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    net = write_test_checkpoint(ckpt, "resnet50", channels=3, size=32)
    out, printed = export(tmp_path, ckpt, "torchvision", capsys)
    assert "torchvision.models.resnet50(num_classes=7)" in printed

    tv = torchvision.models.resnet50(num_classes=7)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    tv.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), net(x), rtol=1e-5, atol=1e-5)  # the head is mapped onto fc
        penultimate = torch.flatten(nn.Sequential(*list(tv.children())[:-1])(x), 1)
        torch.testing.assert_close(penultimate, net.features(x), rtol=1e-5, atol=1e-5)


def test_vgg16_bn_loads_into_torchvision_strictly_with_the_same_outputs(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    net = write_test_checkpoint(ckpt, "vgg16_bn", channels=3, size=224, k=5)
    out, printed = export(tmp_path, ckpt, "torchvision", capsys)
    assert "torchvision.models.vgg16_bn(num_classes=5)" in printed

    with torch.device("meta"):  # (skips torchvision's random init of 138M weights; the load is as strict)
        tv = torchvision.models.vgg16_bn(num_classes=5)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True, assign=True)
    tv.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled = torch.flatten(tv.avgpool(tv.features(x)), 1)
        torch.testing.assert_close(tv.classifier[:4](pooled), net.features(x), rtol=1e-5, atol=1e-5)  # fc7
        torch.testing.assert_close(tv.classifier[4:](tv.classifier[:4](pooled)), net(x), rtol=1e-5, atol=1e-5)


def test_alexnet_has_no_torchvision_counterpart_but_exports_as_a_backbone(tmp_path, capsys):
    # DeepCluster's AlexNet has 96/256/384/384/256 filters and batch norm; torchvision's 64/192/384/256/256
    # and none: no strict load is possible, so the torchvision format says so and names the other.
    ckpt = tmp_path / "last.pt"
    net = write_test_checkpoint(ckpt, "alexnet", channels=3, size=64)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "tv.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not fit torchvision's" in err and "--format backbone" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tv.pt").exists()

    out, printed = export(tmp_path, ckpt, "backbone", capsys)
    assert "alexnet backbone (4096-d features)" in printed and "trained for 3 cycle(s)" in printed
    body, transform = dcscale.load_backbone(out)
    assert not body.training and transform.image_size == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(body(x), net.features(x), rtol=0, atol=0)


def test_backbone_round_trip_with_sobel(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    net = write_test_checkpoint(ckpt, "lenet5", channels=1, size=32, sobel="true")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "tv.pt"), "--format", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert "Sobel" in err and "--format backbone" in err and len(err.splitlines()) == 1

    out, _ = export(tmp_path, ckpt, "backbone", capsys)
    saved = torch.load(out, weights_only=True)  # tensors and plain values only
    assert set(saved["body"]) == set(net.body.state_dict()) and not any(k.startswith("head.") for k in saved["body"])
    meta = saved["meta"]
    assert (meta["arch"], meta["sobel"], meta["image_shape"], meta["feature_dim"], meta["cycle"]) == \
        ("lenet5", True, [1, 32, 32], 84, 3)
    assert meta["mean"] == [0.5] and meta["std"] == [0.5] and meta["config"]["model"]["sobel"] is True

    image = torchvision.transforms.functional.to_pil_image(torch.randint(0, 256, (1, 20, 24), dtype=torch.uint8))
    x = eval_transform(32, 1)(image)[None]  # resize 24x20 -> 32, normalise with the run's mean and std
    with torch.no_grad():
        want = net.features(x)
    for source in (out, ckpt):  # an export, or the checkpoint itself
        body, transform = dcscale.load_backbone(source)
        torch.testing.assert_close(transform(image)[None], x, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(body(x), want, rtol=0, atol=0)
    assert body[0].__class__.__name__ == "SobelFilter"


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    write_test_checkpoint(ckpt, "lenet5", channels=1, size=32)
    foreign = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    garbage = tmp_path / "random.pt"
    garbage.write_bytes(os.urandom(4096))
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"keep me")

    cases = [
        (["export", str(foreign), "--out", str(tmp_path / "a.pt"), "--format", "backbone"], "a plain state_dict"),
        (["export", str(garbage), "--out", str(tmp_path / "a.pt"), "--format", "backbone"], "not a checkpoint"),
        (["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "a.pt")], "checkpoint not found"),
        (["export", str(ckpt), "--out", str(taken), "--format", "backbone"], "exists; give --force"),
        (["export", str(ckpt), "--out", str(tmp_path), "--format", "backbone"], "is a directory"),
        (["export", str(ckpt), "--out", str(tmp_path / "a.pt")], "lenet5 has no torchvision counterpart"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "random.pt", "resnet18.pth", "taken.pt"]
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(DcscaleError, match="a plain state_dict"):
        dcscale.load_backbone(foreign)

    assert main(["export", str(ckpt), "--out", str(taken), "--format", "backbone", "--force"]) == 0
    assert dcscale.load_backbone(taken)[0] is not None


def test_import_dcscale_stays_light():
    code = "import sys, dcscale; assert callable(dcscale.load_backbone); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
