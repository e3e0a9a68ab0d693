"""The DeepCluster training run: `train(cfg)` reads top to bottom, one cycle at a time.

    for each cycle:
        extract -> reduce -> cluster -> assign   (skipped from cluster.halt_after on)
        fresh head -> train (uniform over clusters, DDP) -> log -> checkpoint

Exact resume: a checkpoint holds everything the rest of the run depends on (weights, optimizer
state, labels, the position inside the epoch, the RNG state, running loss totals), and every random
choice is derived from (seed, cycle, epoch, draw position), so a killed and resumed run repeats the
uninterrupted run's labels and losses.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dcscale import dist
from dcscale.cluster.kmeans import cycle_seed
from dcscale.cluster.metrics import cluster_stats, nmi_scores
from dcscale.config import Config, config_to_dict, get_key
from dcscale.data.loaders import SeededDraws
from dcscale.data.sampler import UniformClusterSampler
from dcscale.data.shardset import ShardSet
from dcscale.data.transforms import train_transform
from dcscale.errors import DcscaleError
from dcscale.models import build_model_from_config
from dcscale.cycle import phases
from dcscale.cycle.clustering import check_clusterable, cluster_cycle, degenerate_settings
from dcscale.cycle.network import eval_transform_for, input_shape
from dcscale.train.checkpoint import (FORMAT, atomic_write, find_resume_checkpoint, in_run_dir, load_checkpoint,
                                     load_error, newest_checkpoint, reset_timeline, save_checkpoint, write_failure)
from dcscale.cycle.compute import Compute, check_platform, grad_scaler, prepare_model
from dcscale.cycle.images import cluster_record, cycle_images, montage_due, write_record
from dcscale.train.degenerate import cycle_ranges, degenerate_clustering
from dcscale.train.metrics_log import MetricsLogger, console_line, json_row
from dcscale.train.rundir import (check_run_dir_free, check_same_run, claim_run_dir, decided_by_main, note_start,
                                  release_run_dir, undo_failed_start, write_run_config)

log = logging.getLogger("dcscale")


def zero_totals() -> dict:
    """Running sums over a cycle's training steps (this rank's share)."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0}


@dataclass
class RunState:
    """Where the run stands; everything in here goes into a checkpoint."""

    cycle: int = 0
    epoch: int = 0
    step: int = 0  # optimizer steps done in the current epoch
    clustered_this_cycle: bool = False  # labels for `cycle` are ready (resuming mid-training)
    labels: np.ndarray | None = None
    prev_labels: np.ndarray | None = None
    cycle_metrics: dict = field(default_factory=dict)  # filled as the cycle's phases run
    totals: dict = field(default_factory=zero_totals)
    skipped_images: int = 0
    grad_scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (its state: the scale, its growth count)
    # (rank 0) metrics.jsonl's row of the last finished cycle, as written: a resume that finds that line
    # damaged writes it again from here
    last_row: dict | None = None


def summed_totals(totals: dict) -> dict:
    """The running sums over all ranks (a collective: every rank calls it at the same point)."""
    loss_sum, correct, seen = dist.all_reduce_sum([totals["loss_sum"], totals["correct"], totals["seen"]])
    return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}


@dataclass
class RunInputs:
    """What a run opens before its first write: the shard sets, the transforms and the network."""

    shards: ShardSet
    channels: int
    image_size: int
    knn_queries: ShardSet | None
    eval_tf: object
    train_tf: object
    model: torch.nn.Module  # on the CPU, with model.init's weights when given


