"""The checkpoint file: what it holds, written with its checksum, read back verified. Training writes
and resumes it (dcscale.train.checkpoint adds the run directory's layout); export, the probe, embed,
IA and `load_backbone` read it through `load_checkpoint` alone (dcscale.cycle.network).

A checkpoint holds only tensors and dicts/lists of plain values, and is read with
`torch.load(weights_only=True)`: a crafted file cannot run code when read, it is refused. It also
holds the sha256 of its content, checked on load: a damaged file is refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import zlib
from pathlib import Path

import torch

from dcscale.errors import DcscaleError
from dcscale.safefile import atomic_write


FORMAT = 2  # 2: weights_only-loadable, with a content checksum


DIGEST_KEY = "sha256"


class CheckpointError(DcscaleError):
    """A checkpoint file that cannot be used: missing, unreadable, damaged or refused."""


def content_digest(obj) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes, every plain value."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):  # (weights_only keeps tuples, but a list is the same content)
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:  # only tensors and plain values load under weights_only
        raise TypeError(f"checkpoint value of type {type(obj).__name__} is not a tensor or a plain value")


def _on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def serialize(state: dict) -> bytes:
    """The bytes of a checkpoint file: `state` (on the CPU) plus the checksum of its content."""
    state = _on_cpu(state)
    state[DIGEST_KEY] = content_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_checkpoint_file(state: dict, path: Path) -> None:
    data = serialize(state)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's content, read without unpickling anything but tensors and plain values.

    The content checksum is verified; a training checkpoint (one with a format or an optimizer state)
    must have one (a file made elsewhere for model.init may not). When the file does not load, the CRC32
    of every member of the zip archive torch.save writes tells damage (a flipped bit: "checksum
    mismatch") from a file that is whole but refused. The fields dcscale reads must have their types.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:
        _check_archive(path)  # a flipped bit in the pickle can read as any object's name: damage first
        detail = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if detail:
            raise CheckpointError(f"{path}: refused: it holds a Python object ({detail.group(1)}) that loading would "
                                  f"call, not only tensors and plain values") from None
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({_first_line(err)})") from None
    except Exception as err:  # a truncated, damaged or foreign file: say which, not a traceback
        _check_archive(path)
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a dcscale checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    digest = ckpt.pop(DIGEST_KEY, None)
    if digest is None and ("format" in ckpt or "body_optimizer" in ckpt):
        raise CheckpointError(f"{path}: refused: a training checkpoint without its checksum (written or re-saved "
                              f"by something other than dcscale); it cannot be verified")
    if digest is not None and (not isinstance(digest, str) or content_digest(ckpt) != digest):
        raise CheckpointError(f"{path}: damaged: its content does not match the checksum written with it")
    _check_fields(ckpt, path)
    return ckpt


def _check_archive(path: Path) -> None:
    """CheckpointError when `path` is a zip archive (torch.save's format) whose members do not match
    their CRC32; anything else (not a zip at all) is left to torch.load to judge."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error):
        return
    if bad is not None:
        raise CheckpointError(f"{path}: damaged: checksum mismatch in its member {bad} (a changed or lost bit)")


def _whole(minimum: int):
    return lambda v: type(v) is int and v >= minimum


def _tensor(dtype_ok, dims: int | None = None):
    return lambda v: isinstance(v, torch.Tensor) and dtype_ok(v.dtype) and (dims is None or v.dim() == dims)


def _optional(check):
    return lambda v: v is None or check(v)


def _int_dtype(dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


_RNG_BYTES = torch.get_rng_state().numel()


# What dcscale reads from a checkpoint: key -> (check, what is expected). A key that is absent is left
# to the reader (a model.init file holds only some of them).
_FIELDS = {
    "format": (lambda v: _whole(0)(v) or isinstance(v, str), "a format number or name"),
    "cycle": (_whole(0), "an integer >= 0"),
    "epoch": (_whole(0), "an integer >= 0"),
    "step": (_whole(0), "an integer >= 0"),
    "clustered_this_cycle": (lambda v: type(v) is bool, "true or false"),
    "model": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                    for k, t in v.items()), "a dict of named tensors"),
    "body_optimizer": (lambda v: isinstance(v, dict), "an optimizer state (a dict)"),
    "head_optimizer": (_optional(lambda v: isinstance(v, dict)), "an optimizer state (a dict) or None"),
    "labels": (_optional(_tensor(_int_dtype, 1)), "a 1-d integer tensor or None"),
    "prev_labels": (_optional(_tensor(_int_dtype, 1)), "a 1-d integer tensor or None"),
    "cycle_metrics": (lambda v: isinstance(v, dict), "a dict"),
    "totals": (lambda v: isinstance(v, dict) and set(v) == {"loss_sum", "correct", "seen"} and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()), "the loss_sum, correct and "
        "seen counts"),
    "skipped_images": (_whole(0), "an integer >= 0"),
    "grad_scaler": (_optional(lambda v: isinstance(v, dict)), "a dict or None"),
    "rng": (lambda v: _tensor(lambda d: d == torch.uint8, 1)(v) and v.numel() == _RNG_BYTES,
            f"a random generator state ({_RNG_BYTES} bytes)"),
    "cuda_rng": (_optional(_tensor(lambda d: d == torch.uint8, 1)), "a CUDA generator state or None"),
    "world_size": (_whole(1), "an integer >= 1"),
    "batch_size": (_whole(1), "an integer >= 1"),
    "config": (lambda v: isinstance(v, dict), "a config (a dict of sections)"),
    "image_shape": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_whole(1)(x) for x in v),
                    "[channels, height, width]"),
    "k": (_whole(2), "an integer >= 2"),
    "last_row": (_optional(lambda v: isinstance(v, dict) and _whole(0)(v.get("cycle"))), "a metrics row or None"),
}


def _check_fields(ckpt: dict, path: Path) -> None:
    for key, (ok, expected) in _FIELDS.items():
        if key in ckpt and not ok(ckpt[key]):
            value = ckpt[key]
            shown = f"a {type(value).__name__}" if isinstance(value, (dict, list, tuple, torch.Tensor)) else repr(value)
            raise CheckpointError(f"{path}: refused: its field '{key}' is {shown[:60]}, expected {expected}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(". ")[0]


def load_error(err: Exception) -> str:
    """The telling line of a load_state_dict error (its first line only names the model)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
