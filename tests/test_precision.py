"""GPU-grade settings, tested on the CPU: train.precision (autocast; bf16 runs on a CPU, fp16 is
refused there; fp16's loss scaler is checkpointed), train.channels_last, train.compile and
model.sync_bn, with the one-line errors for what this machine cannot do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import metrics, tiny_run_overrides

from dcscale.config import config_from_dict
from dcscale.data.loaders import TrainBatch
from dcscale.data.shardset import ShardSet
from dcscale.data.transforms import eval_transform
from dcscale.dist import DistEnv
from dcscale.errors import ConfigError
from dcscale.models import build_model
from dcscale.cycle import phases
from dcscale.train.checkpoint import load_checkpoint, write_checkpoint_file
from dcscale.cycle.compute import ForwardSettings, check_platform, grad_scaler, prepare_model
from dcscale.train.checkpoint import Checkpointer, RunState

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN_YAML = Path(__file__).parent / "train_test.yaml"


def _cfg(**train_and_model):
    model = {k: train_and_model.pop(k) for k in ("sync_bn",) if k in train_and_model}
    return config_from_dict({"model": {"arch": "lenet5", **model}, "cluster": {"k": 10}, "train": train_and_model})


def _lenet(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lenet5", in_channels=1, image_size=32, num_classes=10)


def _dtypes_of(module: torch.nn.Module, seen: list):
    return module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


def _train(cmd_overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcscale", "train", "--config", str(TRAIN_YAML), *cmd_overrides]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


# ---- config and platform -------------------------------------------------------------------------

def test_new_keys_are_typed_and_default_off():
    cfg = _cfg()
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile, cfg.model.sync_bn) == \
        ("fp32", False, False, False)
    with pytest.raises(ConfigError, match=r"^train.precision = 'fp8' in config: expected one of 'fp32', 'bf16', "
                                          r"'fp16'$"):
        _cfg(precision="fp8")
    with pytest.raises(ConfigError, match="train.channels_last = 'yes' in config: expected true/false"):
        _cfg(channels_last="yes")


def test_fp16_on_a_cpu_is_one_line_naming_the_key_and_what_is_allowed(digits_train_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train.precision = 'fp16' on cpu: expected 'fp32' or 'bf16' here"):
        check_platform(_cfg(precision="fp16"), torch.device("cpu"), distributed=False)
    check_platform(_cfg(precision="bf16"), torch.device("cpu"), distributed=False)  # bf16 is fine on a CPU
    proc = _train(tiny_run_overrides(digits_train_shards, tmp_path / "run", **{"train.precision": "fp16"}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("dcscale: error: train.precision = 'fp16' on cpu: expected "
                                                    "'fp32' or 'bf16' here (fp16 needs a CUDA GPU)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sync_bn_across_cpu_processes_is_refused_and_converts_under_ddp():
    with pytest.raises(ConfigError, match=r"model.sync_bn = true with processes on cpu: expected false"):
        check_platform(_cfg(sync_bn=True), torch.device("cpu"), distributed=True)
    check_platform(_cfg(sync_bn=True), torch.device("cpu"), distributed=False)  # one process: nothing to sync

    model = _lenet()
    params, keys = list(model.parameters()), list(model.state_dict())
    prepare_model(model, _cfg(sync_bn=True), distributed=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # the optimizer built before and the checkpoints written before still fit
    assert all(a is b for a, b in zip(params, model.parameters())) and list(model.state_dict()) == keys
    single = prepare_model(_lenet(), _cfg(sync_bn=True), distributed=False)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in single.modules())


def test_compile_without_a_working_compiler_is_one_line(digits_train_shards, tmp_path):
    env = {**ENV, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cmd = [sys.executable, "-m", "dcscale", "train", "--config", str(TRAIN_YAML),
           *tiny_run_overrides(digits_train_shards, tmp_path / "run", **{"train.compile": "true"})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dcscale: error: train.compile = true: expected false on this machine, where "
                           "torch.compile fails (") and "compiler" in last


def test_compiled_body_gives_the_eager_features():
    x = torch.randn(8, 1, 32, 32)
    eager = _lenet().eval()
    compiled = prepare_model(_lenet().eval(), _cfg(compile=True), distributed=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled.features(x), eager.features(x), rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unaffected


def test_channels_last_model_and_batches():
    model = prepare_model(_lenet().eval(), _cfg(channels_last=True), distributed=False)
    assert model.body.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 32, 32)
    batch = ForwardSettings(channels_last=True).batch(x)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model.features(batch), _lenet().eval().features(x), rtol=1e-4, atol=1e-5)


# ---- autocast in extraction and training ---------------------------------------------------------

def test_bf16_extraction_runs_under_autocast_and_hands_float32_features(digits_train_shards):
    shards, tf = ShardSet(digits_train_shards), eval_transform(32, 1)
    model = _lenet().eval()
    seen: list = []
    hook = _dtypes_of(model.body.features.conv1, seen)
    _, fp32, _ = phases.extract_features(model.features, shards, tf, DistEnv(), batch_size=256, workers=0)
    assert set(seen) == {torch.float32}
    seen.clear()
    _, bf16, _ = phases.extract_features(model.features, shards, tf, DistEnv(), batch_size=256, workers=0,
                                         compute=ForwardSettings(precision="bf16"))
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # the convolutions ran in bf16
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.05  # bf16's ~3 significant digits


def _batches(n: int, seed: int = 0, poison: bool = False) -> list[TrainBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(16, 1, 32, 32, generator=g)
        if poison:
            images[0, 0, 0, 0] = float("nan")
        labels = torch.randint(0, 10, (16,), generator=g)
        out.append(TrainBatch(images, labels, torch.arange(16), 0))
    return out


def _steps(model, compute=None, scaler=None, batches=None) -> dict:
    optimizers = [torch.optim.SGD(model.body_parameters(), lr=0.1, momentum=0.9),
                  torch.optim.SGD(model.head_parameters(), lr=0.1)]
    return phases.train_steps(model, batches or _batches(3), optimizers, DistEnv(), 0, lambda *_: None,
                              {"loss_sum": 0.0, "correct": 0, "seen": 0}, compute, scaler)


def test_bf16_training_steps_run_under_autocast():
    model = _lenet()
    seen: list = []
    _dtypes_of(model.body.features.conv1, seen)
    totals = _steps(model, ForwardSettings(precision="bf16"))
    assert set(seen) == {torch.bfloat16} and totals["seen"] == 48 and np.isfinite(totals["loss_sum"])


def test_loss_scaler_path_takes_the_same_sgd_steps():
    # scaling by a power of two and unscaling again is exact: fp16's path changes no fp32 step
    plain, scaled = _lenet(), _lenet()
    a = _steps(plain)
    b = _steps(scaled, scaler=torch.amp.GradScaler("cpu"))
    assert a == b
    for (name, p), q in zip(plain.state_dict().items(), scaled.state_dict().values()):
        assert torch.equal(p, q), name


def test_non_finite_loss_with_a_loss_scaler_stops_at_its_step():
    with pytest.raises(phases.NonFiniteLoss) as err:
        _steps(_lenet(), scaler=torch.amp.GradScaler("cpu"), batches=_batches(2, poison=True))
    assert err.value.step == 0


def test_loss_scaler_state_is_checkpointed_and_restored(tmp_path):
    cfg = _cfg(precision="fp16")
    model = _lenet()
    body_opt = torch.optim.SGD(model.body_parameters(), lr=0.1, momentum=0.9)
    scaler = grad_scaler("fp16", torch.device("cpu"))
    scaler.load_state_dict({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 7})  # as after a backoff and 7 good steps
    path = tmp_path / "last.pt"
    checkpointer = Checkpointer(tmp_path, cfg, 100, (1, 32))
    write_checkpoint_file(checkpointer.state_dict(model, body_opt, None, RunState(grad_scaler=scaler)), path)
    ckpt = load_checkpoint(path)  # weights_only: the scaler's state is plain values
    fresh = _lenet(seed=1)
    state = RunState(grad_scaler=grad_scaler("fp16", torch.device("cpu")))
    checkpointer.load(ckpt, path, fresh, torch.optim.SGD(fresh.body_parameters(), lr=0.1), state)
    assert state.grad_scaler.state_dict() == scaler.state_dict()
    assert state.grad_scaler.get_scale() == 1024.0
    state = RunState(grad_scaler=grad_scaler("fp32", torch.device("cpu")))
    Checkpointer(tmp_path, _cfg(), 100, (1, 32)).load(ckpt, path, fresh, torch.optim.SGD(fresh.body_parameters(),
                                                                                          lr=0.1), state)
    assert state.grad_scaler is None  # fp32 needs none


def test_bf16_channels_last_run_on_cpu_resumes_exactly(digits_train_shards, tmp_path):
    extra = {"train.precision": "bf16", "train.channels_last": "true", "checkpoint.every_steps": 10}
    whole = _train(tiny_run_overrides(digits_train_shards, tmp_path / "whole", **extra))
    assert whole.returncode == 0, whole.stderr[-3000:]
    rows = metrics(tmp_path / "whole")
    assert [r["cycle"] for r in rows] == [0, 1] and all(np.isfinite(r["loss"]) for r in rows)
    mid = tmp_path / "whole" / "checkpoints" / "cycle00001_epoch000_step00000020.pt"
    assert mid.is_file()
    resumed = _train(tiny_run_overrides(digits_train_shards, tmp_path / "resumed", **extra) + [f"resume={mid}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = metrics(tmp_path / "resumed")[-1]
    assert last["cycle"] == 1 and last["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "whole" / "labels.npy"),
                                  np.load(tmp_path / "resumed" / "labels.npy"))