def open_inputs(cfg: Config, device: torch.device | None, distributed: bool) -> RunInputs:
    """Open and check everything the run reads before it starts (training and `dcscale train --check`
    both call this, so the check cannot drift from what training refuses): the platform options on
    `device` (None: not known here, e.g. a SLURM login node), the shard sets (manifest against the
    tars), the input shape against the network and data.mean/std, K and pca_dim against the data and
    the network's feature width, and model.init's weights."""
    if device is not None:
        check_platform(cfg, device, distributed)  # e.g. fp16 on a CPU: one line, before any work
    shards = ShardSet(cfg.data.train)
    channels, image_size = input_shape(cfg, shards)
    check_output_dir(cfg)
    knn_queries = monitor_shards(cfg, shards)  # opened (and checked) now, not at the first k-NN cycle
    eval_tf = eval_transform_for(cfg, channels, image_size)
    train_tf = train_transform(image_size, channels, cfg.train.augment, cfg.train.crop_scale_min,
                               cfg.train.hflip, mean=cfg.data.mean, std=cfg.data.std,
                               per_batch=cfg.train.augment_per_batch)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and at every world size
    model = build_model_from_config(cfg, in_channels=channels, image_size=image_size)
    check_clusterable(cfg, model, shards)
    if dist.is_main():
        for warning in degenerate_settings(cfg, len(shards)):
            log.warning(warning)
    if cfg.model.init:
        load_initial_weights(model, cfg.model.init)
    return RunInputs(shards, channels, image_size, knn_queries, eval_tf, train_tf, model)


def check_start(cfg: Config, world_size: int, on_this_machine: bool = True, run_dir_checks: bool = True) -> None:
    """`dcscale train --check`: everything the start of training refuses, without a process group and
    without writing anything. `on_this_machine`: also the device options (backend, precision, sync_bn,
    compile) as on this machine; `run_dir_checks`: also the run directory (held by a live run, holding
    a run of another config) and the checkpoint `resume` finds there, loaded, verified and fitted into
    the network (a `resume` path given outside the run directory is checked either way)."""
    device = None
    if on_this_machine:
        dist.check_backend(cfg.dist.backend)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = open_inputs(cfg, device, world_size > 1)
    run_dir = Path(cfg.output.dir)
    resume_path, ckpt = None, None
    if run_dir_checks:
        check_run_dir_free(run_dir)
        resume_path, ckpt = find_start(cfg.resume, run_dir)
    elif cfg.resume not in (None, "auto"):
        resume_path, ckpt = cfg.resume, load_checkpoint(Path(cfg.resume))
    if resume_path is None:
        return
    resume_path = Path(resume_path)
    if run_dir_checks and in_run_dir(resume_path, run_dir):
        check_same_run(ckpt.get("config", {}), cfg, run_dir)
    body_opt = torch.optim.SGD(inputs.model.body_parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                               weight_decay=cfg.train.weight_decay)
    restore(ckpt, resume_path, inputs.model, body_opt, cfg, len(inputs.shards), (inputs.channels, inputs.image_size),
            world_size=world_size)


def train(cfg: Config) -> dict:
    """Run DeepCluster as `cfg` says; a start that fails (before the first checkpoint) leaves the run
    directory as it found it."""
    try:
        return run_training(cfg)
    except DcscaleError:
        if dist.is_main():
            undo_failed_start(Path(cfg.output.dir))
        raise


