"""LeNet-5, AlexNet (DeepCluster's), the Deep Dive paper's AlexNet_Micro, our alexnet_small, VGG16(-BN).

All share one shape: [Sobel] -> conv trunk -> flatten -> MLP whose last linear layer has no
ReLU (the clustered features). The MLP input size comes from a dry run of the trunk, so every
network takes the shard set's channels and image size (a too small size is a ConfigError).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from dcscale.models.common import DeepClusterNet, SobelFilter, conv_stack, flat_dim, init_weights

# ("conv", out, kernel, stride, padding) / ("pool", kernel, stride)
LENET5 = [("conv", 6, 5, 1, 0), ("pool", 2, 2), ("conv", 16, 5, 1, 0), ("pool", 2, 2)]

# DeepCluster's AlexNet (CFG['2012'] in the original models/alexnet.py), for 224x224 inputs.
ALEXNET = [("conv", 96, 11, 4, 2), ("pool", 3, 2), ("conv", 256, 5, 1, 2), ("pool", 3, 2),
           ("conv", 384, 3, 1, 1), ("conv", 384, 3, 1, 1), ("conv", 256, 3, 1, 1), ("pool", 3, 2)]

# The Deep Dive paper's SVHN/CIFAR10 network: AlexNet_Micro in the authors' deep_clustering_models.py
# (AhmadM-DL/DeepClusterImplementation, branch `new`), layer for layer. At 32x32:
# 32 -conv1-> 9 -pool-> 8 -conv2-> 7 -pool-> 6 -conv3-> 4 -conv4-> 3 -conv5-> 2 -pool-> 1, so the MLP
# gets 128 inputs (their hard-coded `input_features=128`).
ALEXNET_MICRO = [("conv", 48, 8, 3, 0), ("pool", 2, 1), ("conv", 126, 2, 1, 0), ("pool", 2, 1),
                 ("conv", 192, 3, 1, 0), ("conv", 192, 2, 1, 0), ("conv", 128, 2, 1, 0), ("pool", 2, 1)]

# Ours, not the paper's: the Deep Dive's filter counts (48/126/192/192/128) on an AlexNet-shaped trunk
# with 5x5 conv1 and three 3x3/stride-2 max-pools, 32 -> 15 -> 7 -> 3 (128*3*3 = 1152 MLP inputs).
ALEXNET_SMALL = [("conv", 48, 5, 1, 2), ("pool", 3, 2), ("conv", 126, 5, 1, 2), ("pool", 3, 2),
                 ("conv", 192, 3, 1, 1), ("conv", 192, 3, 1, 1), ("conv", 128, 3, 1, 1), ("pool", 3, 2)]

# VGG16: channels per conv, "M" = 2x2 max-pool; blocks end at each "M".
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _mlp(in_dim: int, hidden: list[int], dropout: bool) -> nn.Sequential:
    """Linear layers with ReLU between them and none after the last (the features). With dropout,
    Dropout(0.5) precedes every linear layer, as in the original AlexNet classifier."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    dim = in_dim
    for i, width in enumerate(hidden):
        if dropout:
            layers[f"drop{i + 1}"] = nn.Dropout(0.5)
        layers[f"fc{i + 1}"] = nn.Linear(dim, width)
        if i < len(hidden) - 1:
            layers[f"fc{i + 1}_relu"] = nn.ReLU()
        dim = width
    return nn.Sequential(layers)


def _assemble(arch: str, trunk: nn.Sequential, probes: dict[str, str], hidden: list[int], dropout: bool,
              *, in_channels: int, image_size: int, sobel: bool, num_classes: int) -> DeepClusterNet:
    trunk_in = 2 if sobel else in_channels
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if sobel:
        parts["sobel"] = SobelFilter(in_channels)
    parts["features"] = trunk
    parts["flatten"] = nn.Flatten()
    parts["classifier"] = _mlp(flat_dim(trunk, trunk_in, image_size, arch), hidden, dropout)
    body = nn.Sequential(parts)
    init_weights(body)
    return DeepClusterNet(body, hidden[-1], {k: f"features.{v}" for k, v in probes.items()},
                          num_classes, arch=arch)


def lenet5(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
           num_classes: int = 10) -> DeepClusterNet:
    """LeNet-5 as in the Deep Dive paper (FMNIST): conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84.
    Features: the 84-unit layer without ReLU. 32x32 inputs give 16*5*5 = 400 MLP inputs, 28x28 give 256."""
    trunk, probes = conv_stack(LENET5, 2 if sobel else in_channels, batch_norm)
    return _assemble("lenet5", trunk, probes, [120, 84], dropout=False, in_channels=in_channels,
                     image_size=image_size, sobel=sobel, num_classes=num_classes)


