"""`dcscale probe`: linear-probe evaluation of a frozen network's layers, under one of three protocols.

- `fast` (the default; ours): extract each layer's activations for the labelled train and test shard
  sets once (sharded over ranks under torchrun, each rank keeping its own rows; cached as .npy), average-pool
  them to about `pool_dim` values, standardise with the train statistics, and train a multinomial
  logistic regression (nn.Linear + SGD with momentum, cosine schedule, the config's eval.probe_*).
  Quick, and comparable between dcscale runs, but with neither paper's numbers.
- `deepdive`: the Deep Dive authors' evaluation/linear_probe.py (AhmadM-DL/DeepClusterImplementation,
  branch `new`) as their jobs call it: the raw output of one module of the conv trunk (conv2 before
  batch norm for LeNet, relu5 for the AlexNets), no pooling, no standardisation, SGD lr 0.01
  momentum 0.9 weight decay 1e-4 with lr_0 / sqrt(1 + lr_0 * wd * t) per iteration, batch 256,
  20 epochs, the extraction transform for train and test (`--hflip` adds their FMNIST jobs' flip).
- `deepcluster`: facebookresearch/deepcluster eval_linear.py: the ReLU output of every conv layer,
  average-pooled to about 9,600 values (their AvgPool2d table on AlexNet at 224x224), the same SGD
  and decay, batch 256, 90 epochs, a random crop + flip drawn afresh for every batch (so the frozen
  body runs on every augmented batch; nothing is cached), centre crop or `--ten-crop` at test.

Under torchrun no rank gathers features: each keeps its own rows and the classifiers step on the sum
of the ranks' gradients (LinearClassifier.step_shared), so every protocol gives one process's numbers
up to float rounding.

Each protocol's numbers and the reference lines they come from are in REFERENCE_SETTINGS below and
in docs/evaluation.md. Reports top-1/top-5 on the test set, one line per layer,
and a JSON file that records the protocol and every setting it ran with.

    dcscale probe --checkpoint runs/x/checkpoints/last.pt --train data/t --test data/v --layer all
    dcscale probe --protocol deepdive --checkpoint runs/x/checkpoints/last.pt --train data/t --test data/v
    dcscale probe --random-init --config configs/digits_demo.yaml --train ... --test ... --layer relu2
    dcscale probe --train ... --test ... --layer pixels        # raw-pixel baseline, no network
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcscale.config import Config, EvalConfig, load_config
from dcscale.errors import DcscaleError
from dcscale.cycle import network
from dcscale.eval import features as ft
from dcscale.outputs import output_dir, output_error, output_file, writing
from dcscale.safefile import atomic_write

PROTOCOLS = ("fast", "deepdive", "deepcluster")
SCHEDULES = ("cosine", "step", "constant", "inv_sqrt")

# ---- the classifier ------------------------------------------------------------------------------


@dataclass
class ProbeSettings:
    epochs: int = EvalConfig.probe_epochs
    lr: float = EvalConfig.probe_lr
    momentum: float = 0.9
    weight_decay: float = EvalConfig.probe_weight_decay
    batch_size: int = EvalConfig.probe_batch_size
    # cosine | step (x0.1 at 50% and 75% of the epochs) | constant | inv_sqrt (both references:
    # lr / sqrt(1 + lr * weight_decay * t) at iteration t)
    schedule: str = "cosine"
    seed: int = 0
    standardise: bool = True  # zero mean, unit variance per feature (ours; neither reference does)
    init: str = "normal"  # normal: weights N(0, 0.01), bias 0 (ours) | torch: nn.Linear's own (both references)


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


def _lr_at(settings: ProbeSettings, epoch: int, step: int) -> float:
    """The learning rate of iteration `step` (counted from 0 over all epochs), in epoch `epoch`."""
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
    if settings.schedule == "step":
        return settings.lr * 0.1 ** sum(epoch >= settings.epochs * f for f in (0.5, 0.75))
    if settings.schedule == "inv_sqrt":
        return settings.lr / math.sqrt(1 + settings.lr * settings.weight_decay * step)
    return settings.lr


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per dimension, with the train set's statistics (constant dims -> 0)."""
    x = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-6)
    return (x - mean) / std, (y - mean) / std


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


