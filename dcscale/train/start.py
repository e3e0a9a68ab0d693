"""The start of a run, before its first cycle: open and check every input (`open_inputs`, which
`dcscale train --check` runs too, through `check_start`), then lock the run directory, find the
checkpoint to resume from and make the run's first writes (`start_run`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcscale import dist
from dcscale.config import Config, get_key
from dcscale.cycle.clustering import check_clusterable, degenerate_settings
from dcscale.cycle.compute import check_platform, grad_scaler
from dcscale.cycle.network import eval_transform_for, input_shape
from dcscale.data.shardset import ShardSet
from dcscale.data.transforms import train_transform
from dcscale.errors import DcscaleError
from dcscale.models import build_model_from_config
from dcscale.train.checkpoint import (Checkpointer, RunState, atomic_write, in_run_dir, load_checkpoint,
                                      load_initial_weights, newest_checkpoint, reset_timeline, write_failure)
from dcscale.train.metrics_log import MetricsLogger
from dcscale.train.optim import body_optimizer
from dcscale.train.rundir import check_run_dir_free, check_same_run, claim_run_dir, note_start, write_run_config

log = logging.getLogger("dcscale")


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

    @property
    def shape(self) -> tuple[int, int]:
        return self.channels, self.image_size


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
    checkpointer = Checkpointer(run_dir, cfg, len(inputs.shards), inputs.shape)
    resume_path, ckpt = None, None
    if run_dir_checks:
        check_run_dir_free(run_dir)
        resume_path, ckpt = checkpointer.find_resume()
    elif cfg.resume not in (None, "auto"):
        resume_path, ckpt = cfg.resume, load_checkpoint(Path(cfg.resume))
    if resume_path is None:
        return
    resume_path = Path(resume_path)
    if run_dir_checks and in_run_dir(resume_path, run_dir):
        check_same_run(ckpt.get("config", {}), cfg, run_dir)
    model = inputs.model
    state = RunState(grad_scaler=grad_scaler(cfg.train.precision, next(model.parameters()).device))
    checkpointer.load(ckpt, resume_path, model, body_optimizer(model, cfg), state, world_size=world_size)


def start_run(cfg: Config, checkpointer: Checkpointer, model, body_opt, state: RunState):
    """Rank 0 locks the run directory and picks the checkpoint to resume from; every rank learns which
    (or rank 0's one-line reason to stop) and continues from it into `model`, `body_opt` and `state`.
    Only then, with every input checked, does rank 0 write into the run directory.
    Returns (the checkpoint resumed from or None, the head's optimizer or None, (rank 0) the metrics logger)."""
    run_dir = checkpointer.run_dir
    resume_path, ckpt = dist.rank0_decides(lambda: claim_and_find(checkpointer))
    head_opt, changes = None, []
    if resume_path is not None:
        resume_path = Path(resume_path)
        ckpt = ckpt if dist.is_main() else load_checkpoint(resume_path)
        if in_run_dir(resume_path, run_dir):  # continuing this run: it must be the same config
            changes = check_same_run(ckpt.get("config", {}), cfg, run_dir)
        head_opt = checkpointer.load(ckpt, resume_path, model, body_opt, state)
        del ckpt
    _, logger = dist.rank0_decides(lambda: (None, open_run_dir(cfg, run_dir, resume_path, state, changes)))
    return resume_path, head_opt, logger


def claim_and_find(checkpointer: Checkpointer) -> tuple[str | None, dict | None]:
    """(rank 0) Lock the run directory, then find the checkpoint to resume from, verified:
    (its path for every rank, its content for rank 0)."""
    note_start(checkpointer.run_dir)
    claim_run_dir(checkpointer.run_dir)
    return checkpointer.find_resume()


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
