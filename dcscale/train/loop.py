"""The DeepCluster training run: `train(cfg)` reads top to bottom, one cycle at a time.

    for each cycle:
        extract -> reduce -> cluster -> assign   (skipped from cluster.halt_after on)
        fresh head -> train (uniform over clusters, DDP) -> log -> checkpoint

Exact resume: a checkpoint holds everything the rest of the run depends on (weights, optimizer
state, labels, the position inside the epoch, the RNG state, running loss totals: see
dcscale.train.checkpoint), and every random choice is derived from (seed, cycle, epoch, draw
position), so a killed and resumed run repeats the uninterrupted run's labels and losses. What the
run opens and checks before its first cycle, and its first writes: dcscale.train.start.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dcscale import dist
from dcscale.cluster.kmeans import cycle_seed
from dcscale.cluster.metrics import cluster_stats
from dcscale.config import Config
from dcscale.cycle import phases
from dcscale.cycle.clustering import cluster_cycle
from dcscale.cycle.compute import ForwardSettings, grad_scaler, prepare_model
from dcscale.cycle.degenerate import degenerate_clustering
from dcscale.cycle.images import cluster_record, cycle_images, montage_due, write_record
from dcscale.data.loaders import SeededDraws
from dcscale.data.sampler import UniformClusterSampler
from dcscale.errors import DcscaleError
from dcscale.train.checkpoint import (Checkpointer, RunState, atomic_write, newest_checkpoint, rank0_writes,
                                      zero_totals)
from dcscale.train.metrics_log import console_line, finish_cycle_metrics, json_row, label_metrics, print_summary
from dcscale.train.optim import body_optimizer, new_head_optimizer
from dcscale.train.rundir import release_run_dir, undo_failed_start
from dcscale.train.start import RunInputs, open_inputs, start_run

NO_CLUSTERING = {"t_extract": 0.0, "t_pca": 0.0, "t_kmeans": 0.0, "t_assign": 0.0, "kmeans_iterations": 0,
                 "objective": None}


def train(cfg: Config) -> dict:
    """Run DeepCluster as `cfg` says; a start that fails (before the first checkpoint) leaves the run
    directory as it found it, and a run that stops for any reason lets go of its directory's lock (a
    caller in the same process, e.g. a notebook, would otherwise hold it until it exits)."""
    try:
        return run_training(cfg)
    except DcscaleError:
        if dist.is_main():
            undo_failed_start(Path(cfg.output.dir))
        raise
    finally:
        release_run_dir(Path(cfg.output.dir))


def run_training(cfg: Config) -> dict:
    env = dist.init_distributed(cfg.dist.backend, cfg.dist.timeout_min, cfg.cluster.wait_timeout_min,
                                cfg.dist.rendezvous_timeout_s)
    inputs = open_inputs(cfg, env.device, env.distributed)
    run_dir, shards = Path(cfg.output.dir), inputs.shards
    # Only rank 0 logs the NMIs, so only it holds the ground truth and the previous labels (4 N bytes each).
    gt_labels = shards.labels() if shards.manifest.has_labels and env.is_main else None
    model = inputs.model.to(env.device)
    prepare_model(model, cfg, env.distributed)  # SyncBatchNorm, channels_last, compile (in place)
    body_opt = body_optimizer(model, cfg)
    checkpointer = Checkpointer(run_dir, cfg, len(shards), inputs.shape)
    state = RunState(grad_scaler=grad_scaler(cfg.train.precision, env.device))
    resume_path, head_opt, logger = start_run(cfg, checkpointer, model, body_opt, state)
    if env.is_main:
        where = f"resuming from {resume_path} at cycle {state.cycle} step {state.step}" if resume_path else "fresh run"
        print(f"dcscale train: {len(shards)} images, {cfg.model.arch}, K={cfg.cluster.k}, "
              f"{env.world_size} process(es) x {env.threads} thread(s) ({env.threads_from}), {where}; "
              f"run dir {run_dir}", flush=True)

    history = []
    try:
        while state.cycle < cfg.train.cycles:
            cycle = state.cycle
            if not state.clustered_this_cycle:  # (a run resumed mid-cycle has this cycle's labels and head)
                clustered = new_labels(model, inputs, env, cfg, state, run_dir, gt_labels)
                head_opt = new_head(model, env, cfg, state, clustered)
            train_cycle(model, body_opt, head_opt, shards, inputs.train_tf, env, cfg, state, checkpointer)
            history.append(log_cycle(model, inputs, env, cfg, state, run_dir, gt_labels, logger))
            # The cycle is done: the next checkpoint position is the start of the next cycle.
            state.cycle, state.epoch, state.step = cycle + 1, 0, 0
            state.clustered_this_cycle = False
            state.cycle_metrics = {}
            checkpointer.save(model, body_opt, None, state)
    finally:  # also on a failure: an in-process caller would keep the event file and its writer thread
        if logger is not None:
            logger.close()

    if env.is_main:
        print_summary(history, run_dir)
    return history[-1] if history else {}  # (train() lets go of the run directory)


def new_labels(model, inputs: RunInputs, env, cfg: Config, state: RunState, run_dir: Path, gt_labels) -> bool:
    """The cycle's pseudo-labels into `state` (extract -> reduce -> cluster -> assign, or the classes
    under cluster.labels=ground_truth, or the last cycle's from cluster.halt_after on), written to
    labels.npy, with their metrics. Returns whether the cycle clustered."""
    cycle, shards = state.cycle, inputs.shards
    supervised = cfg.cluster.labels == "ground_truth"
    clustering = not supervised and (cfg.cluster.halt_after is None or cycle < cfg.cluster.halt_after
                                      or state.labels is None)
    state.cycle_metrics = {"cycle": cycle, "clustered": clustering}
    if supervised and state.labels is None:  # the classes stand in for cycle 0's pseudo-labels
        state.labels = shards.labels().astype(np.int32)
        state.cycle_metrics.update(NO_CLUSTERING)
        model.reset_head(cfg.cluster.k, generator=torch.Generator().manual_seed(cycle_seed(cfg.seed, cycle)))
        model.head.to(env.device)
        rank0_writes(run_dir, lambda: atomic_write(run_dir / "labels.npy", lambda f: np.save(f, state.labels)))
    elif clustering:
        labels, skipped, cluster_metrics, montage = cluster_cycle(model, shards, inputs.eval_tf, env, cfg, cycle,
                                                                  montage_due(cfg, cycle))
        state.prev_labels, state.labels = (state.labels if env.is_main else None), labels
        state.skipped_images = skipped
        state.cycle_metrics.update(cluster_metrics)

        def save_labels():  # (rank 0) and what this cycle's montage (TensorBoard, `dcscale report`) shows
            atomic_write(run_dir / "labels.npy", lambda f: np.save(f, state.labels))
            if montage is not None:
                write_record(run_dir, cluster_record(cycle, *montage, state.labels, gt_labels, cfg.cluster.k))

        rank0_writes(run_dir, save_labels)
    else:
        state.cycle_metrics.update(NO_CLUSTERING)
    state.cycle_metrics.update(label_metrics(state, gt_labels, cfg.cluster.k, clustering))
    return clustering


def new_head(model, env, cfg: Config, state: RunState, clustered: bool) -> torch.optim.Optimizer:
    """A fresh head for the new labels (seeded by the cycle) and its fresh optimizer; the cycle's
    training starts at its first step."""
    if clustered or cfg.cluster.reinit_head_after_halt:
        model.reset_head(cfg.cluster.k, generator=torch.Generator().manual_seed(cycle_seed(cfg.seed, state.cycle)))
        model.head.to(env.device)
    state.clustered_this_cycle = True
    state.epoch, state.step = 0, 0
    state.totals = zero_totals()
    return new_head_optimizer(model, cfg)


def train_cycle(model, body_opt, head_opt, shards, train_tf, env, cfg: Config, state: RunState,
                checkpointer: Checkpointer) -> None:
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
                checkpointer.save_mid_epoch(model, body_opt, head_opt, state, totals)

        try:
            state.totals = phases.train_steps(ddp, loader, [body_opt, head_opt], env, state.step, on_step,
                                              state.totals, ForwardSettings.from_config(cfg, env.device), state.grad_scaler)
        except phases.NonFiniteLoss as err:
            newest = newest_checkpoint(checkpointer.run_dir)
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


def log_cycle(model, inputs: RunInputs, env, cfg: Config, state: RunState, run_dir: Path, gt_labels,
              logger) -> dict:
    """The cycle's metrics (over every rank), the k-NN monitor when due, and (rank 0) its metrics.jsonl
    row, TensorBoard events and console line. Returns the metrics."""
    cycle, shards = state.cycle, inputs.shards
    metrics = finish_cycle_metrics(state)
    knn_confusion = None
    if inputs.knn_queries is not None and (cycle + 1) % cfg.eval.knn_every == 0:
        from dcscale.cycle.knn import knn_evaluate  # (imported when the monitor runs)

        knn = knn_evaluate(model, shards, inputs.knn_queries, inputs.eval_tf, env, cfg)
        metrics["knn_top1"], knn_confusion = knn.top1, knn.confusion
    sizes = cluster_stats(state.labels, cfg.cluster.k)["sizes"]
    metrics["degenerate"] = degenerate_clustering(sizes, cycle, metrics["loss"], metrics["accuracy"])

    def draw_images():  # (rank 0) this cycle's TensorBoard images
        return cycle_images(cfg, cycle, metrics, model, shards, run_dir, state.labels, gt_labels, knn_confusion)

    drawn = draw_images if cfg.output.images_every is not None else None
    rank0_writes(run_dir, lambda: logger.log_cycle(metrics, sizes, drawn))
    if env.is_main:
        state.last_row = json_row(metrics)
        print(console_line(metrics), flush=True)
    return metrics


class WithPositions(torch.utils.data.Sampler):
    """Pairs every drawn index with its position in this rank's draw, so augmentation can be seeded
    by position: a resumed epoch then sees exactly the crops and flips the uninterrupted one saw."""

    def __init__(self, sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(enumerate(self.sampler, start=self.start))

    def __len__(self):
        return len(self.sampler)
