"""Checkpoints: written atomically by rank 0, verified on every load, found again by `resume: auto`.

Layout in the run directory: `checkpoints/last.pt` (always the newest) and periodic
`checkpoints/cycle{C:05d}_epoch{E:03d}_step{S:08d}.pt`, of which `checkpoint.keep_last` are kept. A checkpoint is
written to a temporary file in the same directory, flushed to disk, then renamed, so a kill at any
moment leaves either the old file or the new one, never half of one. last.pt is a file of its own
(the same bytes as the newest periodic one), so damage to one leaves the other.

What a checkpoint holds and how it is verified on load: dcscale.cycle.checkpoint (one reader for
resume, export, the probe, embed and IA). A damaged file is refused, and `resume: auto` falls back to
the newest intact one.

What a training checkpoint holds is the network's, the optimizers' and the run state's state_dict()
(RunState: where the run stands, its labels, running totals and random generators) plus the facts a
resume checks (world size, batch size, config, input shape, K). `Checkpointer` writes every one of
them (end of cycle, mid-epoch) and restores one on resume.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dcscale import dist
from dcscale.config import Config, config_to_dict
# (FORMAT, load_error and write_checkpoint_file are read here too by older callers: the format's own module)
from dcscale.cycle.checkpoint import (FORMAT, CheckpointError, load_checkpoint, load_error,  # noqa: F401 (re-exported)
                                      serialize, write_checkpoint_file)
from dcscale.errors import DcscaleError
from dcscale.safefile import atomic_write
from dcscale.train.optim import new_head_optimizer

log = logging.getLogger("dcscale")

_PERIODIC = re.compile(r"cycle(\d+)_epoch(\d+)_step(\d+)\.pt$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write `state` as last.pt and (keep_last > 0) as a periodic file; prune older periodic files.

    last.pt is written first, so it is never older than the newest periodic file. A failed write
    (a full disk) raises a one-line error saying that the previous checkpoints are intact."""
    folder = checkpoint_dir(run_dir)
    position = (state["cycle"], state["epoch"], state["step"])
    periodic = folder / "cycle{:05d}_epoch{:03d}_step{:08d}.pt".format(*position)
    intact = newest_checkpoint(run_dir)
    data = serialize(state)
    target = folder / "last.pt"
    try:
        atomic_write(target, lambda f: f.write(data))
        intact = target
        if keep_last > 0:
            target = periodic
            atomic_write(target, lambda f: f.write(data))
    except OSError as err:
        raise write_failure(err, intact, target) from None
    _prune(folder, keep_last, position)
    return folder / "last.pt"


def write_failure(err: OSError, intact: Path | None, target: Path | None = None) -> DcscaleError:
    """One line for a write to `target` that failed (a full disk, a directory made read-only): what
    failed, and that the checkpoints already written are untouched (every write goes to a temporary
    file first)."""
    what = f"cannot write {target or err.filename or 'a file'}: {err.strerror or err}"
    if err.errno in NO_SPACE:
        what += " (the disk or quota is full)"
    if intact is not None:
        return DcscaleError(f"{what}; nothing was lost: the newest checkpoint {intact} is intact "
                            f"(free space, then run again with resume=auto)")
    return DcscaleError(f"{what}; no checkpoint had been written yet, so a new run starts over")


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """last.pt, or the newest periodic checkpoint, when the run has one (not verified)."""
    folder = checkpoint_dir(run_dir)
    if (folder / "last.pt").is_file():
        return folder / "last.pt"
    periodic = periodic_checkpoints(folder)
    return periodic[0][1] if periodic else None


def periodic_checkpoints(folder: Path) -> list[tuple[tuple[int, int, int], Path]]:
    """(position (cycle, epoch, step), path) of every periodic checkpoint, newest first."""
    found = []
    for path in folder.glob("cycle*_epoch*_step*.pt"):
        match = _PERIODIC.fullmatch(path.name)
        if match:
            found.append((tuple(int(g) for g in match.groups()), path))
    return sorted(found, reverse=True)


def _prune(folder: Path, keep_last: int, written: tuple[int, int, int]) -> None:
    """Remove periodic files older than the `keep_last` newest, never one newer than the one just
    written (not this run's; the run directory's lock keeps other writers out anyway)."""
    ours = [path for position, path in periodic_checkpoints(folder) if position <= written]
    for old in ours[keep_last:]:
        old.unlink(missing_ok=True)


