"""Image transforms for extraction (deterministic) and training (augmented).

Every pipeline first forces the image mode ('L' for one channel, 'RGB' for three) so shard sets
that mix modes (palette PNGs, grey JPEGs among colour ones) give tensors of one shape.
"""

from __future__ import annotations

from torchvision import transforms as T

from dcscale.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("imagenet", "small", "none")


class ToMode:
    """PIL image -> the given mode (a class, not a lambda, so it pickles into spawned workers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def _mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ConfigError(f"images must have 1 or 3 channels, got {channels}")
    return "L" if channels == 1 else "RGB"


def _normalize(channels: int, mean, std) -> T.Normalize:
    mean = tuple(mean) if mean is not None else ((0.5,) if channels == 1 else IMAGENET_MEAN)
    std = tuple(std) if std is not None else ((0.5,) if channels == 1 else IMAGENET_STD)
    for name, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != channels:
            raise ConfigError(f"{name} has {len(values)} values but the images have {channels} channel(s)")
    return T.Normalize(mean, std)


def eval_transform(image_size: int, channels: int, resize: int | None = None, mean=None, std=None):
    """Resize the shorter side to `resize` (default image_size), centre crop, tensor, normalise."""
    return T.Compose([
        ToMode(_mode(channels)),
        T.Resize(resize or image_size),
        T.CenterCrop(image_size),
        T.ToTensor(),
        _normalize(channels, mean, std),
    ])


def train_transform(image_size: int, channels: int, augment: str = "imagenet", crop_scale_min: float = 0.08,
                    hflip: bool = True, mean=None, std=None):
    """'imagenet': RandomResizedCrop + flip (the original DeepCluster); 'small': pad-and-crop + flip
    (the usual 32x32 recipe, padding an eighth of the side); 'none': the eval pipeline."""
    if augment not in AUGMENTS:
        raise ConfigError(f"train.augment = {augment!r}: expected one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return eval_transform(image_size, channels, mean=mean, std=std)
    steps = [ToMode(_mode(channels))]
    if augment == "imagenet":
        steps.append(T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0)))
    else:
        steps += [T.Resize(image_size), T.CenterCrop(image_size),
                  T.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect")]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), _normalize(channels, mean, std)]
    return T.Compose(steps)