class LinearClassifier:
    """The logistic regression and its SGD: `step` sets the scheduled learning rate, then takes one
    step on a batch. `generator` (seeded by settings.seed) also draws the fast path's batch order."""

    def __init__(self, dim: int, num_classes: int, settings: ProbeSettings, device=None):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init, reproducible from the seed
            torch.manual_seed(settings.seed)
            self.linear = nn.Linear(dim, num_classes)
        if settings.init == "normal":
            with torch.no_grad():
                self.linear.weight.normal_(0.0, 0.01, generator=self.generator)
                self.linear.bias.zero_()
        self.linear.to(device)
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()
        self.iteration = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """One SGD step on (x, y); returns the logits (for the references' running train accuracy)."""
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.settings, epoch, self.iteration)
        logits = self.linear(x)
        loss = self.loss_fn(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return logits.detach()

    def step_shared(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """One SGD step on a batch split over ranks, this rank holding rows (x, y) of it (maybe none).
        The gradient of the batch's mean loss is the sum over ranks of each rank's summed-loss gradient,
        over the batch's row count: one all-reduce of D x C + C + 1 floats (the count rides along).
        Every rank then takes the same step, so the classifiers stay equal. Returns this rank's logits;
        None (no step) when no rank had a row, as `step`'s callers skip an empty batch."""
        from dcscale import dist

        logits = self.linear(x)
        self.opt.zero_grad(set_to_none=False)
        F.cross_entropy(logits, y, reduction="sum").backward()
        params = list(self.linear.parameters())
        rows_here = torch.tensor([float(len(y))], device=logits.device)
        packed = torch.cat([p.grad.reshape(-1) for p in params] + [rows_here])
        dist.all_reduce_tensor_(packed)
        rows = float(packed[-1])
        if rows == 0:
            return None
        offset = 0
        for p in params:
            p.grad.copy_(packed[offset:offset + p.numel()].view_as(p.grad)).div_(rows)
            offset += p.numel()
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.settings, epoch, self.iteration)
        self.opt.step()
        self.iteration += 1
        return logits.detach()


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       settings: ProbeSettings, num_classes: int | None = None) -> dict:
    """Multinomial logistic regression on fixed features (standardised if settings.standardise);
    returns top-1/top-5 on both sets. Under several ranks, each passes its own rows
    (`train_linear_probe_ranks`)."""
    from dcscale import dist

    if dist.get_env().distributed:
        return train_linear_probe_ranks(train_x, train_y, test_x, test_y, settings, num_classes)
    if len(train_y) == 0 or len(test_y) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if settings.standardise:
        x, xt = standardise(train_x, test_x)
    else:
        x, xt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (train_x, test_x))
    y, yt = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(test_y.astype(np.int64))
    clf = LinearClassifier(x.shape[1], num_classes, settings)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y), generator=clf.generator)
        for start in range(0, len(y), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            clf.step(x[batch], y[batch], epoch)
    with torch.no_grad():
        train_logits, test_logits = clf.linear(x), clf.linear(xt)
    return {
        "top1": topk_accuracy(test_logits, yt, 1),
        "top5": topk_accuracy(test_logits, yt, 5),
        "train_top1": topk_accuracy(train_logits, y, 1),
        "dim": int(x.shape[1]),
        "train_n": int(len(y)),
        "test_n": int(len(yt)),
        "num_classes": int(num_classes),
    }


def standardise_ranks(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`standardise` with the statistics of every rank's train rows: the mean, then the unbiased
    variance about it, each from one all-reduce of float64 sums (D values)."""
    from dcscale import dist

    n = dist.all_reduce_sum([len(train)])[0]
    mean = dist.all_reduce_array_(train.double().sum(0).numpy()) / n
    squares = dist.all_reduce_array_(((train.double() - torch.from_numpy(mean)) ** 2).sum(0).numpy())
    mean = torch.from_numpy(mean).float()[None]
    std = torch.from_numpy(np.sqrt(squares / max(n - 1, 1))).float().clamp_min(1e-6)[None]
    return (train - mean) / std, (test - mean) / std


def _rows_of_width(a: np.ndarray, width: int) -> torch.Tensor:
    """float32 rows; a rank with none (nothing decodable) gets a [0, width] array."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return torch.from_numpy(a if len(a) else np.zeros((0, width), np.float32))


def train_linear_probe_ranks(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                             settings: ProbeSettings, num_classes: int | None = None) -> dict:
    """`train_linear_probe` over every rank's own rows (collective): no rank holds more than its rows.

    The rows of all ranks, in rank order, form the single process's train set, and every rank draws
    the same order of it from the seed: batch b is the same rows as in one process, each rank computes
    the gradient of those it holds, and `step_shared` sums them. So the classifier takes the single
    process's steps up to float rounding (the order of sums); the accuracies count over every rank.
    The returned dict (on every rank) adds `feature_rows_by_rank`: each rank's train and test rows."""
    from dcscale import dist

    train_counts, test_counts = dist.row_counts(len(train_y)), dist.row_counts(len(test_y))
    n, offset = sum(train_counts), sum(train_counts[:dist.get_env().rank])
    if n == 0 or sum(test_counts) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    width = int(max(dist.all_gather_rows(np.array([a.shape[1] if a.ndim == 2 and len(a) else 0
                                                   for a in (train_x, test_x)], np.int64))))
    if num_classes is None:
        local_max = max([int(a.max()) for a in (train_y, test_y) if len(a)], default=0)
        num_classes = int(max(dist.all_gather_rows(np.array([local_max], np.int64)))) + 1
    x, xt = _rows_of_width(train_x, width), _rows_of_width(test_x, width)
    if settings.standardise:
        x, xt = standardise_ranks(x, xt)
    y, yt = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(test_y.astype(np.int64))
    clf = LinearClassifier(width, num_classes, settings)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=clf.generator)
        for start in range(0, n, settings.batch_size):
            batch = order[start:start + settings.batch_size]
            mine = batch[(batch >= offset) & (batch < offset + len(y))] - offset
            clf.step_shared(x[mine], y[mine], epoch)
    with torch.no_grad():
        train_logits, test_logits = clf.linear(x), clf.linear(xt)
    hits = dist.all_reduce_sum([_hits(test_logits, yt, 1), _hits(test_logits, yt, 5), _hits(train_logits, y, 1)])
    return {
        "top1": hits[0] / sum(test_counts),
        "top5": hits[1] / sum(test_counts),
        "train_top1": hits[2] / n,
        "dim": width,
        "train_n": n,
        "test_n": sum(test_counts),
        "num_classes": int(num_classes),
        "feature_rows_by_rank": {"train": train_counts, "test": test_counts},
    }


def _hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows whose label is among their k highest logits."""
    if len(labels) == 0:
        return 0
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


# ---- what each protocol feeds the classifier ---------------------------------------------------------

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


def train_probe_online(features_fn, dims: dict[str, int], train_ss, test_ss, train_tf, test_tf,
                       settings: ProbeSettings, num_classes: int, env, batch_size: int, workers: int,
                       crops: int = 1) -> dict[str, dict]:
    """The references' loop: every epoch, every batch of the train set is transformed afresh, run
    through the frozen network (eval mode, no gradients) and the classifiers take one step on it; one
    classifier per layer, all fed by the same forward pass. Then the test set, averaging the softmax
    over `crops` crops per image (ten-crop) as eval_linear.py does (l.290-293).

    `train_top1` is the accuracy on the last epoch's augmented batches, as the references' meters.

    Under several ranks, each batch is the single process's (the same order from the seed, the same
    augmentation: it is drawn from the image's position in the epoch), rank r taking its positions
    r, r + W, ...; the classifiers step on the sum of the ranks' gradients (`step_shared`), and every
    rank tests on its slice of the test set, the hits summed over ranks."""
    from torch.utils.data import DataLoader

    from dcscale import dist
    from dcscale.data.loaders import SeededDraws, extraction_loader

    world, rank = env.world_size, env.rank

    gt = train_ss.labels()
    labelled = np.flatnonzero(gt >= 0)
    if len(labelled) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    draws = SeededDraws(train_ss, gt, train_tf, settings.seed, cycle=0)
    classifiers = {layer: LinearClassifier(dim, num_classes, settings, env.device) for layer, dim in dims.items()}
    order_gen = torch.Generator().manual_seed(settings.seed)
    train_correct, train_seen = dict.fromkeys(dims, 0), 0
    for epoch in range(settings.epochs):
        draws.epoch = epoch
        order = labelled[torch.randperm(len(labelled), generator=order_gen).numpy()]
        if world == 1:
            loader = DataLoader(draws, batch_size=settings.batch_size, sampler=list(enumerate(order.tolist())),
                                num_workers=workers, collate_fn=draws.collate)
        else:
            shares = [[(p, int(order[p])) for p in range(start, min(start + settings.batch_size, len(order)))
                       if p % world == rank] for start in range(0, len(order), settings.batch_size)]
            loader = DataLoader(draws, batch_sampler=shares, num_workers=workers, collate_fn=draws.collate)
        for batch in loader:
            if len(batch.labels) == 0 and world == 1:
                continue
            y = batch.labels.to(env.device)
            with torch.no_grad():
                feats = (features_fn(batch.images.to(env.device)) if len(y) else
                         {layer: torch.zeros(0, dim, device=env.device) for layer, dim in dims.items()})
            for layer, clf in classifiers.items():
                logits = clf.step(feats[layer], y, epoch) if world == 1 else clf.step_shared(feats[layer], y, epoch)
                if epoch == settings.epochs - 1 and logits is not None:
                    train_correct[layer] += int((logits.argmax(1) == y).sum())
            if epoch == settings.epochs - 1:
                train_seen += len(y)
    test_gt = test_ss.labels()
    outputs: dict[str, list] = {layer: [] for layer in dims}
    labels = []
    loader = extraction_loader(test_ss, test_tf, rank=rank, world_size=world, batch_size=batch_size,
                               num_workers=workers, device=env.device)
    with torch.no_grad():
        for indices, images in loader:
            y = torch.from_numpy(test_gt[indices.numpy()].astype(np.int64))
            feats = features_fn(images.to(env.device))
            for layer, clf in classifiers.items():
                logits = clf.linear(feats[layer])
                if crops > 1:
                    logits = logits.view(len(y), crops, -1).softmax(-1).mean(1)
                outputs[layer].append(logits[(y >= 0).to(logits.device)].cpu())
            labels.append(y[y >= 0])
    yt = torch.cat(labels)
    if world > 1:  # every rank's hits and counts, summed
        test_n = int(dist.all_reduce_sum([len(yt)])[0])
        if test_n == 0:
            raise DcscaleError("the probe needs labelled train and test samples")
        results = {}
        for layer in dims:
            logits = torch.cat(outputs[layer])
            hits = dist.all_reduce_sum([_hits(logits, yt, 1), _hits(logits, yt, 5), train_correct[layer],
                                        train_seen])
            results[layer] = {"top1": hits[0] / test_n, "top5": hits[1] / test_n,
                              "train_top1": hits[2] / max(hits[3], 1),
                              "dim": dims[layer], "train_n": int(len(labelled)), "test_n": test_n,
                              "num_classes": int(num_classes)}
        return results
    if len(yt) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    results = {}
    for layer in dims:
        logits = torch.cat(outputs[layer])
        results[layer] = {"top1": topk_accuracy(logits, yt, 1), "top5": topk_accuracy(logits, yt, 5),
                          "train_top1": train_correct[layer] / max(train_seen, 1), "dim": dims[layer],
                          "train_n": int(len(labelled)), "test_n": int(len(yt)), "num_classes": int(num_classes)}
    return results


# ---- features (extracted once, cached) -------------------------------------------------------------


def _cache_paths(cache_dir: Path, source_key: str, layer: str, shardset, variant: str,
                 rank: int = 0, world_size: int = 1):
    """One process caches a split's features in one file pair; W ranks, one pair per rank (its rows).
    Keyed by the shard set's content (shard_set_key), never by its path alone."""
    stem = f"{source_key}_{layer}_{shardset.root.name}-{shard_set_key(shardset)}_{variant}"
    if world_size > 1:
        stem += f"_rank{rank}of{world_size}"
    return cache_dir / f"{stem}.feats.npy", cache_dir / f"{stem}.labels.npy"


def shard_set_key(shardset) -> str:
    """Identifies a shard set's content, not its path: the manifest's bytes and every tar's size and
    modification time. A shard set rebuilt at the same path (new tars, or the same names over other
    images) gets a new key, so cached features are never another set's."""
    from dcscale.data.manifest import manifest_path

    h = hashlib.sha256(manifest_path(shardset.root).read_bytes())
    for info in shardset.manifest.shards:
        st = (shardset.root / info.name).stat()
        h.update(f"|{info.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    return h.hexdigest()[:12]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_key(kind: str, checkpoint: Path | None, cfg: Config | None, seed: int | None, image_size: int) -> str:
    """Identifies the network the features come from: the checkpoint's content (a file replaced at the same
    path, even with the same size and time, is another network), or the init, with the input options."""
    if kind == "checkpoint":
        text = file_digest(checkpoint)
    elif kind == "random":
        text = f"{cfg.model}|{seed}"
    else:
        text = "pixels"
    data = f"{cfg.data.resize if cfg else None}|{cfg.data.mean if cfg else None}|{cfg.data.std if cfg else None}"
    digest = hashlib.sha1(f"{text}|{data}|{image_size}".encode()).hexdigest()[:10]
    return f"{kind}-{digest}"


def layer_features(fn, shardset, transform, env, batch_size: int, workers: int,
                   cache: tuple[Path, Path] | None):
    """(feats, labels) of this rank's slice (the whole split in one process), from the cache when every
    rank finds its own there. Nothing is gathered: under torchrun no rank holds the split's N x D."""
    from dcscale import dist

    hit = cache is not None and cache[0].is_file() and cache[1].is_file()
    if not dist.any_rank(not hit):
        return np.load(cache[0]), np.load(cache[1])
    feats, labels = ft.labelled_rows(fn, shardset, transform, env, batch_size, workers)
    if cache is not None:  # every rank its own pair (one process: the whole split)
        try:
            cache[0].parent.mkdir(parents=True, exist_ok=True)
            for path, array in zip(cache, (feats, labels)):
                atomic_write(path, lambda f, a=array: np.save(f, a))
        except OSError as err:  # the cache only saves time: the probe goes on with the features in hand
            logging.getLogger("dcscale").warning("%s; these features are not cached", output_error(
                "--cache-dir", cache[0].parent, err))
    return feats, labels


# ---- `dcscale probe` ----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    src = parser.add_argument_group("network (one of)")
    src.add_argument("--checkpoint", help="a dcscale checkpoint (.pt with model, config, image_shape)")
    src.add_argument("--random-init", action="store_true", help="an untrained network of --config")
    parser.add_argument("--config", help="YAML config (with --random-init; else its eval.probe_* defaults)")
    parser.add_argument("--train", required=True, help="labelled train shard set")
    parser.add_argument("--test", required=True, help="labelled test shard set")
    parser.add_argument("--protocol", default="fast", metavar="|".join(PROTOCOLS),
                        help="fast (default, ours: cached pooled features, standardised, cosine schedule, the "
                             "config's eval.probe_*); deepdive (the Deep Dive authors' linear_probe.py: one trunk "
                             "module unpooled, 20 epochs); deepcluster (facebookresearch/deepcluster "
                             "eval_linear.py: ReLU outputs pooled to ~9,600, crop + flip every batch, 90 epochs)")
    parser.add_argument("--layer",
                        help="probe layer(s): a name (relu5, conv2, ...), comma-separated names, 'all' "
                             "(every probe layer), 'features' (the clustered output) or 'pixels' (no network). "
                             "Required for fast; deepdive: a module of the conv trunk (conv2 = before batch "
                             "norm), default relu5 or else conv2; deepcluster: default every reluN")
    parser.add_argument("--json", help="write the results here (the feature cache goes next to it)")
    parser.add_argument("--cache-dir", help="feature cache directory (default: next to --json; none without)")
    parser.add_argument("--pool-dim", type=int, help="fast: average-pool conv maps to about this many values")
    parser.add_argument("--hflip", action="store_true",
                        help="deepdive: flip training images at random, as the authors' FMNIST jobs")
    parser.add_argument("--ten-crop", action="store_true", help="deepcluster: test on ten crops (softmax averaged)")
    over = parser.add_argument_group("classifier settings (default: the protocol's; fast: the config's eval.probe_*)")
    over.add_argument("--epochs", type=int)
    over.add_argument("--lr", type=float)
    over.add_argument("--momentum", type=float)
    over.add_argument("--weight-decay", type=float)
    over.add_argument("--batch-size", type=int)
    over.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--seed", type=int, help="random-init network and classifier seed (default: config seed)")
    parser.add_argument("--extract-batch-size", type=int, help="images per forward pass (default: config)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: config data.workers)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")


def protocol_settings(protocol: str, cfg: Config | None) -> ProbeSettings:
    """The classifier settings a protocol names (fast: the config's eval.probe_*, cosine, standardised)."""
    if protocol != "fast":
        return REFERENCE_SETTINGS[protocol]
    ev = cfg.eval if cfg is not None else EvalConfig()
    return ProbeSettings(epochs=ev.probe_epochs, lr=ev.probe_lr, weight_decay=ev.probe_weight_decay,
                         batch_size=ev.probe_batch_size)


def _settings(args, protocol: str, cfg: Config | None, seed: int) -> tuple[ProbeSettings, list[str]]:
    """The protocol's settings with the command line's overrides; also the names it overrode."""
    named = protocol_settings(protocol, cfg)
    given = {name: getattr(args, name) for name in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule")
             if getattr(args, name) is not None}
    s = replace(named, seed=seed, **given)
    for name in ("epochs", "batch_size"):
        if getattr(s, name) < 1:
            raise DcscaleError(f"--{name.replace('_', '-')} must be >= 1")
    if s.lr <= 0 or s.weight_decay < 0:
        raise DcscaleError("--lr must be > 0 and --weight-decay >= 0")
    return s, sorted(name for name, value in given.items() if getattr(named, name) != value)


def _check_options(args) -> None:
    """The command line alone, before anything is opened: one line for a value no probe can use."""
    if args.overrides and not args.config:
        raise DcscaleError(f"{args.overrides[0]}: key=value overrides need --config FILE (they change its values)")
    for flag, value, ok, expected in (
            ("--lr", args.lr, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
            ("--momentum", args.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("--weight-decay", args.weight_decay, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
            ("--epochs", args.epochs, lambda v: v >= 1, "an integer >= 1"),
            ("--batch-size", args.batch_size, lambda v: v >= 1, "an integer >= 1"),
            ("--extract-batch-size", args.extract_batch_size, lambda v: v >= 1, "an integer >= 1"),
            ("--pool-dim", args.pool_dim, lambda v: v >= 1, "an integer >= 1"),
            ("--workers", args.workers, lambda v: v >= 0, "an integer >= 0"),
            ("--seed", args.seed, lambda v: 0 <= v < 2**64, "an integer from 0 to 2**64 - 1")):
        if value is not None and not ok(value):  # (NaN fails every comparison)
            raise DcscaleError(f"{flag} {value}: expected {expected}")
    if args.protocol not in PROTOCOLS:
        raise DcscaleError(f"--protocol {args.protocol}: expected one of {', '.join(PROTOCOLS)}")
    if args.protocol == "fast" and args.layer is None:
        raise DcscaleError("--layer is required with --protocol fast (a name, 'all', 'features' or 'pixels')")
    for flag, value, protocol in (("--pool-dim", args.pool_dim is not None, "fast"), ("--hflip", args.hflip, "deepdive"),
                                  ("--ten-crop", args.ten_crop, "deepcluster")):
        if value and args.protocol != protocol:
            raise DcscaleError(f"{flag} applies to --protocol {protocol} only")


def _network(args, env, train_ss):
    """(model | None, cfg | None, kind, checkpoint path | None, seed, channels, image_size)."""
    if args.checkpoint and args.random_init:
        raise DcscaleError("give either --checkpoint or --random-init, not both")
    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.checkpoint:
        model, ckpt_cfg, shape = network.load_checkpoint_model(args.checkpoint, env.device)
        cfg = cfg or ckpt_cfg
        seed = args.seed if args.seed is not None else ckpt_cfg.seed
        channels, size = shape[0], shape[1]
        network.check_channels(train_ss, channels, "the checkpoint's network")
        return model, cfg, "checkpoint", Path(args.checkpoint), seed, channels, size
    if args.random_init:
        if cfg is None:
            raise DcscaleError("--random-init needs --config FILE (the network to initialise)")
        seed = args.seed if args.seed is not None else cfg.seed
        channels, size = network.input_shape(cfg, train_ss)
        model = network.random_init_model(cfg, channels, size, seed, env.device)
        return model, cfg, "random", None, seed, channels, size
    seed = args.seed if args.seed is not None else (cfg.seed if cfg else 0)
    channels, size = network.input_shape(cfg, train_ss)
    return None, cfg, "pixels", None, seed, channels, size


@dataclass
class _Plan:
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


def _plan(args, model, cfg: Config | None, channels: int, size: int) -> _Plan:
    from dcscale.data.transforms import eval_transform

    eval_tf = network.eval_transform_for(cfg, channels, size)
    mean, std = (cfg.data.mean, cfg.data.std) if cfg else (None, None)
    if args.protocol == "fast":
        pool_dim = args.pool_dim if args.pool_dim is not None else (
            cfg.eval.probe_pool_dim if cfg else EvalConfig.probe_pool_dim)
        if pool_dim < 1:
            raise DcscaleError(f"--pool-dim {pool_dim}: expected an integer >= 1")
        return _Plan(ft.resolve_layers(args.layer, model), lambda layer: ft.layer_fn(model, layer, pool_dim), False,
                     eval_tf, eval_tf, pool_dim, f"adaptive average pooling of conv maps to about {pool_dim} values",
                     "none")
    if args.protocol == "deepdive":
        layers = deepdive_layers(args.layer, model)
        if args.hflip:
            train_tf = ProbeTrainTransform(size, channels, eval_tf.resize, size, mean, std)
            return _Plan(layers, deepdive_features(model, layers), True, train_tf, eval_tf, None,
                         "none (the trunk module's whole output)", repr(train_tf))
        # Without augmentation every epoch sees the same features: extracting them once is the same.
        return _Plan(layers, lambda layer: (lambda x: deepdive_features(model, [layer])(x)[layer]), False,
                     eval_tf, eval_tf, None, "none (the trunk module's whole output)", "none (the extraction transform)")
    # deepcluster: eval_linear.py resizes to 256 for 224 crops; without data.resize, the same ratio.
    resize = (cfg.data.resize if cfg and cfg.data.resize else None) or round(size * 256 / 224)
    if resize < size:
        raise DcscaleError(f"--protocol deepcluster: data.resize {resize} is smaller than the input side {size}")
    layers = deepcluster_layers(args.layer, model)
    train_tf = ProbeTrainTransform(size, channels, resize, resize, mean, std)
    test_tf = (TenCropTransform(size, channels, resize, mean, std) if args.ten_crop
               else eval_transform(size, channels, resize=resize, mean=mean, std=std))
    return _Plan(layers, deepcluster_features(model, layers), True, train_tf, test_tf, DEEPCLUSTER_POOL_DIM,
                 "eval_linear.py's AvgPool2d table on AlexNet's 224x224 maps, else adaptive average pooling "
                 f"to about {DEEPCLUSTER_POOL_DIM} values", repr(train_tf), crops=10 if args.ten_crop else 1)


def _print_layer(layer: str, res: dict) -> None:
    times = f", {res['extract_s']:.1f}+{res['train_s']:.1f} s" if "train_s" in res else ""
    print(f"probe {layer}: top1 {100 * res['top1']:.2f} top5 {100 * res['top5']:.2f} "
          f"(dim {res['dim']}, {res['train_n']} train / {res['test_n']} test, "
          f"train top1 {100 * res['train_top1']:.2f}{times})", flush=True)


def run(args) -> int:
    from dcscale import dist
    from dcscale.data.shardset import ShardSet

    _check_options(args)
    if args.json:
        output_file(args.json, "--json")
    if args.cache_dir:
        output_dir(args.cache_dir, "--cache-dir")
    env = dist.init_distributed()
    try:
        train_ss, test_ss = ShardSet(args.train), ShardSet(args.test)
        for ss in (train_ss, test_ss):
            if not ss.manifest.has_labels:
                raise DcscaleError(f"{ss.root}: the probe needs a labelled shard set (no labels in its manifest)")
        model, cfg, kind, ckpt, seed, channels, size = _network(args, env, train_ss)
        settings, overridden = _settings(args, args.protocol, cfg, seed)
        plan = _plan(args, model, cfg, channels, size)
        batch_size = args.extract_batch_size or (cfg.data.extract_batch_size if cfg else 256)
        workers = args.workers if args.workers is not None else (cfg.data.workers if cfg else 2)
        num_classes = max(m.num_classes or 0 for m in (train_ss.manifest, test_ss.manifest)) or None

        t_start = time.perf_counter()
        results: dict[str, dict] = {}
        if plan.online:
            with torch.no_grad():
                dims = {layer: int(f.shape[1]) for layer, f in
                        plan.features_fn(torch.zeros(1, channels, size, size, device=env.device)).items()}
            gt_max = max(int(ss.labels().max()) for ss in (train_ss, test_ss))
            results = train_probe_online(plan.features_fn, dims, train_ss, test_ss, plan.train_tf, plan.test_tf,
                                         settings, num_classes or gt_max + 1, env, batch_size, workers, plan.crops)
            for layer, res in results.items():
                if env.is_main:
                    _print_layer(layer, res)
        else:
            cache_dir = Path(args.cache_dir) if args.cache_dir else (
                Path(args.json).with_name(Path(args.json).stem + "_cache") if args.json else None)
            key = source_key(kind, ckpt, cfg, seed, size)
            variant = f"pool{plan.pool_dim}" if args.protocol == "fast" else args.protocol
            for layer in plan.layers:
                t0 = time.perf_counter()
                fn = plan.features_fn(layer)
                splits = []
                for ss in (train_ss, test_ss):
                    cache = (_cache_paths(cache_dir, key, layer, ss, variant, env.rank, env.world_size)
                             if cache_dir else None)
                    splits.append(layer_features(fn, ss, plan.test_tf, env, batch_size, workers, cache))
                (tr_x, tr_y), (te_x, te_y) = splits
                t1 = time.perf_counter()
                res = train_linear_probe(tr_x, tr_y, te_x, te_y, settings, num_classes)
                res.update(extract_s=round(t1 - t0, 3), train_s=round(time.perf_counter() - t1, 3))
                results[layer] = res
                if env.is_main:
                    _print_layer(layer, res)

        if env.is_main:
            report = {
                "protocol": args.protocol,
                "source": kind,
                "checkpoint": str(ckpt) if ckpt else None,
                "arch": cfg.model.arch if (cfg and model is not None) else None,
                "seed": seed,
                "train": str(train_ss.root),
                "test": str(test_ss.root),
                "pool_dim": plan.pool_dim,
                "pooling": plan.pooling,
                "augmentation": plan.augmentation,
                "test_transform": repr(plan.test_tf),
                "settings": asdict(settings),
                "overridden": overridden,  # settings the command line changed from the protocol's
                "time_s": round(time.perf_counter() - t_start, 3),
                "layers": results,
            }
            if args.json:
                path = Path(args.json)
                with writing("--json", path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(report, indent=1) + "\n")
            best = max(results, key=lambda n: results[n]["top1"])
            print(f"probe: {len(results)} layer(s) of {kind}, protocol {args.protocol}; best {best} top1 "
                  f"{100 * results[best]['top1']:.2f}" + (f"; wrote {args.json}" if args.json else ""))
        return 0
    finally:
        dist.shutdown()
