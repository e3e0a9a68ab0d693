"""Image transforms for extraction (deterministic) and training (augmented), on uint8 tensor batches.

The shard set decodes each image straight to a uint8 tensor with its channels forced to 1 or 3
(`ShardSet.read_uint8`); the transforms then work on whole batches with torch ops: resize the shorter
side (bilinear, antialiased, in float), centre crop, random crop / flip, scale to [0, 1] and
normalise. This replaces a chain of per-image PIL operations (~10x the cost) and lets extraction do
the float work on the model's device.

Both transforms are objects with three entry points, all computing the same numbers:
  - `decode(shardset, index)` (in DataLoader workers): uint8 [C, h, w] at the stored size, or None;
  - `collate(images)` (workers): one batch tensor; uint8 when the images share a size, else each
    image already resized and cropped (float);
  - `finish(batch, device)` (eval) / `augment(batch, uniforms)` (train): the float network input.
Calling one on a PIL image (`tf(image)`) runs the same code on a batch of one, as the old
torchvision pipelines were called.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dcscale.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("imagenet", "small", "none")
_MODE = {1: "L", 3: "RGB"}


class ToMode:
    """PIL image -> the given mode (a class, not a lambda, so it pickles into spawned workers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"images must have 1 or 3 channels, got {channels}")
    return channels


def _mean_std(channels: int, mean, std) -> tuple[tuple, tuple]:
    mean = tuple(mean) if mean is not None else ((0.5,) if channels == 1 else IMAGENET_MEAN)
    std = tuple(std) if std is not None else ((0.5,) if channels == 1 else IMAGENET_STD)
    for name, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != channels:
            raise ConfigError(f"{name} has {len(values)} values but the images have {channels} channel(s)")
    return mean, std


def pil_to_uint8(image, channels: int) -> torch.Tensor:
    """PIL image -> uint8 [channels, H, W] (mode forced as PIL's convert does)."""
    array = np.asarray(ToMode(_MODE[channels])(image))
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


# ---- geometry (float [B, C, h, w] in, float out) -----------------------------------------------

