"""What a run's inputs must pass before anything starts: `dcscale train` (quick checks), `dcscale train
--check` and the launchers (launch/torchrun.sh, launch/slurm.py, tools/sweep.py: thorough, by the same
code as training's start). Lives with training so that `dcscale train` does not import the launchers'
submitit."""

from __future__ import annotations

from pathlib import Path

from dcscale.config import Config
from dcscale.data.manifest import Manifest, load_manifest
from dcscale.errors import DcscaleError


def check_run_inputs(cfg: Config, source: str, on_this_machine: bool = True, world_size: int = 1,
                     thorough: bool = True, run_dir_checks: bool = True) -> Manifest:
    """Fail with one line on inputs a run would only trip over after start-up. Quick checks first: the
    shard sets (their manifests), the resume and init checkpoints present, k-NN settings the memory
    bank cannot hold, and, when the run starts on this machine (not a SLURM login node), the
    process-group backend. `thorough` (what `dcscale train --check` and the launchers run): then
    everything the start of training opens, by the same code (`dcscale.train.start.check_start`): the
    tars against the manifest, the network built for the images (image size, mean/std, K, pca_dim
    against its feature width), the checkpoints loaded and verified, platform options for `world_size`
    processes, and the run directory not held by a live run (`run_dir_checks`).
    Returns the training set's manifest."""
    if not cfg.data.train:
        raise DcscaleError(f"data.train is not set in {source} or on the command line: give the training shard "
                           f"set, e.g. data.train=data/digits/train")
    train = _manifest("data.train", cfg.data.train)
    if cfg.data.test:
        _manifest("data.test", cfg.data.test)
    if cfg.eval.knn_every and cfg.data.test and cfg.eval.knn_k > train.total:
        raise DcscaleError(f"eval.knn_k = {cfg.eval.knn_k} is more than the {train.total} images of data.train, "
                           f"the k-NN monitor's memory bank: use at most {train.total}")
    for key, path in (("resume", cfg.resume), ("model.init", cfg.model.init)):
        if path not in (None, "auto") and not Path(path).is_file():
            raise DcscaleError(f"{key}: checkpoint not found: {path}")
    if on_this_machine:
        from dcscale.dist import check_backend  # (imports torch)

        check_backend(cfg.dist.backend)
    if thorough:
        from dcscale.train.start import check_start  # (imports torch)

        check_start(cfg, world_size, on_this_machine=on_this_machine, run_dir_checks=run_dir_checks)
    return train


def _manifest(key: str, root: str) -> Manifest:
    try:
        return load_manifest(root)
    except DcscaleError as err:
        raise type(err)(f"{key}: {err}") from None
