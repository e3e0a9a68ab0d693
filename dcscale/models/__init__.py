"""Model registry: `build_model(arch, ...)` and `build_model_from_config(cfg, ...)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcscale.errors import ConfigError
from dcscale.models.common import DeepClusterNet, SobelFilter, init_weights
from dcscale.models.convnets import alexnet, alexnet_micro, alexnet_small, lenet5, vgg16_bn
from dcscale.models.resnet import resnet50

if TYPE_CHECKING:
    from dcscale.config import Config

ARCHS = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "alexnet_micro": alexnet_micro,  # the Deep Dive paper's SVHN/CIFAR10 network
    "alexnet_small": alexnet_small,  # ours
    "vgg16_bn": vgg16_bn,
    "resnet50": resnet50,
}


def build_model(arch: str, *, in_channels: int, image_size: int, sobel: bool = False,
                batch_norm: bool = True, num_classes: int = 10) -> DeepClusterNet:
    """A freshly initialised network with a `num_classes`-way head."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch = {arch!r}: expected one of {', '.join(ARCHS)}")
    if in_channels < 1 or image_size < 1:
        raise ConfigError(f"model input must have >= 1 channel and size >= 1, got {in_channels}x{image_size}")
    return ARCHS[arch](in_channels=in_channels, image_size=image_size, sobel=sobel,
                       batch_norm=batch_norm, num_classes=num_classes)


def build_model_from_config(cfg: "Config", in_channels: int, image_size: int) -> DeepClusterNet:
    """The network of cfg.model for this shard set's channels and image size, head of size cfg.cluster.k."""
    return build_model(cfg.model.arch, in_channels=in_channels, image_size=image_size,
                       sobel=cfg.model.sobel, batch_norm=cfg.model.batch_norm, num_classes=cfg.cluster.k)


__all__ = ["ARCHS", "DeepClusterNet", "SobelFilter", "build_model", "build_model_from_config", "init_weights"]
