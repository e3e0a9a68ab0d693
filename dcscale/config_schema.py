"""The configuration's schema: its sections and every key of each, declared once with `key(...)` (type
from the annotation; default, help, range check and resume policy in the field's metadata). Loading,
`key.sub=value` overrides and validation against it are in `dcscale.config`, which re-exports every
name here (`from dcscale.config import Config, ClusterConfig` keeps working); the reference page
docs/configuration.md is generated from it (tools/config_reference.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ARCHS = ("lenet5", "alexnet", "alexnet_micro", "alexnet_small", "vgg16_bn", "resnet50")

# Range checks: (predicate, what is allowed), applied after types are checked (floats are finite by
# then) and only to values that are not null.
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "a number in [0, 1)")
MAX_TIMEOUT_MIN = 525_600  # a year: far beyond any job, and well inside what timedelta and C++ timeouts hold
_MINUTES = (lambda v: 0 < v <= MAX_TIMEOUT_MIN, f"a number of minutes > 0 and at most {MAX_TIMEOUT_MIN} (a year)")
MIN_STD = 1e-3  # pixel values are in [0, 1]: a smaller std only blows inputs up towards inf
RESUME_POLICIES = ("fixed", "may change")


def key(default: Any, help: str, check: tuple[Any, str] | None = None, resume: str = "fixed") -> Any:
    """One config key, declared once: its default, its help (the reference page's text), its range check
    (predicate, what is allowed) and whether a resumed run may change it ("may change": it extends the
    run or only watches it, never what it computes). The type is the field's annotation."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume={resume!r}: expected one of {RESUME_POLICIES}")
    metadata = {"help": help, "check": check, "resume": resume}
    if isinstance(default, list):  # (a dataclass shares a plain default between instances: each gets a copy)
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(declaration: dataclasses.Field) -> Any:
    if declaration.default_factory is not dataclasses.MISSING:
        return declaration.default_factory()
    return declaration.default


@dataclass
class DataConfig:
    """The shard sets and how their images become network inputs."""

    train: str | None = key(None, "Training shard set (a directory with manifest.json).")
    test: str | None = key(None, "Labelled evaluation shard set, for the k-NN monitor and the probes.",
                           resume="may change")
    image_size: int | None = key(None, "Network input side; null: the shard set's image side.", _POSITIVE)
    resize: int | None = key(None, "Side the shorter image side is resized to before the centre crop at "
                             "extraction; null: image_size.", _POSITIVE)
    workers: int = key(2, "DataLoader workers per rank (extraction and training).", _NON_NEGATIVE,
                       resume="may change")
    extract_batch_size: int = key(256, "Images per forward pass at extraction, per rank.", _POSITIVE,
                                  resume="may change")
    mean: list[float] | None = key(None, "Per-channel normalisation mean (one value per image channel); null: "
                                   "0.5 for grey images, ImageNet's for colour.",
                                   (lambda v: all(0 <= m <= 1 for m in v), "numbers in [0, 1] (pixel values "
                                    "are in [0, 1])"))
    std: list[float] | None = key(None, "Per-channel normalisation std, as many values as data.mean; null: 0.5 "
                                  "for grey images, ImageNet's for colour.",
                                  (lambda v: all(s >= MIN_STD for s in v), f"numbers >= {MIN_STD:g} (pixel "
                                   "values are in [0, 1])"))


@dataclass
class ModelConfig:
    """The network."""

    arch: str = key("lenet5", "The network's architecture. alexnet: DeepCluster's; alexnet_micro: the Deep Dive's "
                    "32x32 AlexNet; alexnet_small: ours, the Deep Dive's filter counts on a wider 32x32 AlexNet.",
                    (lambda v: v in ARCHS, "one of " + ", ".join(ARCHS)))
    sobel: bool = key(False, "A fixed grayscale + Sobel front (2 channels, not trained).")
    batch_norm: bool = key(True, "Batch normalisation after each convolution.")
    init: str | None = key(None, "A .pt whose \"model\" weights start the body (e.g. from `dcscale ia "
                           "--select-seed`).")
    sync_bn: bool = key(False, "Batch-norm statistics over every rank's batch under DDP (SyncBatchNorm); GPUs "
                        "only, refused for CPU processes.")


@dataclass
class ClusterConfig:
    """PCA, k-means and the pseudo-labels."""

    k: int = key(10, "Number of clusters (K): the pseudo-label classes.", (lambda v: v >= 2, "an integer >= 2"))
    pca_dim: int | None = key(256, "PCA output width; null switches PCA off (rows are still L2-normalised).",
                              _POSITIVE)
    pca_sample: int | None = key(100_000, "Rows (over all ranks) the PCA is fitted on; null: all.",
                                 (lambda v: v >= 2, "an integer >= 2 (rows to fit the PCA on), or null for all"))
    niter: int = key(20, "k-means iterations.", _POSITIVE)
    max_points_per_centroid: int | None = key(None, "k-means trains on at most K x this many rows; null: no "
                                              "per-centroid cap (the original).", _POSITIVE)
    max_train_rows: int | None = key(2_000_000, "k-means trains on a seeded sample of at most this many rows "
                                     "(over all ranks; the smaller of this and K x max_points_per_centroid). "
                                     "Bounds rank 0's memory; 1.28M ImageNet stays exact. null: all.", _POSITIVE)
    halt_after: int | None = key(None, "Early clustering stop: from this cycle on, keep the labels and only "
                                 "train; null: cluster every cycle.",
                                 (lambda v: v >= 1, "an integer >= 1 (cycle 0 always clusters), or null"))
    reinit_head_after_halt: bool = key(True, "Re-initialise the head every cycle after the halt too (as the "
                                       "paper); false keeps it.")
    feature_dtype: Literal["float32", "float16"] = key("float32", "Precision the extracted features are held "
                                                       "in on their way to the PCA (float16 halves their memory).")
    kmeans: Literal["distributed", "rank0"] = key(
        "distributed", "distributed: Lloyd's iterations on every rank's own rows, K x (d + 1) sums all-reduced "
        "(memory and time shrink with W); rank0: the training rows gathered to rank 0 and faiss's own k-means "
        "run there.")
    wait_timeout_min: float = key(180.0, "How long the other ranks wait for rank 0 (PCA fit; k-means with "
                                  "kmeans: rank0).", _MINUTES, resume="may change")
    labels: Literal["kmeans", "ground_truth"] = key(
        "kmeans", "kmeans: pseudo-labels (DeepCluster). ground_truth: the shard set's own classes, fixed from "
        "cycle 0 and never clustered: the supervised ceiling of a probe table (same network, schedule and "
        "sampler); K must equal the class count.")


@dataclass
class TrainConfig:
    """The training schedule, augmentation and precision."""

    cycles: int = key(10, "Cycles (cluster, then train) of the run; raise it to extend a finished run.",
                      _POSITIVE, resume="may change")
    epochs_per_cycle: int = key(1, "Training epochs over the pseudo-labels per cycle.", _POSITIVE)
    lr: float = key(0.05, "SGD learning rate.", _POSITIVE)
    momentum: float = key(0.9, "SGD momentum of the body.", _FRACTION)
    weight_decay: float = key(1e-5, "SGD weight decay.", _NON_NEGATIVE)
    batch_size: int = key(64, "Training batch size, per rank.", _POSITIVE)
    augment: Literal["imagenet", "small", "none"] = key(
        "imagenet", "imagenet: RandomResizedCrop to data.image_size (+ flip), as both papers; small: a padded "
        "random crop (ours); none.")
    crop_scale_min: float = key(0.08, "Lower bound of RandomResizedCrop's area (augment: imagenet).",
                                (lambda v: 0 < v <= 1, "a number in (0, 1]"))
    hflip: bool = key(True, "Random horizontal flips.")
    augment_per_batch: bool = key(False, "One random crop/flip for a whole per-rank batch, as the Deep Dive's "
                                  "SVHN/CIFAR10 jobs (torchvision transforms applied to a batch tensor); false: "
                                  "one per image.")
    head_momentum: float = key(0.0, "SGD momentum of the K-way head (a fresh optimizer every cycle). 0: the "
                               "original DeepCluster's; the Deep Dive's code puts the head in the body's "
                               "optimizer, so it gets the body's momentum.", _FRACTION)
    precision: Literal["fp32", "bf16", "fp16"] = key(
        "fp32", "Forward passes (extraction and training) under autocast: bf16 (a GPU or a CPU), fp16 (GPUs "
        "only, with a loss scaler); fp32 switches it off. Features reach the PCA as cluster.feature_dtype "
        "either way. See [Precision and GPU settings](training.md#precision-and-gpu-settings).")
    channels_last: bool = key(False, "NHWC memory format for the model and its input batches.")
    compile: bool = key(False, "torch.compile the body (the first batches wait for the compiler); needs a C++ "
                        "compiler on a CPU, Triton on a GPU.")


@dataclass
class EvalConfig:
    """The k-NN monitor during training, and the fast protocol of `dcscale probe`."""

    knn_every: int | None = key(None, "Run the k-NN monitor on data.test every this many cycles; null: never.",
                                _POSITIVE, resume="may change")
    knn_k: int = key(20, "Neighbours that vote in the k-NN monitor.", _POSITIVE, resume="may change")
    knn_temperature: float = key(0.07, "Temperature of the k-NN vote (each neighbour weighs exp(similarity / "
                                 "T)).", _POSITIVE, resume="may change")
    probe_epochs: int = key(20, "Linear probe epochs (`dcscale probe --protocol fast`).", _POSITIVE,
                            resume="may change")
    probe_lr: float = key(0.01, "Linear probe learning rate (fast protocol).", _POSITIVE, resume="may change")
    probe_weight_decay: float = key(5e-4, "Linear probe weight decay (fast protocol).", _NON_NEGATIVE,
                                    resume="may change")
    probe_batch_size: int = key(256, "Linear probe batch size (fast protocol).", _POSITIVE, resume="may change")
    probe_pool_dim: int = key(9600, "Conv activations are average-pooled to about this many dims for the probe "
                              "(fast protocol) and `dcscale embed`.", _POSITIVE, resume="may change")


@dataclass
class DistConfig:
    """The process group."""

    backend: Literal["auto", "gloo", "nccl"] = key("auto", "auto: nccl when CUDA is available, else gloo.",
                                                   resume="may change")
    timeout_min: float = key(30.0, "Timeout of ordinary collectives (k-means waits use "
                             "cluster.wait_timeout_min).", _MINUTES, resume="may change")
    rendezvous_timeout_s: float = key(60.0, "How long the ranks wait for each other at start-up (the ranks "
                                      "meeting at MASTER_ADDR:MASTER_PORT).",
                                      (lambda v: 0 < v <= 86_400, "a number of seconds > 0 and at most 86400 (a "
                                       "day)"), resume="may change")


@dataclass
class OutputConfig:
    """Where the run goes."""

    dir: str = key("runs/default", "The run directory (checkpoints, metrics, TensorBoard, config.yaml); a "
                   "resumed run may name the directory it was copied to.",
                   (lambda v: bool(v.strip()), "a directory for the run (not empty: the run would land in the "
                    "current directory)"), resume="may change")
    images_every: int | None = key(10, "TensorBoard images (cluster montages, filters, heatmaps) at cycle 0, "
                                   "every this many cycles and at the last; null: none.",
                                   (lambda v: v >= 1, "an integer >= 1 (cycles between TensorBoard images), or "
                                    "null for none"), resume="may change")


@dataclass
class CheckpointConfig:
    """Checkpoints (one is always written at the end of a cycle)."""

    every_steps: int | None = key(None, "Also checkpoint every this many training steps (mid-epoch); null: "
                                  "only at cycle ends.", _POSITIVE, resume="may change")
    keep_last: int = key(2, "Periodic checkpoints kept besides last.pt.", _NON_NEGATIVE, resume="may change")


@dataclass
class Config:
    """Top-level keys."""

    seed: int = key(0, "Seed of everything random: initial weights, PCA and k-means samples, sampler, "
                    "augmentation.",
                    # torch.manual_seed takes 64-bit seeds; numpy's SeedSequence (the per-cycle seeds) no negative ones
                    (lambda v: 0 <= v < 2**64, "an integer from 0 to 2**64 - 1"))
    resume: str | None = key(None, "auto (the newest checkpoint in output.dir) or a checkpoint path; null: a "
                             "new run.", (lambda v: v == "auto" or Path(v).suffix == ".pt",
                                          "'auto' or a path to a .pt checkpoint"), resume="may change")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
