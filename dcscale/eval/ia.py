"""`dcscale ia`: Initial Alignment (IA) distributions over one hyperparameter (Deep Dive, section 4.3).

IA is the NMI between the ground-truth labels and the pseudo-labels of cycle 0: a randomly
initialised network, feature extraction, PCA + whitening + L2, k-means, assignment. `ia` uses the
arithmetic normalisation (scikit-learn's default, the Deep Dive's); every sample also carries
`ia_geometric` (the original DeepCluster's NMI) and ia.json a `summary_geometric`. The paper shows
that the value of a hyperparameter with the highest IA tends to give the best final accuracy, and
that among random initialisations a higher IA gives a higher final accuracy.

    dcscale ia --config configs/digits_demo.yaml --vary cluster.k=10,50,100 --seeds 20 --out runs/ia_k

For every value and every seed s (network init seed = config seed + s) one cycle-0 clustering runs,
with extraction sharded over ranks under torchrun. A value that changes neither the network nor the
data (cluster.*) reuses the seed's features. Output in DIR: ia.json (every sample, each value's
median and interquartile range, the recommendation), ia_boxplot.png, tb/ (TensorBoard histograms),
and with --select-seed best_init.pt (the best initialisation of the recommended value).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from dcscale.config import Config, config_to_dict, format_value, load_config, parse_value_list
from dcscale.errors import ConfigError, DataError
from dcscale.cycle import network
from dcscale.outputs import output_dir, writing
from dcscale.cycle.clustering import check_clusterable, cluster_rows_to_labels, degenerate_settings

VARY_EXAMPLES = "cluster.k=10,50,100,500, cluster.pca_dim=..., model.arch=..., model.sobel=..."


def parse_vary(spec: str) -> tuple[str, list]:
    """'cluster.k=10,50' -> ('cluster.k', [10, 50]); values parsed as YAML (null, true, 0.5)."""
    return parse_value_list(spec, "--vary", VARY_EXAMPLES)


def summarise(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def summarise_by_value(samples: list[dict], values: list, field: str) -> dict[str, dict]:
    """{formatted value: summarise(that value's samples' `field`)}."""
    return {format_value(v): summarise([s[field] for s in samples if format_value(s["value"]) == format_value(v)])
            for v in values}


def recommend(summary: dict[str, dict]) -> str:
    """The value (as formatted) with the highest median IA; ties go to the higher q1, then the first."""
    return max(summary, key=lambda v: (summary[v]["median"], summary[v]["q1"]))


def _feature_key(cfg: Config, seed: int) -> str:
    """What a seed's features depend on: the network and the data, not the clustering."""
    return f"{cfg.model}|{cfg.data}|{seed}"


