"""The network and its file: a dcscale checkpoint (or `model.init` file) or a backbone export read back
as a model (`load_network`, `load_backbone`), a fresh network of a config, the input shape a shard set
gives it, and the one eval transform (resize, centre crop, normalise) that extraction uses everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dcscale.config import Config, config_from_dict
from dcscale.cycle.checkpoint import load_checkpoint, load_error
from dcscale.errors import DcscaleError


BACKBONE_FORMAT = "dcscale-backbone"


BACKBONE_VERSION = 1


@dataclass
class Network:
    """A network read from a dcscale file, on the CPU in eval mode."""

    model: "torch.nn.Module"  # a DeepClusterNet; its head is meaningful only when has_head
    cfg: Config
    image_shape: list[int]  # [C, H, W] of the network input
    position: dict  # the run's cycle / epoch / step when the file was written (None if unknown)
    has_head: bool  # False for a backbone export (its head is a fresh placeholder)


def load_network(path: str | Path) -> Network:
    """A dcscale training checkpoint (or `model.init` file) or a backbone export, as a Network."""
    path = Path(path)
    if not path.is_file():
        raise DcscaleError(f"checkpoint not found: {path}")
    saved = load_checkpoint(path)
    if saved.get("format") == BACKBONE_FORMAT:
        return _backbone_network(saved, path)
    if "model" not in saved and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise DcscaleError(f"{path}: a plain state_dict ({len(saved)} tensors such as '{next(iter(saved))}'), not "
                           f"a dcscale checkpoint or backbone export; a torchvision-format export loads with "
                           f"torchvision.models.<arch>(num_classes=K), not with dcscale")
    for key in ("model", "config", "image_shape"):
        if key not in saved:
            raise DcscaleError(f"{path}: not a dcscale checkpoint (no '{key}' entry)")
    cfg, shape = _config_and_shape(saved["config"], saved["image_shape"], path)
    model = _build(cfg, shape)
    state = saved["model"]
    if "head.weight" in state:  # the K-way head of the checkpoint's cycle (K may differ from cluster.k)
        model.reset_head(state["head.weight"].shape[0])
    _load_weights(model, state, path, cfg)
    position = {key: saved.get(key) for key in ("cycle", "epoch", "step")}
    return Network(model.eval(), cfg, shape, position, has_head=True)


def _config_and_shape(raw_cfg, raw_shape, path: Path) -> tuple[Config, list[int]]:
    cfg = config_from_dict(raw_cfg, source=str(path))
    c, h, w = [int(v) for v in raw_shape]
    return cfg, [c, h, w]


def _build(cfg: Config, shape: list[int]):
    """cfg's network on the meta device: its weights are about to be loaded, so it costs neither memory
    nor a random initialisation (seconds for vgg16_bn), and leaves torch's RNG alone."""
    from dcscale.models import build_model_from_config

    with torch.device("meta"):
        return build_model_from_config(cfg, in_channels=shape[0], image_size=shape[1])


def _load_weights(module, state: dict, path: Path, cfg: Config) -> None:
    """Strictly: every tensor of `module` (on the meta device) becomes one of `state`'s."""
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise DcscaleError(f"{path}: weights do not fit {cfg.model.arch} ({load_error(err)})") from None


def _backbone_network(saved: dict, path: Path) -> Network:
    if saved.get("version") != BACKBONE_VERSION:
        raise DcscaleError(f"{path}: backbone export version {saved.get('version')}; this dcscale reads "
                           f"version {BACKBONE_VERSION}")
    meta = saved["meta"]
    cfg, shape = _config_and_shape(meta["config"], meta["image_shape"], path)
    model = _build(cfg, shape)
    _load_weights(model.body, saved["body"], path, cfg)
    model.reset_head(cfg.cluster.k)  # a placeholder: a backbone has no head
    position = {key: meta.get(key) for key in ("cycle", "epoch", "step")}
    return Network(model.eval(), cfg, shape, position, has_head=False)


def eval_transform(net: Network):
    """The preprocessing the network was trained with (resize, centre crop, normalise)."""
    c, h, _ = net.image_shape
    return eval_transform_for(net.cfg, c, h)


def load_backbone(path: str | Path, device: str | torch.device = "cpu"):
    """(body, transform): the network without its head (image batch -> features), in eval mode on
    `device`, and its preprocessing (PIL image or uint8 [C, H, W] -> float [C, S, S])."""
    net = load_network(path)
    return net.model.body.to(device).eval(), eval_transform(net)


def load_checkpoint_model(path: str | Path, device: torch.device):
    """(model in eval mode on device, Config, image_shape [C,H,W]) from a dcscale checkpoint or a
    backbone export (`dcscale export --format backbone`; its head is a placeholder, unused for features)."""
    net = load_network(path)
    return net.model.to(device).eval(), net.cfg, net.image_shape


def check_channels(shardset, channels: int, what: str) -> None:
    """One line when a shard set's images have another channel count than the network takes (RGB
    images through a grey network would be silently turned grey, or the other way round)."""
    if shardset.channels is not None and shardset.channels != channels:
        raise DcscaleError(f"{shardset.root}: {shardset.channels}-channel images, but {what} takes {channels}")


def random_init_model(cfg: Config, in_channels: int, image_size: int, seed: int, device: torch.device):
    """A freshly initialised network of cfg.model, reproducible from `seed` (CPU RNG, then moved)."""
    from dcscale.models import build_model_from_config

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_model_from_config(cfg, in_channels=in_channels, image_size=image_size)
    finally:
        torch.random.set_rng_state(state)
    return model.to(device).eval()


def input_shape(cfg: Config | None, shardset) -> tuple[int, int]:
    """(channels, network input side) for a shard set under a config (data.image_size or the images')."""
    channels = shardset.channels
    size = cfg.data.image_size if cfg is not None and cfg.data.image_size else shardset.image_size
    if channels is None or size is None:
        raise DcscaleError(f"{shardset.root}: images differ in size; set data.image_size in the config")
    return int(channels), int(size)


def eval_transform_for(cfg: Config | None, channels: int, image_size: int):
    from dcscale.data.transforms import eval_transform

    if cfg is None:
        return eval_transform(image_size, channels)
    return eval_transform(image_size, channels, resize=cfg.data.resize, mean=cfg.data.mean, std=cfg.data.std)