def run_training(cfg: Config) -> dict:
    env = dist.init_distributed(cfg.dist.backend, cfg.dist.timeout_min, cfg.cluster.wait_timeout_min,
                                cfg.dist.rendezvous_timeout_s)
    inputs = open_inputs(cfg, env.device, env.distributed)
    run_dir = Path(cfg.output.dir)
    shards, channels, image_size = inputs.shards, inputs.channels, inputs.image_size
    knn_queries, eval_tf, train_tf = inputs.knn_queries, inputs.eval_tf, inputs.train_tf
    # Only rank 0 logs the NMIs, so only it holds the ground truth and the previous labels (4 N bytes each).
    gt_labels = shards.labels() if shards.manifest.has_labels and env.is_main else None
    model = inputs.model.to(env.device)
    prepare_model(model, cfg, env.distributed)  # SyncBatchNorm, channels_last, compile (in place)
    body_opt = torch.optim.SGD(model.body_parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                               weight_decay=cfg.train.weight_decay)
    head_opt = None

    # Rank 0 locks the run directory and picks the checkpoint to resume from; every rank learns which,
    # or rank 0's one-line reason to stop.
    resume_path, ckpt = decided_by_main(lambda: claim_and_find(cfg.resume, run_dir))
    state, changes = RunState(grad_scaler=grad_scaler(cfg.train.precision, env.device)), []
    if resume_path is not None:
        resume_path = Path(resume_path)
        ckpt = ckpt if env.is_main else load_checkpoint(resume_path)
        if in_run_dir(resume_path, run_dir):  # continuing this run: it must be the same config
            changes = check_same_run(ckpt.get("config", {}), cfg, run_dir)
        state, head_opt = restore(ckpt, resume_path, model, body_opt, cfg, len(shards), (channels, image_size))
        del ckpt
    # Only now, with every input checked, does the run write into its directory.
    _, logger = decided_by_main(lambda: (None, open_run_dir(cfg, run_dir, resume_path, state, changes)))
    if env.is_main:
        where = f"resuming from {resume_path} at cycle {state.cycle} step {state.step}" if resume_path else "fresh run"
        print(f"dcscale train: {len(shards)} images, {cfg.model.arch}, K={cfg.cluster.k}, "
              f"{env.world_size} process(es) x {env.threads} thread(s) ({env.threads_from}), {where}; "
              f"run dir {run_dir}", flush=True)

    history = []
    while state.cycle < cfg.train.cycles:
        cycle = state.cycle
        supervised = cfg.cluster.labels == "ground_truth"
        clustering = not supervised and (cfg.cluster.halt_after is None or cycle < cfg.cluster.halt_after
                                          or state.labels is None)
        if not state.clustered_this_cycle:
            state.cycle_metrics = {"cycle": cycle, "clustered": clustering}
            if supervised and state.labels is None:  # the classes stand in for cycle 0's pseudo-labels
                state.labels = shards.labels().astype(np.int32)
                state.cycle_metrics.update({"t_extract": 0.0, "t_pca": 0.0, "t_kmeans": 0.0, "t_assign": 0.0,
                                            "objective": None})
                model.reset_head(cfg.cluster.k, generator=torch.Generator().manual_seed(cycle_seed(cfg.seed, cycle)))
                model.head.to(env.device)
                written_by_main(run_dir, lambda: atomic_write(run_dir / "labels.npy", lambda f: np.save(f, state.labels)))
            elif clustering:
                new_labels, skipped, cluster_metrics, montage = cluster_cycle(model, shards, eval_tf, env, cfg, cycle,
                                                                              montage_due(cfg, cycle))
                state.prev_labels, state.labels = (state.labels if env.is_main else None), new_labels
                state.skipped_images = skipped
                state.cycle_metrics.update(cluster_metrics)

                def save_labels():  # (rank 0) and what this cycle's montage (TensorBoard, `dcscale report`) shows
                    atomic_write(run_dir / "labels.npy", lambda f: np.save(f, state.labels))
                    if montage is not None:
                        write_record(run_dir, cluster_record(cycle, *montage, state.labels, gt_labels, cfg.cluster.k))

                written_by_main(run_dir, save_labels)
            else:
                state.cycle_metrics.update({"t_extract": 0.0, "t_pca": 0.0, "t_kmeans": 0.0, "t_assign": 0.0,
                                            "objective": None})
            state.cycle_metrics.update(label_metrics(state, gt_labels, cfg.cluster.k, clustering))
            if clustering or cfg.cluster.reinit_head_after_halt:
                model.reset_head(cfg.cluster.k, generator=torch.Generator().manual_seed(cycle_seed(cfg.seed, cycle)))
                model.head.to(env.device)
            head_opt = new_head_optimizer(model, cfg)
            state.clustered_this_cycle = True
            state.epoch, state.step = 0, 0
            state.totals = zero_totals()

        train_cycle(model, body_opt, head_opt, shards, train_tf, env, cfg, state, run_dir, (channels, image_size))

        metrics = finish_cycle_metrics(state)
        knn_confusion = None
        if knn_queries is not None and (cycle + 1) % cfg.eval.knn_every == 0:
            from dcscale.cycle.knn import knn_evaluate  # (imported when the monitor runs)

            knn = knn_evaluate(model, shards, knn_queries, eval_tf, env, cfg)
            metrics["knn_top1"], knn_confusion = knn.top1, knn.confusion
        history.append(metrics)
        sizes = cluster_stats(state.labels, cfg.cluster.k)["sizes"]
        metrics["degenerate"] = degenerate_clustering(sizes, cycle, metrics["loss"], metrics["accuracy"])

        def draw_images():  # (rank 0) this cycle's TensorBoard images
            return cycle_images(cfg, cycle, metrics, model, shards, run_dir, state.labels, gt_labels, knn_confusion)

        drawn = draw_images if cfg.output.images_every is not None else None
        written_by_main(run_dir, lambda: logger.log_cycle(metrics, sizes, drawn))
        if env.is_main:
            state.last_row = json_row(metrics)
            print(console_line(metrics), flush=True)
        # The cycle is done: the next checkpoint position is the start of the next cycle.
        state.cycle, state.epoch, state.step = cycle + 1, 0, 0
        state.clustered_this_cycle = False
        state.cycle_metrics = {}
        save_run_checkpoint(model, body_opt, None, state, cfg, run_dir, (channels, image_size))

    if env.is_main:
        logger.close()
        print_summary(history, run_dir)
        release_run_dir(run_dir)
    return history[-1] if history else {}


