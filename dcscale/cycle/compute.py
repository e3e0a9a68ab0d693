"""How the network runs on its device: mixed precision, memory format, SyncBatchNorm, torch.compile.

From the config's train.precision, train.channels_last, train.compile and model.sync_bn.
`check_platform` turns what this device cannot do into one line before any work; `prepare_model`
converts the network once; `ForwardSettings` is what the forward passes need (autocast, batch layout) and
`grad_scaler` the loss scaling fp16 needs (its state goes into checkpoints, so resume stays exact).

fp16 on a CPU is refused although torch's CPU autocast accepts it: CPUs without fp16 arithmetic (most
of them) run it slower than fp32, and its loss scaling exists for GPU gradients; bf16 is the CPU's
reduced precision (AVX512-BF16/AMX where present), with fp32's range and no scaler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcscale.errors import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ForwardSettings:
    """What every forward pass needs to know: the device, the autocast precision, the memory format."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> ForwardSettings:
        return cls(torch.device(device), cfg.train.precision, cfg.train.channels_last)

    def autocast(self):
        """The context the forward passes run in (a no-op for fp32)."""
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on the device (without blocking, when it comes from pinned memory), in the
        model's memory format."""
        layout = torch.channels_last if self.channels_last and images.dim() == 4 else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=layout)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def check_platform(cfg, device: torch.device, distributed: bool) -> None:
    """One line (ConfigError) for a setting this device cannot run, before any work starts."""
    device = torch.device(device)
    precision = cfg.train.precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision = 'fp16' on {device.type}: expected 'fp32' or 'bf16' here "
                          f"(fp16 needs a CUDA GPU)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision = 'bf16' on {torch.cuda.get_device_name(device)}: expected 'fp32' or "
                          f"'fp16' (this GPU has no bfloat16 arithmetic)")
    if cfg.model.sync_bn and distributed and device.type != "cuda":
        raise ConfigError(f"model.sync_bn = true with processes on {device.type}: expected false (torch's "
                          f"SyncBatchNorm runs on GPUs only)")
    if cfg.train.compile:
        check_compile(device)


def check_compile(device: torch.device) -> None:
    """torch.compile works here: a C++ compiler for CPU code, Triton for CUDA, a supported Python.
    Compiles a one-line function: what is missing fails there, not at the first batch."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2, device=device))
    except Exception as err:  # InvalidCxxCompiler, a missing Triton, an unsupported Python: all say why
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        raise ConfigError(f"train.compile = true: expected false on this machine, where torch.compile fails "
                          f"({lines[0] if lines else type(err).__name__})") from None


def prepare_model(model: torch.nn.Module, cfg, distributed: bool) -> torch.nn.Module:
    """The network converted in place for this run (its parameters stay the same objects, its
    state-dict keys the same names, so optimizers and checkpoints are unaffected)."""
    if cfg.model.sync_bn and distributed:  # (a single process has nothing to synchronise)
        model.body = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.body)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.body.compile()
    return model
