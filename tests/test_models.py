"""Models: shapes and probe layers at the configs' input sizes, Sobel front, head re-init, init."""

import math

import pytest
import torch

from dcscale.config import config_from_dict
from dcscale.errors import ConfigError
from dcscale.models import ARCHS, SobelFilter, build_model, build_model_from_config

# (arch, channels, size, sobel, feature_dim, probe names, batch)
CASES = [
    ("lenet5", 1, 32, False, 84, ["conv1", "relu1", "conv2", "relu2"], 4),
    ("lenet5", 1, 28, False, 84, ["conv1", "relu1", "conv2", "relu2"], 4),
    ("alexnet_micro", 3, 32, True, 1024, [f"{p}{i}" for i in range(1, 6) for p in ("conv", "relu")], 2),
    ("alexnet_small", 3, 32, True, 2048, [f"{p}{i}" for i in range(1, 6) for p in ("conv", "relu")], 2),
    ("alexnet", 3, 224, True, 4096, [f"{p}{i}" for i in range(1, 6) for p in ("conv", "relu")], 1),
    ("vgg16_bn", 3, 32, False, 4096, [f"conv{i}" for i in range(1, 6)], 2),
    ("resnet50", 3, 64, False, 2048, ["conv1", "layer1", "layer2", "layer3", "layer4"], 2),
]


@pytest.mark.parametrize("arch,channels,size,sobel,feature_dim,probes,batch", CASES)
def test_shapes_and_probes(arch, channels, size, sobel, feature_dim, probes, batch):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=channels, image_size=size, sobel=sobel, num_classes=7).eval()
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        acts = model.layer_activations(x, model.probe_layers())
    assert model.feature_dim == feature_dim
    assert feats.shape == (batch, feature_dim)
    assert logits.shape == (batch, 7)
    assert sorted(model.probe_layers()) == sorted(probes)
    for name in probes:
        assert acts[name].dim() == 4 and acts[name].shape[0] == batch
    if "relu1" in probes:  # convN is pre-ReLU, reluN its rectified copy
        assert torch.equal(acts["relu1"], acts["conv1"].clamp_min(0))
        assert (acts["conv1"] < 0).any()


def test_lenet_probe_sizes_and_features_are_pre_relu():
    model = build_model("lenet5", in_channels=1, image_size=32, num_classes=10).eval()
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        acts = model.layer_activations(x, ["conv2"])
        feats = model.features(x)
        # forward = head(relu(features)): the original removes the last ReLU only for clustering.
        assert torch.allclose(model(x), model.head(feats.clamp_min(0)))
    assert acts["conv2"].shape == (8, 16, 10, 10)
    assert (feats < 0).any()


def test_unknown_probe_layer():
    model = build_model("lenet5", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="conv9"):
        model.layer_activations(torch.zeros(1, 1, 28, 28), ["conv9"])


def test_sobel_front():
    sobel = SobelFilter(3)
    assert list(sobel.parameters()) == []  # fixed, never trained
    # A horizontal ramp: constant x-gradient, zero y-gradient away from the borders.
    ramp = torch.arange(8.0).repeat(8, 1)[None, None].repeat(1, 3, 1, 1)
    out = sobel(ramp)
    assert out.shape == (1, 2, 8, 8)
    assert torch.allclose(out[0, 0, 1:-1, 1:-1], torch.full((6, 6), -8.0))
    assert torch.allclose(out[0, 1, 1:-1, 1:-1], torch.zeros(6, 6), atol=1e-5)
    model = build_model("alexnet_small", in_channels=3, image_size=32, sobel=True)
    assert model.body.features.conv1.in_channels == 2
    assert all(p.requires_grad for p in model.body_parameters())
    gray = build_model("lenet5", in_channels=1, image_size=28, sobel=True)
    assert gray.body.sobel.weight.shape == (2, 1, 3, 3)


def test_reset_head():
    model = build_model("alexnet_small", in_channels=3, image_size=32, num_classes=10)
    old = model.head
    g = torch.Generator().manual_seed(3)
    head = model.reset_head(500, generator=g)
    assert model.head is head and head is not old
    assert head.weight.shape == (500, 2048)
    assert torch.all(head.bias == 0)
    assert abs(head.weight.std().item() - 0.01) < 0.001 and abs(head.weight.mean().item()) < 0.001
    again = model.reset_head(500, generator=torch.Generator().manual_seed(3))
    assert torch.equal(head.weight, again.weight)  # reproducible from the generator
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in again.parameters()}
    assert not {id(p) for p in model.body_parameters()} & {id(p) for p in model.head_parameters()}