def claim_and_find(resume: str | None, run_dir: Path) -> tuple[str | None, dict | None]:
    """(rank 0) Lock the run directory, then find the checkpoint to resume from, verified:
    (its path for every rank, its content for rank 0)."""
    note_start(run_dir)
    claim_run_dir(run_dir)
    return find_start(resume, run_dir)


def find_start(resume: str | None, run_dir: Path) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from, verified (its path, its content), or (None, None) for a fresh
    run; a fresh run into a directory that holds another run is refused."""
    path, ckpt, note = find_resume_checkpoint(resume, run_dir)
    if note:
        log.warning(note)
    earlier = newest_checkpoint(run_dir)
    if earlier is not None and (path is None or not in_run_dir(path, run_dir)):
        # A new run never overwrites another's work: continuing it, or a new directory, is the user's call.
        raise DcscaleError(f"output.dir {run_dir} already holds a run (checkpoint {earlier.name}); continue it "
                           f"with resume=auto, or give this run a new output.dir")
    return (str(path) if path else None), ckpt


def open_run_dir(cfg: Config, run_dir: Path, resume_path: Path | None, state: RunState, changes: list):
    """(rank 0) The run's first writes: its checkpoints made one history ending where it starts,
    config.yaml (with the changes made on resume), labels.npy and the metrics logger."""
    try:
        position = (state.cycle, state.epoch, state.step) if resume_path else None
        for note in reset_timeline(run_dir, resume_path, position):
            log.warning(note)
        own = resume_path is not None and in_run_dir(resume_path, run_dir)
        write_run_config(cfg, run_dir, changes, state.cycle, resumed=own)
        if state.labels is not None:
            atomic_write(run_dir / "labels.npy", lambda f: np.save(f, state.labels))
        return MetricsLogger(run_dir, resume_cycle=state.cycle, last_row=state.last_row)
    except OSError as err:
        raise write_failure(err, newest_checkpoint(run_dir)) from None


def written_by_main(run_dir: Path, write) -> None:
    """Rank 0 runs `write()`; a write that fails (a full disk) stops every rank with rank 0's line."""
    def attempt() -> tuple[None, None]:
        try:
            write()
        except OSError as err:
            raise write_failure(err, newest_checkpoint(run_dir)) from None
        return None, None

    decided_by_main(attempt)


def save_run_checkpoint(model, body_opt, head_opt, state: RunState, cfg: Config, run_dir: Path,
                        shape: tuple[int, int]) -> None:
    written_by_main(run_dir, lambda: save_checkpoint(checkpoint_state(model, body_opt, head_opt, state, cfg, *shape),
                                                     run_dir, cfg.checkpoint.keep_last))
    dist.barrier()


