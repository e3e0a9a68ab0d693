"""What each probe protocol feeds the classifier (see `dcscale.eval.probe` for the three): its
classifier settings (`protocol_settings`, the references' in REFERENCE_SETTINGS), its layers and their
features (`deepdive_*`, `deepcluster_*`; fast's are `dcscale.eval.features`'), its images
(`ProbeTrainTransform`, `TenCropTransform`) and the whole plan the command runs (`plan_protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dcscale.config import Config, EvalConfig
from dcscale.cycle import network
from dcscale.errors import DcscaleError
from dcscale.eval import features as ft
from dcscale.eval.probe_classifier import ProbeSettings

PROTOCOLS = ("fast", "deepdive", "deepcluster")


# The references' classifier settings (fast takes its own from the config's eval.probe_*).
REFERENCE_SETTINGS = {
    # AhmadM-DL/DeepClusterImplementation, branch new, evaluation/linear_probe.py: nn.Linear with its
    # own init, no standardisation (l.57-63); batch 256 (l.171); SGD lr 0.01, momentum 0.9, weight
    # decay 1e-4 (l.185-190); lr decay on by default (l.193) as lr_0 / sqrt(1 + lr_0 * wd * t) with t
    # the iteration (l.20-23, 76-78). 20 epochs: n_epochs=20 in every MNIST/FMNIST/SVHN/CIFAR10_32
    # job, e.g. jobs/FMNIST/baseline/fashion_mnist.py l.120, jobs/CIFAR10_32/baseline/cifar.py l.146.
    "deepdive": ProbeSettings(epochs=20, lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=256,
                              schedule="inv_sqrt", standardise=False, init="torch"),
    # facebookresearch/deepcluster eval_linear.py: epochs 90, batch 256, lr 0.01, momentum 0.9, weight
    # decay 10**-4 (l.35-41, 115-120); learning_rate_decay at every iteration (l.234, util.py l.113-116);
    # RegLog is a plain nn.Linear on the pooled map (l.161-186).
    "deepcluster": ProbeSettings(epochs=90, lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=256,
                                 schedule="inv_sqrt", standardise=False, init="torch"),
}


def protocol_settings(protocol: str, cfg: Config | None) -> ProbeSettings:
    """The classifier settings a protocol names (fast: the config's eval.probe_*, cosine, standardised)."""
    if protocol != "fast":
        return REFERENCE_SETTINGS[protocol]
    ev = cfg.eval if cfg is not None else EvalConfig()
    return ProbeSettings(epochs=ev.probe_epochs, lr=ev.probe_lr, weight_decay=ev.probe_weight_decay,
                         batch_size=ev.probe_batch_size)


# eval_linear.py RegLog (l.166-180): AvgPool2d(kernel, stride, padding) on the ReLU output of AlexNet's
# conv1..conv5 at 224x224 -> 96x10x10, 256x6x6, 384x5x5, 384x5x5, 256x6x6 (9,216 to 9,600 values).
# Keyed by the map each entry was written for, (channels, side): (kernel, stride, padding).
DEEPCLUSTER_POOLS = {(96, 55): (6, 6, 3), (256, 27): (4, 4, 0), (384, 13): (3, 3, 1), (256, 13): (2, 2, 0)}
DEEPCLUSTER_POOL_DIM = 9600


def deepcluster_pool(act: torch.Tensor) -> torch.Tensor:
    """eval_linear.py's fixed average pooling where the map is one it was written for; any other map
    (other networks, 32x32 inputs) is average-pooled to the same target, s x s with C*s*s about
    9,600 (s = 10, 6, 5 on the table's maps), and a map already smaller is kept whole."""
    if act.dim() == 4 and act.shape[2] == act.shape[3] and (act.shape[1], act.shape[2]) in DEEPCLUSTER_POOLS:
        kernel, stride, padding = DEEPCLUSTER_POOLS[(act.shape[1], act.shape[2])]
        return F.avg_pool2d(act, kernel, stride, padding).flatten(1)
    return ft.pool_flatten(act, DEEPCLUSTER_POOL_DIM)


def _trunk_modules(model) -> list[str]:
    """Names of the conv trunk's modules in order (conv1, bn1, relu1, pool1, ...), [] if it has none."""
    trunk = getattr(model.body, "features", None) if model is not None else None
    return [name for name, _ in trunk.named_children()] if isinstance(trunk, nn.Sequential) else []


def _split_layers(spec: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise DcscaleError("--layer: give a layer name, 'all' or 'pixels'")
    return names


def deepdive_layers(spec: str | None, model) -> list[str]:
    """Modules of the conv trunk, by name, as the authors' extract_features takes them. Default: relu5
    where the trunk has one (their AlexNets: target_layer="relu_5", e.g. jobs/CIFAR10_32/baseline/
    cifar.py l.149), else conv2 (their LeNet: target_layer="conv_2", jobs/FMNIST/baseline/fashion_mnist.py l.123)."""
    available = _trunk_modules(model)
    if spec is None:
        if model is None:
            raise DcscaleError("--protocol deepdive needs a network: give --checkpoint or --random-init --config")
        default = next((name for name in ("relu5", "conv2") if name in available), None)
        if default is None:
            raise DcscaleError(f"--protocol deepdive: {model.arch} has no relu5 or conv2 module in a conv trunk; "
                               f"give --layer" + (f" (one of {', '.join(available)})" if available else ""))
        return [default]
    layers = _split_layers(spec)
    for name in layers:
        if name == ft.PIXELS:
            continue
        if model is None:
            raise DcscaleError(f"--layer {name} needs a network: give --checkpoint or --random-init --config")
        if name not in available:
            raise DcscaleError(f"--protocol deepdive: unknown layer '{name}' for {model.arch}; available: "
                               f"{', '.join(available + [ft.PIXELS]) if available else ft.PIXELS}")
    return layers


def deepdive_features(model, layers: list[str]):
    """x -> {layer: [B, D]}: the authors' DeepClusteringNet.extract_features(x, layer, flatten=False)
    (Sobel front, then the trunk's modules in order, stopping at the named one: conv2 is the
    convolution's own output, before batch norm) and their LogisticRegression's flattening, with no
    pooling (avg_pool=None in every job). One pass serves every requested layer."""
    wanted = [name for name in layers if name != ft.PIXELS]

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {ft.PIXELS: x.flatten(1)} if ft.PIXELS in layers else {}
        if wanted:
            if hasattr(model.body, "sobel"):
                x = model.body.sobel(x)
            for name, module in model.body.features.named_children():
                x = module(x)
                if name in wanted:
                    out[name] = x.flatten(1)
                    if len(out) == len(layers):
                        break
        return {name: out[name] for name in layers}
    return fn


def deepcluster_layers(spec: str | None, model) -> list[str]:
    """Probe layers as `fast` names them; default: every ReLU output (relu1..relu5: eval_linear.py's
    --conv N taps the N-th ReLU, l.189-200), or every probe layer of networks without such names."""
    if spec is not None:
        return ft.resolve_layers(spec, model)
    if model is None:
        raise DcscaleError("--protocol deepcluster needs a network: give --checkpoint or --random-init --config")
    layers = model.probe_layers()
    return [name for name in layers if name.startswith("relu")] or layers


def deepcluster_features(model, layers: list[str]):
    """x -> {layer: [B, D]}: each layer's activation through deepcluster_pool, from one forward pass."""
    net_layers = [name for name in layers if name not in (ft.PIXELS, ft.FEATURES)]

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if net_layers:
            out.update({name: deepcluster_pool(act) for name, act in model.layer_activations(x, net_layers).items()})
        if ft.PIXELS in layers:
            out[ft.PIXELS] = deepcluster_pool(x)
        if ft.FEATURES in layers:
            out[ft.FEATURES] = model.features(x)
        return {name: out[name] for name in layers}
    return fn


# ---- images for the online protocols --------------------------------------------------------------


class ProbeTrainTransform:
    """Probe training images, drawn afresh every epoch: Resize(resize) + CenterCrop(crop_from), then a
    random image_size crop of that (when crop_from is larger) and a random horizontal flip.

    deepcluster: crop_from = resize, eval_linear.py's Resize(256), CenterCrop(256), RandomCrop(224),
    RandomHorizontalFlip (l.88-93). deepdive --hflip: crop_from = image_size, the FMNIST jobs'
    Resize(44), CenterCrop(32), RandomHorizontalFlip (jobs/FMNIST/baseline/fashion_mnist.py l.109-114).
    A dcscale batch transform (decode/collate/augment), its draws seeded by position (SeededDraws).
    """

    n_uniforms = 3  # crop top, crop left, flip

    def __init__(self, image_size: int, channels: int, resize: int, crop_from: int, mean=None, std=None):
        from dcscale.data.transforms import EvalTransform

        self.image_size, self.resize, self.crop_from = image_size, resize, crop_from
        self.base = EvalTransform(crop_from, channels, resize=resize, mean=mean, std=std)

    def __repr__(self) -> str:
        crop = f"RandomCrop({self.image_size}), " if self.crop_from > self.image_size else ""
        return f"Resize({self.resize}), CenterCrop({self.crop_from}), {crop}RandomHorizontalFlip()"

    def decode(self, shardset, index: int):
        return self.base.decode(shardset, index)

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.base.collate(images)

    def augment(self, batch: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        if batch.dtype == torch.uint8:
            x = self.base.geometry(x)
        room, s = self.crop_from - self.image_size, self.image_size
        if room:
            offsets = (uniforms[:, :2] * (room + 1)).long().clamp_(max=room)
            x = torch.stack([im[:, top:top + s, left:left + s] for im, (top, left) in zip(x, offsets.tolist())])
        flip = uniforms[:, 2] < 0.5
        if flip.any():
            x[flip] = x[flip].flip(-1)
        return self.base.normalise(x).contiguous()


class TenCropTransform:
    """eval_linear.py --tencrops (l.76-81): Resize(resize), then TenCrop(image_size): the four corners
    and the centre, and the same of the mirrored image. An extraction batch of B images becomes
    [B * 10, C, S, S] (the ten crops of an image together)."""

    def __init__(self, image_size: int, channels: int, resize: int, mean=None, std=None):
        from dcscale.data.transforms import EvalTransform

        self.image_size, self.resize = image_size, resize
        self.base = EvalTransform(image_size, channels, resize=resize, mean=mean, std=std)

    def __repr__(self) -> str:
        return f"Resize({self.resize}), TenCrop({self.image_size})"

    def decode(self, shardset, index: int):
        return self.base.decode(shardset, index)

    def _crops(self, image: torch.Tensor) -> torch.Tensor:
        from dcscale.data.transforms import center_crop, resize_shorter

        x, s = resize_shorter(image[None].float(), self.resize), self.image_size
        h, w = x.shape[-2:]
        five = [x[..., top:top + s, left:left + s] for top, left in ((0, 0), (0, w - s), (h - s, 0), (h - s, w - s))]
        five.append(center_crop(x, s))
        return torch.cat(five + [crop.flip(-1) for crop in five])  # [10, C, S, S]

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self._crops(image) for image in images])  # [B, 10, C, S, S] float

    def finish(self, batch: torch.Tensor, device=None) -> torch.Tensor:
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        return self.base.normalise(batch.reshape(-1, *batch.shape[2:])).contiguous()


@dataclass
class ProtocolPlan:
    """What a protocol runs: layers, how to get their features, images, pooling (for the report)."""
    layers: list[str]
    # online (the network runs on every augmented training batch): x -> {layer: [B, D]} for all layers;
    # cached (features extracted once): layer -> (x -> [B, D])
    features_fn: Callable
    online: bool
    train_tf: object
    test_tf: object
    pool_dim: int | None
    pooling: str
    augmentation: str
    crops: int = 1


def plan_protocol(args, model, cfg: Config | None, channels: int, size: int) -> ProtocolPlan:
    from dcscale.data.transforms import eval_transform

    eval_tf = network.eval_transform_for(cfg, channels, size)
    mean, std = (cfg.data.mean, cfg.data.std) if cfg else (None, None)
    if args.protocol == "fast":
        pool_dim = args.pool_dim if args.pool_dim is not None else (
            cfg.eval.probe_pool_dim if cfg else EvalConfig.probe_pool_dim)
        if pool_dim < 1:
            raise DcscaleError(f"--pool-dim {pool_dim}: expected an integer >= 1")
        return ProtocolPlan(ft.resolve_layers(args.layer, model), lambda layer: ft.layer_fn(model, layer, pool_dim), False,
                     eval_tf, eval_tf, pool_dim, f"adaptive average pooling of conv maps to about {pool_dim} values",
                     "none")
    if args.protocol == "deepdive":
        layers = deepdive_layers(args.layer, model)
        if args.hflip:
            train_tf = ProbeTrainTransform(size, channels, eval_tf.resize, size, mean, std)
            return ProtocolPlan(layers, deepdive_features(model, layers), True, train_tf, eval_tf, None,
                         "none (the trunk module's whole output)", repr(train_tf))
        # Without augmentation every epoch sees the same features: extracting them once is the same.
        return ProtocolPlan(layers, lambda layer: (lambda x: deepdive_features(model, [layer])(x)[layer]), False,
                     eval_tf, eval_tf, None, "none (the trunk module's whole output)", "none (the extraction transform)")
    # deepcluster: eval_linear.py resizes to 256 for 224 crops; without data.resize, the same ratio.
    resize = (cfg.data.resize if cfg and cfg.data.resize else None) or round(size * 256 / 224)
    if resize < size:
        raise DcscaleError(f"--protocol deepcluster: data.resize {resize} is smaller than the input side {size}")
    layers = deepcluster_layers(args.layer, model)
    train_tf = ProbeTrainTransform(size, channels, resize, resize, mean, std)
    test_tf = (TenCropTransform(size, channels, resize, mean, std) if args.ten_crop
               else eval_transform(size, channels, resize=resize, mean=mean, std=std))
    return ProtocolPlan(layers, deepcluster_features(model, layers), True, train_tf, test_tf, DEEPCLUSTER_POOL_DIM,
                 "eval_linear.py's AvgPool2d table on AlexNet's 224x224 maps, else adaptive average pooling "
                 f"to about {DEEPCLUSTER_POOL_DIM} values", repr(train_tf), crops=10 if args.ten_crop else 1)