def alexnet(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
            num_classes: int = 1000) -> DeepClusterNet:
    """DeepCluster's AlexNet: conv 96/256/384/384/256 (batch norm after every conv), classifier
    4096-4096 with dropout. Features: fc7 without its ReLU (4096-d)."""
    trunk, probes = conv_stack(ALEXNET, 2 if sobel else in_channels, batch_norm)
    return _assemble("alexnet", trunk, probes, [4096, 4096], dropout=True, in_channels=in_channels,
                     image_size=image_size, sobel=sobel, num_classes=num_classes)


def alexnet_micro(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
                  num_classes: int = 10) -> DeepClusterNet:
    """The Deep Dive paper's AlexNet for 32x32 SVHN/CIFAR10 (the authors' `AlexNet_Micro`): conv
    48@8x8/3, pool 2/1, conv 126@2x2, pool 2/1, conv 192@3x3, conv 192@2x2, conv 128@2x2, pool 2/1 (no
    padding; batch norm after every conv), then dropout, fc 1024, ReLU, dropout, fc 1024. Features: the
    last fc without ReLU (1024-d). 1,677,578 parameters at 32x32 with Sobel (2 input channels)."""
    trunk, probes = conv_stack(ALEXNET_MICRO, 2 if sobel else in_channels, batch_norm)
    return _assemble("alexnet_micro", trunk, probes, [1024, 1024], dropout=True, in_channels=in_channels,
                     image_size=image_size, sobel=sobel, num_classes=num_classes)


def alexnet_small(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
                  num_classes: int = 10) -> DeepClusterNet:
    """Ours, not the paper's (the paper's network is `alexnet_micro`): an AlexNet-shaped trunk for 32x32
    inputs with the Deep Dive's filter counts, conv 48@5x5/126@5x5/192/192/128@3x3 (padded) and three
    3x3/stride-2 max-pools, classifier 2048-2048 with dropout. Features: fc7 without ReLU (2048-d);
    7.48M parameters at 32x32 with Sobel."""
    trunk, probes = conv_stack(ALEXNET_SMALL, 2 if sobel else in_channels, batch_norm)
    return _assemble("alexnet_small", trunk, probes, [2048, 2048], dropout=True, in_channels=in_channels,
                     image_size=image_size, sobel=sobel, num_classes=num_classes)


def _vgg_trunk(in_channels: int, batch_norm: bool) -> tuple[nn.Sequential, dict[str, str]]:
    """VGG16 trunk named blockN_convM / blockN_bnM / blockN_reluM / blockN_pool. Probe `convN` is the
    output of block N's last ReLU (before its pool)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    probes: dict[str, str] = {}
    block, conv_in_block, channels = 1, 0, in_channels
    for v in VGG16:
        if v == "M":
            probes[f"conv{block}"] = f"block{block}_relu{conv_in_block}"
            layers[f"block{block}_pool"] = nn.MaxPool2d(2, 2)
            block, conv_in_block = block + 1, 0
            continue
        conv_in_block += 1
        name = f"block{block}_"
        layers[name + f"conv{conv_in_block}"] = nn.Conv2d(channels, v, 3, padding=1)
        if batch_norm:
            layers[name + f"bn{conv_in_block}"] = nn.BatchNorm2d(v)
        layers[name + f"relu{conv_in_block}"] = nn.ReLU()
        channels = v
    return nn.Sequential(layers), probes


def vgg16_bn(*, in_channels: int, image_size: int, sobel: bool = False, batch_norm: bool = True,
             num_classes: int = 1000) -> DeepClusterNet:
    """DeepCluster's VGG16 (batch norm unless batch_norm=False): 13 convs, classifier 4096-4096
    (dropout between, as the original). At 224 the MLP input is 512*7*7; smaller images give
    512*(size/32)^2 (no adaptive pooling: the original has none). Features: fc7 without ReLU."""
    trunk, probes = _vgg_trunk(2 if sobel else in_channels, batch_norm)
    net = _assemble("vgg16_bn", trunk, probes, [4096, 4096], dropout=False, in_channels=in_channels,
                    image_size=image_size, sobel=sobel, num_classes=num_classes)
    # The original VGG classifier is Linear-ReLU-Dropout-Linear (no dropout before the first).
    cls = net.body.classifier
    net.body.classifier = nn.Sequential(OrderedDict(
        fc1=cls.fc1, fc1_relu=cls.fc1_relu, drop2=nn.Dropout(0.5), fc2=cls.fc2))
    return net