def check_output_dir(cfg: Config) -> None:
    """output.dir may be neither a shard set's directory nor a folder inside one (the run's files would mix
    with the dataset's). (An empty output.dir is refused by the config's checks.)"""
    run_dir = Path(cfg.output.dir).resolve()
    for key in ("data.train", "data.test"):
        root = get_key(cfg, key)
        if root is not None and (run_dir == Path(root).resolve() or Path(root).resolve() in run_dir.parents):
            raise DcscaleError(f"output.dir {cfg.output.dir} is {'inside ' if run_dir != Path(root).resolve() else ''}"
                               f"the shard set of {key} ({root}): give the run a directory of its own")


def monitor_shards(cfg: Config, train: ShardSet | None = None) -> ShardSet | None:
    """The labelled shard set the k-NN monitor queries, when the monitor is on; its images must have the
    training images' shape (`train`), or the monitor would compare unlike pictures."""
    if not cfg.eval.knn_every:
        return None
    if cfg.data.test is None:
        log.warning("eval.knn_every is set but data.test is not: the k-NN monitor is off")
        return None
    queries = ShardSet(cfg.data.test)
    if not queries.manifest.has_labels:
        raise DcscaleError(f"data.test {cfg.data.test} has no labels: the k-NN monitor needs a labelled set")
    if train is not None:
        shape, want = queries.manifest.image_shape, train.manifest.image_shape
        if (queries.channels, train.channels) != (None, None) and queries.channels != train.channels or \
                shape is not None and want is not None and list(shape) != list(want):
            def show(s: ShardSet) -> str:
                given = s.manifest.image_shape
                return "x".join(map(str, given)) if given else f"{s.channels}-channel images of several sizes"

            raise DcscaleError(f"data.test {cfg.data.test} holds {show(queries)} images but data.train "
                               f"{cfg.data.train} holds {show(train)}: the k-NN monitor needs a test set of the "
                               f"training images' shape")
    return queries


def label_metrics(state: RunState, gt_labels, k: int, clustered: bool) -> dict:
    stats = cluster_stats(state.labels, k)
    # NMI with arithmetic normalisation (scikit-learn's default, the Deep Dive's) and, under
    # *_geometric, with the geometric one the original DeepCluster reported (sklearn <= 0.20).
    none = {"arithmetic": None, "geometric": None}
    prev = nmi_scores(state.prev_labels, state.labels) if clustered and state.prev_labels is not None else none
    gt = nmi_scores(gt_labels, state.labels) if gt_labels is not None else none
    return {
        "nmi_prev": prev["arithmetic"], "nmi_prev_geometric": prev["geometric"],
        "nmi_gt": gt["arithmetic"], "nmi_gt_geometric": gt["geometric"],
        "empty_clusters": stats["empty"],
        "cluster_min": stats["min"], "cluster_median": stats["median"], "cluster_max": stats["max"],
        "skipped_images": state.skipped_images,
    }


def new_head_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    # As in the original, the head gets a fresh optimizer every cycle; the body's momentum persists.
    return torch.optim.SGD(model.head_parameters(), lr=cfg.train.lr, momentum=cfg.train.head_momentum,
                           weight_decay=cfg.train.weight_decay)


