"""`dcscale probe`: linear-probe evaluation of a frozen network's layers.

For each requested layer: extract the layer's activations for the labelled train and test shard
sets once (sharded over ranks under torchrun, gathered on rank 0, cached as .npy), average-pool
them to about `pool_dim` values, standardise with the train statistics, and train a multinomial
logistic regression (nn.Linear + SGD with momentum) on the train features. Reports top-1/top-5 on
the test set, one line per layer, and writes a JSON file.

    dcscale probe --checkpoint runs/x/checkpoints/last.pt --train data/t --test data/v --layer all
    dcscale probe --random-init --config configs/digits_demo.yaml --train ... --test ... --layer relu2
    dcscale probe --train ... --test ... --layer pixels        # raw-pixel baseline, no network
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcscale.config import Config, EvalConfig, load_config
from dcscale.errors import DcscaleError
from dcscale.eval import features as ft

# ---- the classifier ------------------------------------------------------------------------------


@dataclass
class ProbeSettings:
    epochs: int = EvalConfig.probe_epochs
    lr: float = EvalConfig.probe_lr
    momentum: float = 0.9
    weight_decay: float = EvalConfig.probe_weight_decay
    batch_size: int = EvalConfig.probe_batch_size
    schedule: str = "cosine"  # cosine | step (x0.1 at 50% and 75% of the epochs) | constant
    seed: int = 0


def _lr_at(settings: ProbeSettings, epoch: int) -> float:
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
    if settings.schedule == "step":
        return settings.lr * 0.1 ** sum(epoch >= settings.epochs * f for f in (0.5, 0.75))
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


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       settings: ProbeSettings, num_classes: int | None = None) -> dict:
    """Multinomial logistic regression on standardised features; returns top-1/top-5 on both sets."""
    if len(train_y) == 0 or len(test_y) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    x, xt = standardise(train_x, test_x)
    y, yt = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(test_y.astype(np.int64))
    gen = torch.Generator().manual_seed(settings.seed)
    clf = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.normal_(0.0, 0.01, generator=gen)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(settings.epochs):
        for group in opt.param_groups:
            group["lr"] = _lr_at(settings, epoch)
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = loss_fn(clf(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_logits, test_logits = clf(x), clf(xt)
    return {
        "top1": topk_accuracy(test_logits, yt, 1),
        "top5": topk_accuracy(test_logits, yt, 5),
        "train_top1": topk_accuracy(train_logits, y, 1),
        "dim": int(x.shape[1]),
        "train_n": int(len(y)),
        "test_n": int(len(yt)),
        "num_classes": int(num_classes),
    }


# ---- features (extracted once, cached) -------------------------------------------------------------


def _cache_paths(cache_dir: Path, source_key: str, layer: str, split_root: Path, pool_dim: int):
    split_key = hashlib.sha1(str(split_root.resolve()).encode()).hexdigest()[:8]
    stem = f"{source_key}_{layer}_{split_root.name}-{split_key}_pool{pool_dim}"
    return cache_dir / f"{stem}.feats.npy", cache_dir / f"{stem}.labels.npy"


def source_key(kind: str, checkpoint: Path | None, cfg: Config | None, seed: int | None, image_size: int) -> str:
    """Identifies the network the features come from: checkpoint file (path, size, mtime) or init."""
    if kind == "checkpoint":
        st = checkpoint.stat()
        text = f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    elif kind == "random":
        text = f"{cfg.model}|{seed}"
    else:
        text = "pixels"
    data = f"{cfg.data.resize if cfg else None}|{cfg.data.mean if cfg else None}|{cfg.data.std if cfg else None}"
    digest = hashlib.sha1(f"{text}|{data}|{image_size}".encode()).hexdigest()[:10]
    return f"{kind}-{digest}"


def layer_features(fn, shardset, transform, env, batch_size: int, workers: int,
                   cache: tuple[Path, Path] | None):
    """(feats, labels) on rank 0 (None elsewhere), from the cache when present."""
    from dcscale import dist

    hit = False
    if cache is not None and env.is_main:
        hit = cache[0].is_file() and cache[1].is_file()
    hit = dist.broadcast_object(hit)
    if hit:
        if not env.is_main:
            return None, None
        return np.load(cache[0]), np.load(cache[1])
    feats, labels = ft.extract_labelled(fn, shardset, transform, env, batch_size, workers)
    if cache is not None and env.is_main:
        cache[0].parent.mkdir(parents=True, exist_ok=True)
        for path, array in zip(cache, (feats, labels)):
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, array)
            tmp.replace(path)
    return feats, labels


# ---- `dcscale probe` ----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    src = parser.add_argument_group("network (one of)")
    src.add_argument("--checkpoint", help="a dcscale checkpoint (.pt with model, config, image_shape)")
    src.add_argument("--random-init", action="store_true", help="an untrained network of --config")
    parser.add_argument("--config", help="YAML config (with --random-init; else its eval.probe_* defaults)")
    parser.add_argument("--train", required=True, help="labelled train shard set")
    parser.add_argument("--test", required=True, help="labelled test shard set")
    parser.add_argument("--layer", required=True,
                        help="probe layer(s): a name (relu5, conv2, ...), comma-separated names, 'all' "
                             "(every probe layer), 'features' (the clustered output) or 'pixels' (no network)")
    parser.add_argument("--json", help="write the results here (the feature cache goes next to it)")
    parser.add_argument("--cache-dir", help="feature cache directory (default: next to --json; none without)")
    parser.add_argument("--pool-dim", type=int, help="average-pool conv maps to about this many values")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    parser.add_argument("--seed", type=int, help="random-init network and classifier seed (default: config seed)")
    parser.add_argument("--extract-batch-size", type=int, help="images per forward pass (default: config)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: config data.workers)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")


def _settings(args, cfg: Config | None, seed: int) -> ProbeSettings:
    ev = cfg.eval if cfg is not None else EvalConfig()
    s = ProbeSettings(
        epochs=args.epochs if args.epochs is not None else ev.probe_epochs,
        lr=args.lr if args.lr is not None else ev.probe_lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay if args.weight_decay is not None else ev.probe_weight_decay,
        batch_size=args.batch_size if args.batch_size is not None else ev.probe_batch_size,
        schedule=args.schedule,
        seed=seed,
    )
    for name in ("epochs", "batch_size"):
        if getattr(s, name) < 1:
            raise DcscaleError(f"--{name.replace('_', '-')} must be >= 1")
    if s.lr <= 0 or s.weight_decay < 0:
        raise DcscaleError("--lr must be > 0 and --weight-decay >= 0")
    return s


def _network(args, env, train_ss):
    """(model | None, cfg | None, kind, checkpoint path | None, seed, channels, image_size)."""
    if args.checkpoint and args.random_init:
        raise DcscaleError("give either --checkpoint or --random-init, not both")
    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.checkpoint:
        model, ckpt_cfg, shape = ft.load_checkpoint_model(args.checkpoint, env.device)
        cfg = cfg or ckpt_cfg
        seed = args.seed if args.seed is not None else ckpt_cfg.seed
        channels, size = shape[0], shape[1]
        if train_ss.channels is not None and train_ss.channels != channels:
            raise DcscaleError(f"{args.train}: {train_ss.channels}-channel images, but the checkpoint's "
                               f"network takes {channels}")
        return model, cfg, "checkpoint", Path(args.checkpoint), seed, channels, size
    if args.random_init:
        if cfg is None:
            raise DcscaleError("--random-init needs --config FILE (the network to initialise)")
        seed = args.seed if args.seed is not None else cfg.seed
        channels, size = ft.input_shape(cfg, train_ss)
        model = ft.random_init_model(cfg, channels, size, seed, env.device)
        return model, cfg, "random", None, seed, channels, size
    seed = args.seed if args.seed is not None else (cfg.seed if cfg else 0)
    channels, size = ft.input_shape(cfg, train_ss)
    return None, cfg, "pixels", None, seed, channels, size


def run(args) -> int:
    from dcscale import dist
    from dcscale.data.shardset import ShardSet

    env = dist.init_distributed()
    try:
        train_ss, test_ss = ShardSet(args.train), ShardSet(args.test)
        for ss in (train_ss, test_ss):
            if not ss.manifest.has_labels:
                raise DcscaleError(f"{ss.root}: the probe needs a labelled shard set (no labels in its manifest)")
        model, cfg, kind, ckpt, seed, channels, size = _network(args, env, train_ss)
        layers = ft.resolve_layers(args.layer, model)
        settings = _settings(args, cfg, seed)
        pool_dim = args.pool_dim if args.pool_dim is not None else (
            cfg.eval.probe_pool_dim if cfg else EvalConfig.probe_pool_dim)
        if pool_dim < 1:
            raise DcscaleError(f"--pool-dim {pool_dim}: expected an integer >= 1")
        transform = ft.eval_transform_for(cfg, channels, size)
        batch_size = args.extract_batch_size or (cfg.data.extract_batch_size if cfg else 256)
        workers = args.workers if args.workers is not None else (cfg.data.workers if cfg else 2)
        cache_dir = Path(args.cache_dir) if args.cache_dir else (
            Path(args.json).with_name(Path(args.json).stem + "_cache") if args.json else None)
        key = source_key(kind, ckpt, cfg if kind == "random" else cfg, seed, size)
        num_classes = max(m.num_classes or 0 for m in (train_ss.manifest, test_ss.manifest)) or None

        results: dict[str, dict] = {}
        for layer in layers:
            t0 = time.perf_counter()
            fn = ft.layer_fn(model, layer, pool_dim)
            splits = []
            for ss in (train_ss, test_ss):
                cache = _cache_paths(cache_dir, key, layer, ss.root, pool_dim) if cache_dir else None
                splits.append(layer_features(fn, ss, transform, env, batch_size, workers, cache))
            if not env.is_main:
                continue
            (tr_x, tr_y), (te_x, te_y) = splits
            t1 = time.perf_counter()
            res = train_linear_probe(tr_x, tr_y, te_x, te_y, settings, num_classes)
            res.update(extract_s=round(t1 - t0, 3), train_s=round(time.perf_counter() - t1, 3))
            results[layer] = res
            print(f"probe {layer}: top1 {100 * res['top1']:.2f} top5 {100 * res['top5']:.2f} "
                  f"(dim {res['dim']}, {res['train_n']} train / {res['test_n']} test, "
                  f"train top1 {100 * res['train_top1']:.2f}, {t1 - t0:.1f}+{res['train_s']:.1f} s)", flush=True)

        if env.is_main:
            report = {
                "source": kind,
                "checkpoint": str(ckpt) if ckpt else None,
                "arch": cfg.model.arch if (cfg and model is not None) else None,
                "seed": seed,
                "train": str(train_ss.root),
                "test": str(test_ss.root),
                "pool_dim": pool_dim,
                "settings": asdict(settings),
                "layers": results,
            }
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(report, indent=1) + "\n")
            best = max(results, key=lambda n: results[n]["top1"])
            print(f"probe: {len(results)} layer(s) of {kind}; best {best} top1 "
                  f"{100 * results[best]['top1']:.2f}" + (f"; wrote {args.json}" if args.json else ""))
        return 0
    finally:
        dist.shutdown()