def sample_ia(base: Config, key: str, values: list, seeds: int, env, shards_of, log=print,
              keep_best: bool = False, labels_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Every (value, seed) sample's IA; with keep_best, the best init's weights per value.
    `shards_of(cfg)` is the labelled shard set of a config (its data.train: `--vary data.train=A,B`
    clusters B for B's samples).

    Returns (samples, best) where best[value] = {"ia", "seed", "state", "config", "image_shape"}.
    """
    from dcscale.cluster.kmeans import cycle_seed
    from dcscale.cluster.metrics import nmi_scores
    from dcscale.cycle.phases import extract_features

    samples: list[dict] = []
    best: dict[str, dict] = {}
    for s in range(seeds):
        cached_key, cached = None, None
        for value in values:
            cfg = _with(base, key, value, seed=base.seed + s)
            shardset = shards_of(cfg)
            gt, n_total = shardset.labels(), len(shardset)
            channels, size = network.input_shape(cfg, shardset)
            t0 = time.perf_counter()
            model = network.random_init_model(cfg, channels, size, cfg.seed, env.device)
            check_clusterable(cfg, model, shardset)
            if _feature_key(cfg, cfg.seed) != cached_key:
                transform = network.eval_transform_for(cfg, channels, size)
                indices, feats, _ = extract_features(model.features, shardset, transform, env,
                                                     cfg.data.extract_batch_size, cfg.data.workers,
                                                     cfg.cluster.feature_dtype, model.feature_dim)
                cached_key, cached = _feature_key(cfg, cfg.seed), (indices, feats)
            indices, feats = cached
            t1 = time.perf_counter()
            # PCA + whitening + L2, k-means, assignment, exactly as cycle 0 of training (collective)
            clustering = cluster_rows_to_labels(indices, feats, n_total, cfg.cluster, cycle_seed(cfg.seed, 0))
            labels, objective = clustering.labels, clustering.objective
            # IA with arithmetic NMI (the Deep Dive's); ia_geometric as the original DeepCluster's NMI
            scores = nmi_scores(gt, labels)
            ia = scores["arithmetic"]
            counts = np.bincount(labels[labels >= 0], minlength=cfg.cluster.k)
            sample = {"value": value, "seed": cfg.seed, "ia": ia, "ia_geometric": scores["geometric"],
                      "objective": objective,
                      "empty_clusters": int((counts == 0).sum()),
                      "t_extract": round(t1 - t0, 3), "t_cluster": round(time.perf_counter() - t1, 3)}
            samples.append(sample)
            log(f"ia {key}={format_value(value)} seed {cfg.seed}: IA {ia:.4f} "
                f"(empty {sample['empty_clusters']}, {sample['t_extract']:.1f}+{sample['t_cluster']:.1f} s)")
            if labels_dir is not None and env.is_main:
                with writing("--out", labels_dir.parent):
                    labels_dir.mkdir(parents=True, exist_ok=True)
                    np.save(labels_dir / labels_file_name(key, value, cfg.seed), labels)
            name = format_value(value)
            if keep_best and (name not in best or ia > best[name]["ia"]):
                best[name] = {"ia": ia, "seed": cfg.seed, "value": value, "config": config_to_dict(cfg),
                              "image_shape": [channels, size, size],
                              "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return samples, best


def labels_file_name(key: str, value, seed: int) -> str:
    """`KEY=VALUE_seedS.npy`; a value that is not a plain name (a path, for `--vary data.train=...`) has its
    other characters replaced and a short hash of it added, so it stays one distinct file inside the folder."""
    text = format_value(value)
    safe = re.sub(r"[^\w.+-]", "_", text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{key}={safe}_seed{seed}.npy"


def _with(base: Config, key: str, value, seed: int) -> Config:
    from dcscale.config import config_from_dict

    raw = config_to_dict(base)
    return config_from_dict(raw, [f"{key}={format_value(value)}", f"seed={seed}"], source="--vary")


# ---- outputs -------------------------------------------------------------------------------------

def write_boxplot(key: str, values: list, samples: list[dict], recommended: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [format_value(v) for v in values]
    data = [[s["ia"] for s in samples if format_value(s["value"]) == n] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4))
    ax.boxplot(data, showfliers=False)  # every sample is drawn below, outliers included
    ax.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, 1):  # the samples themselves, jittered
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=10, alpha=0.5, color="tab:blue", zorder=3)
    best = names.index(recommended)
    ax.get_xticklabels()[best].set_fontweight("bold")
    ax.set_xlabel(key)
    ax.set_ylabel("Initial Alignment (NMI with ground truth)")
    # two lines: one line is wider than the axes when there are only one or two values
    ax.set_title(f"IA over {len(data[0])} random inits\nhighest median: {key}={recommended}", fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tensorboard(key: str, values: list, samples: list[dict], out: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    for step, value in enumerate(values):
        ias = np.array([s["ia"] for s in samples if format_value(s["value"]) == format_value(value)])
        writer.add_histogram(f"ia/{key}={format_value(value)}", ias, 0)
        writer.add_histogram("ia/by_value", ias, step)  # one tag, step = index of the value
        writer.add_scalar("ia_median", float(np.median(ias)), step)
    writer.add_text("ia/values", ", ".join(f"{i}: {key}={format_value(v)}" for i, v in enumerate(values)))
    writer.close()


def save_best_init(best: dict, path: Path) -> None:
    """A checkpoint-format file: {'model', 'config', 'image_shape', 'ia', 'seed'} (no optimizer)."""
    from dcscale.cycle.checkpoint import write_checkpoint_file

    write_checkpoint_file({"model": best["state"], "config": best["config"], "image_shape": best["image_shape"],
                           "ia": best["ia"], "seed": best["seed"], "cycle": 0, "step": 0,
                           "k": best["config"]["cluster"]["k"]}, path)


# ---- `dcscale ia` ---------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (data.train must have labels)")
    parser.add_argument("--vary", required=True, metavar="KEY=V1,V2,...", help=f"e.g. {VARY_EXAMPLES}")
    parser.add_argument("--seeds", type=int, default=10, help="random initialisations per value")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--select-seed", action="store_true",
                        help="save the best initialisation of the recommended value as OUT/best_init.pt "
                             "and print the command that trains from it")
    parser.add_argument("--save-labels", action="store_true", help="also write every sample's pseudo-labels")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")


def run(args) -> int:
    from dcscale import dist
    from dcscale.data.shardset import ShardSet

    base = load_config(args.config, args.overrides)
    key, values = parse_vary(args.vary)
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    for value in values:  # every value must make a valid config before anything runs
        _with(base, key, value, base.seed)
    if base.data.train is None and key != "data.train":
        raise ConfigError(f"data.train is not set in {args.config}")
    env = dist.init_distributed(base.dist.backend, base.dist.timeout_min, base.cluster.wait_timeout_min,
                                base.dist.rendezvous_timeout_s)
    try:
        opened: dict[str, ShardSet] = {}

        def shards_of(cfg: Config) -> ShardSet:
            if cfg.data.train not in opened:
                shards = ShardSet(cfg.data.train)
                if not shards.manifest.has_labels:
                    raise DataError(f"{shards.root}: IA needs ground-truth labels and this shard set has none")
                opened[cfg.data.train] = shards
            return opened[cfg.data.train]

        for value in values:  # every value's shard set opens before anything runs
            cfg = _with(base, key, value, base.seed)
            if env.is_main:
                for warning in degenerate_settings(cfg, len(shards_of(cfg))):
                    logging.getLogger("dcscale").warning("%s=%s: %s", key, format_value(value), warning)
        shardset = shards_of(base if base.data.train is not None else _with(base, key, values[0], base.seed))
        out = output_dir(args.out, "--out") if env.is_main else Path(args.out)  # (before the sampling)
        log = print if env.is_main else (lambda *_: None)
        samples, best = sample_ia(base, key, values, args.seeds, env, shards_of, log=log,
                                  keep_best=args.select_seed,
                                  labels_dir=out / "labels" if args.save_labels else None)
        if not env.is_main:
            return 0
        summary = summarise_by_value(samples, values, "ia")
        chosen = recommend(summary)
        result = {"key": key, "values": values, "seeds": args.seeds, "config": str(args.config),
                  "overrides": list(args.overrides), "train": str(shardset.root), "n_images": len(shardset),
                  "world_size": env.world_size, "samples": samples, "summary": summary,
                  **({"train_by_value": {format_value(v): str(shards_of(_with(base, key, v, base.seed)).root)
                                         for v in values}} if key == "data.train" else {}),
                  "summary_geometric": summarise_by_value(samples, values, "ia_geometric"),
                  "recommendation": {"key": key, "value": next(v for v in values if format_value(v) == chosen),
                                     "median_ia": summary[chosen]["median"]}}
        with writing("--out", out):
            write_boxplot(key, values, samples, chosen, out / "ia_boxplot.png")
            write_tensorboard(key, values, samples, out)
        for name in summary:
            s = summary[name]
            print(f"ia {key}={name}: median {s['median']:.4f} IQR [{s['q1']:.4f}, {s['q3']:.4f}] (n={s['n']})")
        if args.select_seed:
            pick = best[chosen]
            with writing("--out", out):
                save_best_init(pick, out / "best_init.pt")
            result["best_init"] = {"path": str(out / "best_init.pt"), "seed": pick["seed"], "ia": pick["ia"],
                                   "value": pick["value"]}
            # a run directory of its own: the config's output.dir may hold another run (resume: auto
            # would continue that one)
            cmd = (f"dcscale train --config {args.config} {' '.join(args.overrides)} {key}={chosen} "
                   f"model.init={out / 'best_init.pt'} output.dir={out / 'train'}").replace("  ", " ")
            result["best_init"]["train_command"] = cmd
            print(f"ia: best init of {key}={chosen}: seed {pick['seed']} IA {pick['ia']:.4f}, saved "
                  f"{out / 'best_init.pt'}; train from it with:\n  {cmd}")
        with writing("--out", out):
            (out / "ia.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"ia: {len(samples)} samples; recommended {key}={chosen} (median IA "
              f"{summary[chosen]['median']:.4f}); wrote {out / 'ia.json'}, {out / 'ia_boxplot.png'}")
        return 0
    finally:
        dist.shutdown()
