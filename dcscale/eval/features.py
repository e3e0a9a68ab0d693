"""Shared by the probe and IA tools: load or build a network, its eval transform, pooled layer features.

A probe layer's activation [B, C, H, W] is average-pooled to s x s with C*s*s close to `pool_dim`
(the original AlexNet protocol pools conv1..conv5 to about 9k dimensions: 96x10x10, 256x6x6,
384x5x5, ...), then flattened. Maps already small enough are kept as they are. Vector activations
([B, D]) are used as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dcscale.errors import DcscaleError

PIXELS = "pixels"  # pseudo-layer: the normalised input image itself (no network)
FEATURES = "features"  # pseudo-layer: what is clustered (the body's output)


def pool_size(channels: int, side: int, pool_dim: int) -> int:
    """Side s of the pooled map so that channels * s * s is about pool_dim (never above `side`)."""
    return max(1, min(side, int(round(math.sqrt(pool_dim / channels)))))


def pool_flatten(act: torch.Tensor, pool_dim: int) -> torch.Tensor:
    """[B, C, H, W] -> adaptive average pool to about pool_dim values -> [B, D]; [B, D] unchanged."""
    if act.dim() == 4:
        b, c, h, w = act.shape
        s = pool_size(c, min(h, w), pool_dim)
        if (h, w) != (s, s):
            act = F.adaptive_avg_pool2d(act, s)
    return act.reshape(act.shape[0], -1)


def layer_fn(model, layer: str, pool_dim: int):
    """batch -> [B, D] pooled features of one layer (or of the input, for 'pixels')."""
    if layer == PIXELS:
        return lambda x: pool_flatten(x, pool_dim)
    if layer == FEATURES:
        return model.features
    return lambda x: pool_flatten(model.layer_activations(x, [layer])[layer], pool_dim)


def resolve_layers(spec: str, model) -> list[str]:
    """'all' -> every probe layer of the model; 'a,b' -> [a, b] (checked against the model)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise DcscaleError("--layer: give a layer name, 'all' or 'pixels'")
    available = model.probe_layers() if model is not None else []
    out: list[str] = []
    for name in names:
        if name == "all":
            if model is None:
                raise DcscaleError("--layer all needs a network: give --checkpoint or --random-init --config")
            out += available
        elif name == PIXELS:
            out.append(name)
        elif model is None:
            raise DcscaleError(f"--layer {name} needs a network: give --checkpoint or --random-init --config")
        elif name != FEATURES and name not in available:
            raise DcscaleError(f"unknown layer '{name}' for {model.arch}; available: "
                               f"{', '.join(available + [FEATURES, PIXELS, 'all'])}")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def labelled_rows(fn, shardset, transform, env, batch_size: int, workers: int):
    """This rank's slice only: (features float32 [n_r, D], labels int64 [n_r]) in global-index order,
    unlabelled and undecodable samples dropped. Nothing is gathered: a rank holds its own rows."""
    from dcscale.cycle.phases import extract_features

    gt = shardset.labels()
    if gt is None:
        raise DcscaleError(f"{shardset.root}: the shard set has no labels")
    indices, feats, _ = extract_features(fn, shardset, transform, env, batch_size, workers, "float32")
    labels = gt[indices].astype(np.int64)
    keep = labels >= 0
    return np.ascontiguousarray(feats[keep], dtype=np.float32), labels[keep]