def train_cycle(model, body_opt, head_opt, shards, train_tf, env, cfg: Config, state: RunState, run_dir: Path,
                shape: tuple[int, int]) -> None:
    """`train.epochs_per_cycle` epochs of DDP SGD on the pseudo-labels, from the state's position.

    Adds the seconds spent to state.cycle_metrics["t_train"] (which survives a mid-epoch resume).
    """
    ddp = DistributedDataParallel(model) if env.distributed else model
    # augmentation seeded by (seed, cycle, epoch, draw position), applied to whole uint8 batches
    dataset = SeededDraws(shards, state.labels, train_tf, cfg.seed, state.cycle)
    t_before = state.cycle_metrics.get("t_train", 0.0)
    t_start = time.perf_counter()
    # once per cycle (the labels are fixed within it): it keeps the per-cluster counts across epochs
    sampler = UniformClusterSampler(state.labels, world_size=env.world_size, rank=env.rank,
                                    seed=cycle_seed(cfg.seed, state.cycle))
    while state.epoch < cfg.train.epochs_per_cycle:
        epoch_seed = cycle_seed(cfg.seed, state.cycle) * 1000 + state.epoch
        start = state.step * cfg.train.batch_size
        sampler.set_epoch(state.epoch)
        sampler.set_start(start)
        steps_per_epoch = math.ceil(sampler.per_rank / cfg.train.batch_size)
        dataset.epoch = state.epoch
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, sampler=WithPositions(sampler, start),
            num_workers=cfg.data.workers, collate_fn=dataset.collate, pin_memory=env.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed))
        if state.step == 0:
            torch.manual_seed(epoch_seed)  # dropout masks; restored from the checkpoint mid-epoch

        def on_step(step: int, totals: dict) -> None:
            state.step = step
            every = cfg.checkpoint.every_steps
            # The epoch's last step is followed by the cycle-end (or next epoch's) checkpoint.
            if every and step % every == 0 and step < steps_per_epoch:
                state.cycle_metrics["t_train"] = t_before + time.perf_counter() - t_start
                write_mid_epoch_checkpoint(model, body_opt, head_opt, state, totals, cfg, run_dir, shape)

        try:
            state.totals = phases.train_steps(ddp, loader, [body_opt, head_opt], env, state.step, on_step,
                                              state.totals, Compute.from_config(cfg, env.device), state.grad_scaler)
        except phases.NonFiniteLoss as err:
            newest = newest_checkpoint(run_dir)
            left = f"the newest checkpoint, {newest}, was written before it" if newest else \
                "no checkpoint was written yet, so a new run starts over"
            raise DcscaleError(f"loss is NaN or infinite at cycle {state.cycle}, epoch {state.epoch}, step "
                               f"{err.step}; stopping ({left})") from None
        state.epoch += 1
        state.step = 0
    if env.distributed:
        # DDP copies rank 0's buffers into the others before each forward, so after the last step every
        # rank's BN running stats also hold its own last batch. Extraction (no DDP) must use rank 0's, the
        # ones a checkpoint holds, or a run resumed at a cycle boundary clusters different features.
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    state.cycle_metrics["t_train"] = t_before + time.perf_counter() - t_start


def write_mid_epoch_checkpoint(model, body_opt, head_opt, state: RunState, totals: dict, cfg: Config,
                               run_dir: Path, shape: tuple[int, int]) -> None:
    # Every rank's running totals are summed into rank 0's copy, so the resumed run (which starts the
    # other ranks from zero) ends the cycle with the same loss as an uninterrupted one.
    summed = summed_totals(totals)
    saved = RunState(**{**state.__dict__, "totals": summed})
    save_run_checkpoint(model, body_opt, head_opt, saved, cfg, run_dir, shape)


def finish_cycle_metrics(state: RunState) -> dict:
    totals = summed_totals(state.totals)
    m = dict(state.cycle_metrics)
    m["loss"] = totals["loss_sum"] / max(totals["seen"], 1)
    m["accuracy"] = totals["correct"] / max(totals["seen"], 1)
    m["ips_train"] = totals["seen"] / max(m["t_train"], 1e-9)
    m["t_cycle"] = sum(m.get(f"t_{p}", 0.0) for p in ("extract", "pca", "kmeans", "assign", "train"))
    m["peak_mem_mb"] = peak_memory_mb()
    m.setdefault("ips_extract", None)
    return m


def peak_memory_mb() -> float:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if torch.cuda.is_available():
        return max(rss_mb, torch.cuda.max_memory_allocated() / 2**20)
    return rss_mb


