"""torchvision's ResNet-50 as a DeepClusterNet: the body ends at the global average pool (2048-d,
already non-negative, so no ReLU is re-inserted before the head)."""

from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from dcscale.errors import ConfigError
from dcscale.models.common import DeepClusterNet, SobelFilter, flat_dim


def resnet50(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
             num_classes: int = 1000) -> DeepClusterNet:
    """torchvision resnet50 (its own initialisation: conv kaiming-normal fan_out, which is the
    original N(0, sqrt(2/(k*k*out))), batch norm 1/0), with the stem conv adapted to the input
    channels (2 with Sobel). Probes: conv1 (stem after ReLU, before max-pool), layer1..layer4."""
    if not batch_norm:
        raise ConfigError("model.batch_norm=false is not supported for model.arch=resnet50")
    net = torchvision.models.resnet50(weights=None)
    trunk_in = 2 if sobel else in_channels
    if trunk_in != 3:
        net.conv1 = nn.Conv2d(trunk_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk = nn.Sequential(OrderedDict(
        (name, getattr(net, name))
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")))
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if sobel:
        parts["sobel"] = SobelFilter(in_channels)
    parts["features"] = trunk
    parts["flatten"] = nn.Flatten()
    feature_dim = flat_dim(trunk, trunk_in, image_size, "resnet50")
    probes = {"conv1": "features.relu", **{f"layer{i}": f"features.layer{i}" for i in range(1, 5)}}
    return DeepClusterNet(nn.Sequential(parts), feature_dim, probes, num_classes, arch="resnet50",
                          relu_before_head=False)
