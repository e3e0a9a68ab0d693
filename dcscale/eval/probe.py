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

Each protocol's numbers and the reference lines they come from are in REFERENCE_SETTINGS
(`probe_protocols`) and in docs/evaluation.md. Reports top-1/top-5 on the test set, one line per layer,
and a JSON file that records the protocol and every setting it ran with. A probe on extracted features
whose SGD did not settle (the Deep Dive's learning rate bounces on some networks) gets a one-line warning
that says so and what to try (`probe_classifier.unsettled_warning`).

    dcscale probe --checkpoint runs/x/checkpoints/last.pt --train data/t --test data/v --layer all
    dcscale probe --protocol deepdive --checkpoint runs/x/checkpoints/last.pt --train data/t --test data/v
    dcscale probe --random-init --config configs/digits_demo.yaml --train ... --test ... --layer relu2
    dcscale probe --train ... --test ... --layer pixels        # raw-pixel baseline, no network

This module is the command; the classifier and its training are in `probe_classifier`, the protocols'
settings, layers, features and images in `probe_protocols`, the fast protocol's feature cache in
`probe_cache`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dcscale.config import Config, load_config
from dcscale.cycle import network
from dcscale.errors import DcscaleError
from dcscale.eval.probe_cache import cache_paths, layer_features, source_key
from dcscale.eval.probe_classifier import (SCHEDULES, ProbeSettings, train_linear_probe, train_probe_online,
                                           unsettled_warning)
from dcscale.eval.probe_protocols import PROTOCOLS, plan_protocol, protocol_settings
from dcscale.outputs import output_dir, output_file, writing


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
        plan = plan_protocol(args, model, cfg, channels, size)
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
                    cache = (cache_paths(cache_dir, key, layer, ss, variant, env.rank, env.world_size)
                             if cache_dir else None)
                    splits.append(layer_features(fn, ss, plan.test_tf, env, batch_size, workers, cache))
                (tr_x, tr_y), (te_x, te_y) = splits
                t1 = time.perf_counter()
                res = train_linear_probe(tr_x, tr_y, te_x, te_y, settings, num_classes)
                res.update(extract_s=round(t1 - t0, 3), train_s=round(time.perf_counter() - t1, 3))
                results[layer] = res
                if env.is_main:
                    _print_layer(layer, res)
                    warning = unsettled_warning(layer, res, settings.lr)
                    if warning:
                        logging.getLogger("dcscale").warning("%s", warning)

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