class WithPositions(torch.utils.data.Sampler):
    """Pairs every drawn index with its position in this rank's draw, so augmentation can be seeded
    by position: a resumed epoch then sees exactly the crops and flips the uninterrupted one saw."""

    def __init__(self, sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(enumerate(self.sampler, start=self.start))

    def __len__(self):
        return len(self.sampler)


def checkpoint_state(model, body_opt, head_opt, state: RunState, cfg: Config, channels: int, image_size: int) -> dict:
    """Everything a resume needs, as tensors and plain values only (what weights_only loading reads)."""
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "body_optimizer": body_opt.state_dict(),
        "head_optimizer": head_opt.state_dict() if head_opt is not None else None,
        "cycle": state.cycle, "epoch": state.epoch, "step": state.step,
        "clustered_this_cycle": state.clustered_this_cycle,
        "labels": _tensor_or_none(state.labels), "prev_labels": _tensor_or_none(state.prev_labels),
        "cycle_metrics": plain_values(state.cycle_metrics), "totals": plain_values(state.totals),
        "last_row": state.last_row,
        "skipped_images": int(state.skipped_images),
        "grad_scaler": state.grad_scaler.state_dict() if state.grad_scaler is not None else None,
        "rng": torch.get_rng_state(),
        # dropout on a GPU draws from the device's generator; every rank's matches rank 0's (same
        # seed, same ops), so rank 0's state serves all
        "cuda_rng": torch.cuda.get_rng_state(dist.get_env().device) if torch.cuda.is_available() else None,
        "world_size": dist.get_env().world_size,
        "batch_size": cfg.train.batch_size,
        "config": config_to_dict(cfg),
        "image_shape": [channels, image_size, image_size],
        "k": cfg.cluster.k,
    }


def _tensor_or_none(labels: np.ndarray | None) -> torch.Tensor | None:
    return None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))