def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Shorter side -> size, aspect kept (torchvision's Resize(int) rule)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    new = resized_size(h, w, size)
    if new == (h, w):
        return x
    return F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop: zero padding when the image is smaller, then the rounded centre."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        left, top = max(size - w, 0) // 2, max(size - h, 0) // 2
        x = F.pad(x, (left, max(size - w + 1, 0) // 2, top, max(size - h + 1, 0) // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _stack_or_fit(images: list[torch.Tensor], fit) -> torch.Tensor:
    """Stack uint8 images that share a size (the geometry then runs on the batch); otherwise bring
    each to the common size on its own with `fit` (same ops, so the same numbers)."""
    if len({tuple(im.shape) for im in images}) == 1:
        return torch.stack(images)
    return torch.cat([fit(im[None].float()) for im in images])


class _Normalise:
    def __init__(self, channels: int, mean, std):
        mean, std = _mean_std(channels, mean, std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float pixels in [0, 255] -> (x / 255 - mean) / std, as ToTensor + Normalize."""
        x = x.div(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


# ---- extraction --------------------------------------------------------------------------------

class EvalTransform:
    """Resize the shorter side to `resize` (default image_size), centre crop, scale, normalise."""

    def __init__(self, image_size: int, channels: int, resize: int | None = None, mean=None, std=None):
        self.image_size = image_size
        self.channels = _check_channels(channels)
        self.resize = resize or image_size
        self.normalise = _Normalise(channels, mean, std)

    def __repr__(self) -> str:
        return (f"EvalTransform(image_size={self.image_size}, channels={self.channels}, resize={self.resize}, "
                f"mean={tuple(self.normalise.mean.flatten().tolist())}, std={tuple(self.normalise.std.flatten().tolist())})")

    def decode(self, shardset, index: int):
        """(uint8 [C, h, w] or None if undecodable, label)."""
        return shardset.read_uint8(index, self.channels)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        return center_crop(resize_shorter(x, self.resize), self.image_size)

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor:
        return _stack_or_fit(images, self.geometry)

    def finish(self, batch: torch.Tensor, device=None) -> torch.Tensor:
        """A collated batch -> float [B, C, S, S] network input, computed on `device`."""
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        x = batch.float()
        if batch.dtype == torch.uint8:  # still at the stored size
            x = self.geometry(x)
        return self.normalise(x).contiguous()

    def __call__(self, image) -> torch.Tensor:
        """One PIL image (or uint8 [C, H, W] tensor) -> float [C, S, S]."""
        if not isinstance(image, torch.Tensor):
            image = pil_to_uint8(image, self.channels)
        return self.finish(image[None])[0]


def eval_transform(image_size: int, channels: int, resize: int | None = None, mean=None, std=None) -> EvalTransform:
    """The one extraction transform (training run, k-NN monitor, probe and IA all use it)."""
    return EvalTransform(image_size, channels, resize, mean, std)


# ---- training ----------------------------------------------------------------------------------

_ATTEMPTS = 10  # RandomResizedCrop's tries at a box of the drawn scale and ratio
_MASK = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_uniforms(key: tuple[int, ...], positions, count: int) -> torch.Tensor:
    """float64 [len(positions), count] uniforms in [0, 1), a pure function of (key, position): the
    augmentation of a draw does not depend on which worker, batch or process computes it."""
    base = 0
    for part in key:  # fold the key into one 64-bit word
        base = int(_mix64(np.array([(base ^ (int(part) & _MASK)) * 0x9E3779B97F4A7C15 & _MASK], np.uint64))[0])
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)
    counter = pos * np.uint64(count) + np.arange(count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _mix64(_mix64(counter ^ np.uint64(base)) + np.uint64(0x9E3779B97F4A7C15))
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-padding source index (edge not repeated), as padding_mode='reflect'."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _box(u: torch.Tensor, h: int, w: int, scale_min: float) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (scale (scale_min, 1), ratio (3/4, 4/3)) on given uniforms."""
    area = h * w
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for a in range(_ATTEMPTS):
        target = area * (scale_min + (1 - scale_min) * float(u[2 * a]))
        ratio = math.exp(log_lo + (log_hi - log_lo) * float(u[2 * a + 1]))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(float(u[2 * _ATTEMPTS]) * (h - ch + 1)), h - ch)
            left = min(int(float(u[2 * _ATTEMPTS + 1]) * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    ratio = w / h  # fallback: the whole image, clamped to the ratio range, centred
    if ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class TrainTransform:
    """'imagenet': RandomResizedCrop + flip (the original DeepCluster); 'small': resize + centre crop,
    then a random crop of the reflect-padded image (an eighth of the side) + flip (the usual 32x32
    recipe); 'none': the eval pipeline. Random choices come from given uniforms (`n_uniforms` per
    image), so the caller decides how they are seeded. With `per_batch`, the whole batch takes the
    first image's choices (one crop box, one flip), as torchvision transforms applied to a batch
    tensor do: the Deep Dive's SVHN/CIFAR10 jobs augment that way on the GPU."""

    def __init__(self, image_size: int, channels: int, augment: str = "imagenet", crop_scale_min: float = 0.08,
                 hflip: bool = True, mean=None, std=None, per_batch: bool = False):
        if augment not in AUGMENTS:
            raise ConfigError(f"train.augment = {augment!r}: expected one of {', '.join(AUGMENTS)}")
        self.eval = EvalTransform(image_size, channels, mean=mean, std=std)
        self.image_size, self.channels = image_size, channels
        self.augment_name, self.crop_scale_min, self.hflip = augment, crop_scale_min, hflip
        self.per_batch = per_batch
        self.padding = max(1, image_size // 8)
        self.n_uniforms = 2 * _ATTEMPTS + 3  # crop tries, box position, flip

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, channels={self.channels}, augment={self.augment_name!r}, "
                f"crop_scale_min={self.crop_scale_min}, hflip={self.hflip}, per_batch={self.per_batch})")

    def decode(self, shardset, index: int):
        return shardset.read_uint8(index, self.channels)

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if self.augment_name == "imagenet":
            return images  # a different box per image: resized one by one in augment()
        return _stack_or_fit(images, self.eval.geometry)

    def augment(self, batch, uniforms: torch.Tensor) -> torch.Tensor:
        """A collated batch + uniforms [B, n_uniforms] -> float [B, C, S, S] network input."""
        if self.per_batch:
            uniforms = uniforms[:1].expand(len(uniforms), -1)
        if self.augment_name == "imagenet":
            x = torch.cat([self._resized_crop(im, u) for im, u in zip(batch, uniforms)])
        else:
            x = batch.float()
            if batch.dtype == torch.uint8:
                x = self.eval.geometry(x)
            if self.augment_name == "small":
                x = self._padded_crop(x, uniforms)
        if self.hflip and self.augment_name != "none":  # 'none' is exactly the eval pipeline
            flip = uniforms[:, -1] < 0.5
            if flip.any():
                x[flip] = x[flip].flip(-1)
        return self.eval.normalise(x).contiguous()

    def _resized_crop(self, image: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        top, left, h, w = _box(u, image.shape[-2], image.shape[-1], self.crop_scale_min)
        crop = image[None, :, top:top + h, left:left + w].float()
        size = (self.image_size, self.image_size)
        return crop if crop.shape[-2:] == size else F.interpolate(crop, size=size, mode="bilinear",
                                                                  antialias=True, align_corners=False)

    def _padded_crop(self, x: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """RandomCrop(S, padding=p, padding_mode='reflect') as one gather: crop offsets in [0, 2p]."""
        b, c, s, _ = x.shape
        p = self.padding
        offsets = (uniforms[:, -3:-1] * (2 * p + 1)).long().clamp_(max=2 * p) - p  # [B, 2]: dy, dx
        steps = torch.arange(s)
        rows = _reflect(offsets[:, :1] + steps, s)  # [B, S]
        cols = _reflect(offsets[:, 1:] + steps, s)
        flat = (rows[:, :, None] * s + cols[:, None, :]).view(b, 1, s * s).expand(b, c, s * s)
        return torch.gather(x.reshape(b, c, s * s), 2, flat).view(b, c, s, s)

    def __call__(self, image) -> torch.Tensor:
        """One PIL image (or uint8 tensor), random choices from torch's global RNG -> float [C, S, S]."""
        if not isinstance(image, torch.Tensor):
            image = pil_to_uint8(image, self.channels)
        uniforms = torch.rand(1, self.n_uniforms, dtype=torch.float64)
        return self.augment(self.collate([image]), uniforms)[0]


def train_transform(image_size: int, channels: int, augment: str = "imagenet", crop_scale_min: float = 0.08,
                    hflip: bool = True, mean=None, std=None, per_batch: bool = False) -> TrainTransform:
    return TrainTransform(image_size, channels, augment, crop_scale_min, hflip, mean, std, per_batch)
