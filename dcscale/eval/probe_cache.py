"""The fast probe's feature cache: each layer's features of a split extracted once and kept as .npy
pairs (one per rank under torchrun), keyed by content: the network's (a checkpoint's digest, or its
init) and the shard set's (manifest and tars), never by a path alone.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from dcscale.config import Config
from dcscale.eval import features as ft
from dcscale.outputs import output_error
from dcscale.safefile import atomic_write



def cache_paths(cache_dir: Path, source_key: str, layer: str, shardset, variant: str,
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
