"""What every dcscale network shares: the Sobel front, the original initialisation, and the
`DeepClusterNet` wrapper (body -> features, a replaceable K-way head, named probe layers).

Feature convention, as in the original DeepCluster (main.py): the features that are clustered are
the output of the body's last linear layer *without* its ReLU; for training the ReLU is put back
between the body and the head (`forward` = head(relu(features))).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from dcscale.errors import ConfigError

# Sobel kernels of the original (models/alexnet.py): x- and y-gradients of the grayscale image.
_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


class SobelFilter(nn.Module):
    """Fixed grayscale + Sobel-x/Sobel-y front: [B, C, H, W] -> [B, 2, H, W].

    Grayscale (channel mean) followed by the 3x3 Sobel conv is one linear map, so it is stored as a
    single [2, C, 3, 3] kernel. It is a buffer, not a parameter: never trained, never in an
    optimiser, and DDP does not expect gradients for it.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        sobel = torch.tensor([_SOBEL_X, _SOBEL_Y])  # [2, 3, 3]
        weight = sobel[:, None].expand(2, in_channels, 3, 3) / in_channels
        self.register_buffer("weight", weight.contiguous())
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, padding=1)


def init_weights(module: nn.Module) -> None:
    """The original DeepCluster initialisation: conv N(0, sqrt(2 / (k*k*out))), bias 0;
    batch norm weight 1, bias 0; linear N(0, 0.01), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_stack(spec: list, in_channels: int, batch_norm: bool) -> tuple[nn.Sequential, dict[str, str]]:
    """Build an AlexNet/LeNet-style conv trunk from `spec`.

    spec items: ("conv", out, kernel, stride, padding) or ("pool", kernel, stride).
    Module names are conv1/bn1/relu1/pool1 ...; returns the trunk and the probe map
    {"convN": post-BN (pre-ReLU) module, "reluN": the ReLU module}.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    probes: dict[str, str] = {}
    n_conv = 0
    channels = in_channels
    for item in spec:
        if item[0] == "conv":
            _, out, kernel, stride, padding = item
            n_conv += 1
            layers[f"conv{n_conv}"] = nn.Conv2d(channels, out, kernel, stride=stride, padding=padding)
            probes[f"conv{n_conv}"] = f"conv{n_conv}"
            if batch_norm:
                layers[f"bn{n_conv}"] = nn.BatchNorm2d(out)
                probes[f"conv{n_conv}"] = f"bn{n_conv}"
            # Not in-place: a probe hook on convN must not see its output overwritten by the ReLU.
            layers[f"relu{n_conv}"] = nn.ReLU()
            probes[f"relu{n_conv}"] = f"relu{n_conv}"
            channels = out
        elif item[0] == "pool":
            _, kernel, stride = item
            layers[f"pool{n_conv}"] = nn.MaxPool2d(kernel, stride)
        else:
            raise ValueError(f"unknown layer spec {item!r}")
    return nn.Sequential(layers), probes


def flat_dim(trunk: nn.Module, in_channels: int, image_size: int, arch: str) -> int:
    """Size of the flattened trunk output for one image, from a dry run (eval mode, so batch norm
    works on a single 1x1 map). A too small image size becomes a one-line ConfigError."""
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            out = trunk(torch.zeros(1, in_channels, image_size, image_size))
    except RuntimeError as exc:
        raise ConfigError(
            f"model.arch={arch} cannot take {image_size}x{image_size} inputs "
            f"(data.image_size too small): {str(exc).splitlines()[0]}") from None
    finally:
        trunk.train(was_training)
    return int(out[0].numel())


class _StopForward(Exception):
    """Raised by the last probe hook so that layer_activations skips the rest of the network."""


class DeepClusterNet(nn.Module):
    """A network as DeepCluster uses it.

    body: image -> feature vector (what is clustered); includes the Sobel front when enabled.
    head: nn.Linear(feature_dim, K), replaced every cycle by `reset_head`.
    probes: public probe name -> qualified module name inside `body` (its output is the activation).
    relu_before_head: True when the body ends with a linear layer whose ReLU the original removes
    for clustering and puts back for training; False when the body already ends non-negative
    (ResNet's pooled output).
    """

    def __init__(self, body: nn.Module, feature_dim: int, probes: dict[str, str], num_classes: int,
                 arch: str, relu_before_head: bool = True):
        super().__init__()
        self.arch = arch
        self.body = body
        self.feature_dim = int(feature_dim)
        self._probes = dict(probes)
        self.head_activation = nn.ReLU() if relu_before_head else nn.Identity()
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.reset_head(num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, feature_dim]: the representation that is clustered."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_activation(self.body(x)))

    def reset_head(self, k: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Replace the head by a fresh Linear(feature_dim, k): weights N(0, 0.01), bias 0, on the
        body's device and dtype. Returns the new head (its parameters are new objects: rebuild the
        head's optimiser, and re-wrap in DDP)."""
        ref = next(self.body.parameters())
        head = nn.Linear(self.feature_dim, int(k), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if generator is None:
                head.weight.normal_(0.0, 0.01)
            else:
                # Draw on the generator's device, then move: CPU generators work for GPU models.
                w = torch.randn(head.weight.shape, generator=generator, dtype=ref.dtype,
                                device=generator.device) * 0.01
                head.weight.copy_(w)
            head.bias.zero_()
        self.head = head
        return head

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def body_parameters(self) -> list[nn.Parameter]:
        """Trainable body parameters (the Sobel front is a buffer and never appears here)."""
        return [p for p in self.body.parameters() if p.requires_grad]

    def probe_layers(self) -> list[str]:
        """Names accepted by `layer_activations`, shallow to deep."""
        return list(self._probes)

    def layer_activations(self, x: torch.Tensor, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Run the body on x and return {name: activation} for the requested probe layers
        ([B, C, H, W] maps for conv layers). Stops the forward pass after the deepest one."""
        names = list(names)
        unknown = [n for n in names if n not in self._probes]
        if unknown:
            raise ValueError(f"unknown probe layer(s) {unknown} for {self.arch}; "
                             f"available: {', '.join(self._probes)}")
        modules = dict(self.body.named_modules())
        wanted = {self._probes[n]: n for n in names}
        out: dict[str, torch.Tensor] = {}

        def make_hook(probe_name: str):
            def hook(_module, _inputs, output):
                out[probe_name] = output
                if len(out) == len(wanted):
                    raise _StopForward
            return hook

        handles = [modules[path].register_forward_hook(make_hook(name)) for path, name in wanted.items()]
        try:
            self.body(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: out[n] for n in names}