def plain_values(values: dict) -> dict:
    """numpy scalars as Python ones (the same value; only Python's load without unpickling)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def restore(ckpt: dict, path: Path, model, body_opt, cfg: Config, n_images: int, shape: tuple[int, int],
            world_size: int | None = None):
    """(RunState, head optimizer or None) from a loaded checkpoint, into `model` and `body_opt`;
    `world_size`: the run's (default: this process group's)."""
    check_resumable(ckpt, path, cfg, n_images, shape, world_size)
    model.reset_head(ckpt["k"])
    try:
        model.load_state_dict(ckpt["model"])
        body_opt.load_state_dict(ckpt["body_optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise DcscaleError(f"{path}: its weights do not fit this run's {cfg.model.arch} ({load_error(err)})") from None
    device = next(model.parameters()).device
    model.head.to(device)
    head_opt = None
    if ckpt.get("head_optimizer") is not None:
        head_opt = new_head_optimizer(model, cfg)
        head_opt.load_state_dict(ckpt["head_optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"], dist.get_env().device)
    dist_env = dist.get_env()
    totals = ckpt["totals"] if dist_env.is_main else zero_totals()
    scaler = grad_scaler(cfg.train.precision, device)
    if scaler is not None and ckpt.get("grad_scaler"):  # (empty or absent: written by an fp32/bf16 run)
        scaler.load_state_dict(ckpt["grad_scaler"])
    state = RunState(cycle=ckpt["cycle"], epoch=ckpt["epoch"], step=ckpt["step"],
                     clustered_this_cycle=ckpt["clustered_this_cycle"], labels=_array_or_none(ckpt["labels"]),
                     prev_labels=_array_or_none(ckpt["prev_labels"]) if dist_env.is_main else None,
                     cycle_metrics=dict(ckpt["cycle_metrics"]),
                     totals=dict(totals), skipped_images=ckpt.get("skipped_images", 0), grad_scaler=scaler,
                     last_row=ckpt.get("last_row") if dist_env.is_main else None)
    return state, head_opt


def _array_or_none(labels: torch.Tensor | None) -> np.ndarray | None:
    return None if labels is None else labels.numpy()


def check_resumable(ckpt: dict, path: Path, cfg: Config, n_images: int, shape: tuple[int, int],
                    world_size: int | None = None) -> None:
    """One line for a checkpoint this run cannot continue: not a training checkpoint of this format,
    another network or input shape, another shard set size; and a mid-epoch position only means
    something for the world size and per-rank batch size that wrote it (the sampler's share and the
    step count depend on both)."""
    if "body_optimizer" not in ckpt:
        raise DcscaleError(f"{path} is not a training checkpoint (no optimizer state); to start from its weights, "
                           f"give it as model.init")
    if ckpt.get("format") != FORMAT:
        raise DcscaleError(f"{path} was written by another dcscale version (checkpoint format {ckpt.get('format')}, "
                           f"this one reads {FORMAT}); start a new run with model.init={path} to keep its weights")
    saved_arch = ckpt.get("config", {}).get("model", {}).get("arch", cfg.model.arch)
    if saved_arch != cfg.model.arch:
        raise DcscaleError(f"{path} holds a {saved_arch} network; this run builds a {cfg.model.arch} (model.arch)")
    channels, image_size = shape
    want = [channels, image_size, image_size]
    if list(ckpt.get("image_shape", want)) != want:
        c, h, w = ckpt["image_shape"]
        raise DcscaleError(f"{path} was written for {c}x{h}x{w} inputs; this run's are {channels}x{image_size}x"
                           f"{image_size} ({cfg.data.train}, data.image_size)")
    if ckpt.get("labels") is not None and len(ckpt["labels"]) != n_images:
        raise DcscaleError(f"{path} was written for a shard set of {len(ckpt['labels'])} images; {cfg.data.train} "
                           f"has {n_images}: resume on the shard set the run trained on, or give a new output.dir")
    mid_epoch = ckpt.get("step", 0) > 0 or ckpt.get("epoch", 0) > 0
    world_size = world_size or dist.get_env().world_size
    saved_ws, saved_bs = ckpt.get("world_size", world_size), ckpt.get("batch_size", cfg.train.batch_size)
    if mid_epoch and (saved_ws != world_size or saved_bs != cfg.train.batch_size):
        raise DcscaleError(f"{path} was written mid-epoch by {saved_ws} process(es) with train.batch_size="
                           f"{saved_bs}; resume it with the same (now {world_size}, {cfg.train.batch_size})")
    if mid_epoch and ckpt.get("k", cfg.cluster.k) != cfg.cluster.k:
        raise DcscaleError(f"{path} was written mid-epoch with cluster.k={ckpt['k']}; resume it with the same "
                           f"(now {cfg.cluster.k})")


def load_initial_weights(model, path: str) -> None:
    """Start from given weights (e.g. the best random init found by `dcscale ia --select-seed`)."""
    try:
        ckpt = load_checkpoint(Path(path))
    except DcscaleError as err:
        raise DcscaleError(f"model.init: {err}") from None
    if not isinstance(ckpt.get("model"), dict):
        raise DcscaleError(f"model.init {path}: no 'model' weights in it")
    weights = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise DcscaleError(f"model.init {path}: weights do not fit {type(model).__name__} "
                           f"({load_error(err)})") from None
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise DcscaleError(f"model.init {path}: weights do not fit {type(model).__name__} "
                           f"(missing {len(missing)}, unexpected {len(unexpected)})")


def print_summary(history: list[dict], run_dir: Path) -> None:
    if not history:
        print(f"dcscale train: nothing to do (all cycles done); run dir {run_dir}")
        return
    curve = " ".join("-" if m.get("nmi_prev") is None else f"{m['nmi_prev']:.2f}" for m in history)
    gt = " ".join("-" if m.get("nmi_gt") is None else f"{m['nmi_gt']:.2f}" for m in history)
    print(f"NMI(t-1, t) by cycle: {curve}")
    print(f"NMI(labels, t) by cycle: {gt}")
    degenerate = [m["cycle"] for m in history if m.get("degenerate")]
    if degenerate:
        print(f"degenerate clustering in {len(degenerate)} of {len(history)} cycles (cycles "
              f"{cycle_ranges(degenerate)}): see their cycle lines")
    last = history[-1]
    print(f"dcscale train: done {last['cycle'] + 1} cycles, final loss {last['loss']:.4f}; "
          f"metrics {run_dir / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