def reset_timeline(run_dir: str | Path, resumed_from: Path | None, position: tuple[int, int, int] | None) -> list[str]:
    """Make the run directory's checkpoints one history that ends where this run starts.

    Called by the run directory's lock holder before its first checkpoint. Temporary files left by
    a killed writer go. (A new run never gets here into a directory holding another run's
    checkpoints: the loop refuses it first.) A resumed run removes periodic files beyond its starting
    point (damaged ones it fell back from, or a history it was told to leave by `resume: PATH`) and
    makes last.pt a copy of the checkpoint it started from. Returns notes for the user.
    """
    folder = checkpoint_dir(run_dir)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    last = folder / "last.pt"
    periodic = periodic_checkpoints(folder)
    if resumed_from is None or not in_run_dir(resumed_from, run_dir):
        return []
    beyond = [path for pos, path in periodic if pos > position]
    for path in beyond:
        path.unlink()
    notes = [f"removed {len(beyond)} checkpoint(s) after the starting point: {', '.join(p.name for p in beyond)}"] \
        if beyond else []
    if resumed_from.resolve() != last.resolve():
        data = resumed_from.read_bytes()
        atomic_write(last, lambda f: f.write(data))
    return notes


def in_run_dir(path: Path, run_dir: str | Path) -> bool:
    """Whether a checkpoint is one of the run directory's own (not another run's)."""
    return path.resolve().parent == checkpoint_dir(run_dir).resolve()


def find_resume_checkpoint(resume: str | None, run_dir: str | Path) -> tuple[Path | None, dict | None, str | None]:
    """(path, loaded checkpoint, note) to resume from, or (None, None, None) for a fresh run.

    `auto`: the run directory's newest intact checkpoint (last.pt, else the newest good periodic
    one, with a note naming what was skipped and why); a run directory with checkpoints but none
    intact is an error, not a fresh start. A given path must exist and be intact.
    """
    if resume is None:
        return None, None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"resume checkpoint not found: {path}")
        return path, load_checkpoint(path), None
    folder = checkpoint_dir(run_dir)
    candidates = ([folder / "last.pt"] if (folder / "last.pt").is_file() else [])
    candidates += [path for _, path in periodic_checkpoints(folder)]
    refused: list[str] = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            refused.append(str(err))
            continue
        note = None
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            note = f"{refused[0]}{more}; resuming from {path}, the newest intact checkpoint"
        return path, ckpt, note
    if refused:
        more = f" (and {len(refused) - 1} more, none intact)" if len(refused) > 1 else ""
        raise CheckpointError(f"no intact checkpoint to resume from in {folder}: {refused[0]}{more}; move the "
                              f"run directory aside and start a new run, or give resume=PATH")
    return None, None, None




def rank0_writes(run_dir: Path, write) -> None:
    """Rank 0 runs `write()`; a write that fails (a full disk) stops every rank with rank 0's line."""
    def attempt() -> tuple[None, None]:
        try:
            write()
        except OSError as err:
            raise write_failure(err, newest_checkpoint(run_dir)) from None
        return None, None

    dist.rank0_decides(attempt)