def test_original_initialisation():
    torch.manual_seed(0)
    model = build_model("alexnet_small", in_channels=3, image_size=32, sobel=False)
    conv = model.body.features.conv2  # 126 filters of 5x5 -> std sqrt(2 / (5*5*126))
    assert abs(conv.weight.std().item() - math.sqrt(2 / (25 * 126))) < 0.003
    assert torch.all(conv.bias == 0)
    fc = model.body.classifier.fc1
    assert abs(fc.weight.std().item() - 0.01) < 0.001
    assert torch.all(model.body.features.bn1.weight == 1)


def test_batch_norm_switch():
    with_bn = build_model("lenet5", in_channels=1, image_size=32, batch_norm=True)
    without = build_model("lenet5", in_channels=1, image_size=32, batch_norm=False)
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert has_bn(with_bn) and not has_bn(without)
    assert without.layer_activations(torch.randn(2, 1, 32, 32), ["conv1"])["conv1"].shape == (2, 6, 28, 28)


def test_too_small_input_is_config_error():
    with pytest.raises(ConfigError, match="alexnet"):
        build_model("alexnet", in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="model.arch"):
        build_model("nope", in_channels=3, image_size=32)


def test_build_from_config():
    cfg = config_from_dict({"model": {"arch": "lenet5", "sobel": False, "batch_norm": False},
                            "cluster": {"k": 30}}, [])
    model = build_model_from_config(cfg, in_channels=1, image_size=28)
    assert model.head.out_features == 30 and model.arch == "lenet5"
    assert set(ARCHS) == {"lenet5", "alexnet", "alexnet_micro", "alexnet_small", "vgg16_bn", "resnet50"}


def test_alexnet_micro_is_the_deep_dive_authors_network():
    """AlexNet_Micro of the authors' deep_clustering_models.py (AhmadM-DL/DeepClusterImplementation, branch
    `new`): every conv unpadded and followed by batch norm, 2x2/stride-1 pools, dropout-fc1024-ReLU-dropout-fc1024."""
    model = build_model("alexnet_micro", in_channels=3, image_size=32, sobel=True, num_classes=10).eval()
    f = model.body.features
    convs = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
             for c in (f.conv1, f.conv2, f.conv3, f.conv4, f.conv5)]
    assert convs == [(2, 48, 8, 3, 0), (48, 126, 2, 1, 0), (126, 192, 3, 1, 0), (192, 192, 2, 1, 0),
                     (192, 128, 2, 1, 0)]
    assert [(p.kernel_size, p.stride) for p in (f.pool1, f.pool2, f.pool5)] == [(2, 1)] * 3
    assert [f.get_submodule(f"bn{i}").num_features for i in range(1, 6)] == [48, 126, 192, 192, 128]
    assert [type(m).__name__ for m in model.body.classifier] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    # 32 -conv1-> 9 -pool-> 8 -conv2-> 7 -pool-> 6 -conv3-> 4 -conv4-> 3 -conv5-> 2 -pool-> 1: 128 MLP inputs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        acts = model.layer_activations(x, [f"relu{i}" for i in range(1, 6)])
    assert {k: tuple(v.shape[1:]) for k, v in acts.items()} == {
        "relu1": (48, 9, 9), "relu2": (126, 7, 7), "relu3": (192, 4, 4), "relu4": (192, 3, 3), "relu5": (128, 2, 2)}
    assert (model.body.classifier.fc1.in_features, model.body.classifier.fc2.out_features) == (128, 1024)
    assert model.feature_dim == 1024 and (model.features(x) < 0).any()  # the last fc without its ReLU
    # The authors' counts: 1,677,578 with Sobel (2 input channels), 1,680,650 on RGB.
    assert sum(p.numel() for p in model.body_parameters()) == 1_677_578
    rgb = build_model("alexnet_micro", in_channels=3, image_size=32, sobel=False)
    assert sum(p.numel() for p in rgb.body_parameters()) == 1_680_650
    small = build_model("alexnet_small", in_channels=3, image_size=32, sobel=True)  # ours, for comparison
    assert sum(p.numel() for p in small.body_parameters()) == 7_484_042


def test_alexnet_micro_trains_a_step():
    torch.manual_seed(0)
    model = build_model("alexnet_micro", in_channels=3, image_size=32, sobel=True, num_classes=5).train()
    sobel = model.body.sobel.weight.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # every layer learns
    assert torch.equal(model.body.sobel.weight, sobel)  # the Sobel front stays fixed