def zero_totals() -> dict:
    """Running sums over a cycle's training steps (this rank's share)."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0}


def summed_totals(totals: dict) -> dict:
    """The running sums over all ranks (a collective: every rank calls it at the same point)."""
    loss_sum, correct, seen = dist.all_reduce_sum([totals["loss_sum"], totals["correct"], totals["seen"]])
    return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}


@dataclass
class RunState:
    """Where the run stands; everything in here goes into a checkpoint (state_dict / load_state_dict)."""

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

    def state_dict(self) -> dict:
        """As tensors and plain values only (what weights_only loading reads), with this process's
        random generators; the keys and their order are the checkpoint format's."""
        return {
            "cycle": self.cycle, "epoch": self.epoch, "step": self.step,
            "clustered_this_cycle": self.clustered_this_cycle,
            "labels": _tensor_or_none(self.labels), "prev_labels": _tensor_or_none(self.prev_labels),
            "cycle_metrics": plain_values(self.cycle_metrics), "totals": plain_values(self.totals),
            "last_row": self.last_row,
            "skipped_images": int(self.skipped_images),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "rng": torch.get_rng_state(),
            # dropout on a GPU draws from the device's generator; every rank's matches rank 0's (same
            # seed, same ops), so rank 0's state serves all
            "cuda_rng": torch.cuda.get_rng_state(dist.get_env().device) if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from `saved` (a checkpoint, checked): this process's random generators too. Only
        rank 0 keeps what only it uses (the previous labels, the last metrics row) and the running totals
        (summed over every rank when saved; the others start theirs from zero)."""
        main = dist.get_env().is_main
        self.cycle, self.epoch, self.step = saved["cycle"], saved["epoch"], saved["step"]
        self.clustered_this_cycle = saved["clustered_this_cycle"]
        self.labels = _array_or_none(saved["labels"])
        self.prev_labels = _array_or_none(saved["prev_labels"]) if main else None
        self.cycle_metrics = dict(saved["cycle_metrics"])
        self.totals = dict(saved["totals"] if main else zero_totals())
        self.skipped_images = saved.get("skipped_images", 0)
        self.last_row = saved.get("last_row") if main else None
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda_rng"], dist.get_env().device)
        if self.grad_scaler is not None and saved.get("grad_scaler"):  # (empty or absent: an fp32/bf16 run's)
            self.grad_scaler.load_state_dict(saved["grad_scaler"])


def _tensor_or_none(labels: np.ndarray | None) -> torch.Tensor | None:
    return None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))


def _array_or_none(labels: torch.Tensor | None) -> np.ndarray | None:
    return None if labels is None else labels.numpy()


def plain_values(values: dict) -> dict:
    """numpy scalars as Python ones (the same value; only Python's load without unpickling)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


class Checkpointer:
    """The one writer and reader of a run's checkpoints: every save (end of cycle, mid-epoch) and the
    resume. `shape`: the run's (channels, image size); `n_images`: its shard set's size."""

    def __init__(self, run_dir: Path, cfg: Config, n_images: int, shape: tuple[int, int]):
        self.run_dir, self.cfg, self.n_images, self.shape = Path(run_dir), cfg, n_images, shape

    def state_dict(self, model, body_opt, head_opt, state: RunState) -> dict:
        """Everything a resume needs: the checkpoint's content."""
        channels, image_size = self.shape
        return {
            "format": FORMAT,
            "model": model.state_dict(),
            "body_optimizer": body_opt.state_dict(),
            "head_optimizer": head_opt.state_dict() if head_opt is not None else None,
            **state.state_dict(),
            "world_size": dist.get_env().world_size,
            "batch_size": self.cfg.train.batch_size,
            "config": config_to_dict(self.cfg),
            "image_shape": [channels, image_size, image_size],
            "k": self.cfg.cluster.k,
        }

    def save(self, model, body_opt, head_opt, state: RunState) -> None:
        """Rank 0 writes the checkpoint (last.pt and a periodic file); every rank waits for it."""
        rank0_writes(self.run_dir, lambda: save_checkpoint(self.state_dict(model, body_opt, head_opt, state),
                                                              self.run_dir, self.cfg.checkpoint.keep_last))
        dist.barrier()

    def save_mid_epoch(self, model, body_opt, head_opt, state: RunState, totals: dict) -> None:
        # Every rank's running totals are summed into rank 0's copy, so the resumed run (which starts the
        # other ranks from zero) ends the cycle with the same loss as an uninterrupted one.
        self.save(model, body_opt, head_opt, dataclasses.replace(state, totals=summed_totals(totals)))

    def find_resume(self) -> tuple[str | None, dict | None]:
        """The checkpoint `resume` names, verified (its path, its content), or (None, None) for a fresh
        run; a fresh run into a directory that holds another run is refused."""
        path, ckpt, note = find_resume_checkpoint(self.cfg.resume, self.run_dir)
        if note:
            log.warning(note)
        earlier = newest_checkpoint(self.run_dir)
        if earlier is not None and (path is None or not in_run_dir(path, self.run_dir)):
            # A new run never overwrites another's work: continuing it, or a new directory, is the user's call.
            raise DcscaleError(f"output.dir {self.run_dir} already holds a run (checkpoint {earlier.name}); continue "
                               f"it with resume=auto, or give this run a new output.dir")
        return (str(path) if path else None), ckpt

    def load(self, ckpt: dict, path: Path, model, body_opt, state: RunState, world_size: int | None = None):
        """Continue from a loaded checkpoint: into `model`, `body_opt` and `state`; returns the head's
        optimizer (None when it was saved between cycles). `world_size`: the run's (default: this
        process group's)."""
        cfg = self.cfg
        check_resumable(ckpt, path, cfg, self.n_images, self.shape, world_size)
        model.reset_head(ckpt["k"])
        try:
            model.load_state_dict(ckpt["model"])
            body_opt.load_state_dict(ckpt["body_optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise DcscaleError(f"{path}: its weights do not fit this run's {cfg.model.arch} "
                               f"({load_error(err)})") from None
        model.head.to(next(model.parameters()).device)
        head_opt = None
        if ckpt.get("head_optimizer") is not None:
            head_opt = new_head_optimizer(model, cfg)
            head_opt.load_state_dict(ckpt["head_optimizer"])
        state.load_state_dict(ckpt)
        return head_opt


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
