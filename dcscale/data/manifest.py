"""`manifest.json`: the list of shards in order, which fixes every sample's global index.

Global index i lives in the shard whose cumulative count range contains i, at position
i - (samples in earlier shards). Features, labels, samplers and checkpoints are keyed by it,
so a manifest is never reordered once written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dcscale.errors import DataError
from dcscale.safefile import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    name: str  # tar path, relative to the shard set directory (or absolute)
    count: int  # samples (key groups with an image) in this tar
    size: int | None = None  # tar size in bytes when written/indexed: detects truncated or replaced tars


@dataclass
class Manifest:
    version: int
    shards: list[ShardInfo]
    total: int
    has_labels: bool
    num_classes: int | None
    class_names: list[str] | None
    source: str
    image_shape: list[int] | None  # [C, H, W] when every image shares it, else None
    channels: int | None = None  # 1 or 3 when known even if sizes differ (image_shape None)
    extra: dict = field(default_factory=dict)  # free-form build details (format, split, ...)

    def shard_starts(self) -> list[int]:
        """Global index of each shard's first sample, plus the total at the end."""
        starts = [0]
        for shard in self.shards:
            starts.append(starts[-1] + shard.count)
        return starts


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_NAME


def save_manifest(manifest: Manifest, root: str | Path) -> Path:
    """Write manifest.json atomically, with a fixed key order so the bytes are reproducible."""
    path = manifest_path(root)
    atomic_write_text(path, _to_json(manifest))
    return path


def _to_json(manifest: Manifest) -> str:
    """Readable JSON with one line per shard (manifests of large sets list thousands)."""
    fields = asdict(manifest)
    lines = []
    for key, value in fields.items():
        if key == "shards":
            rows = ",\n".join("  " + json.dumps(s) for s in value)
            lines.append(f' "shards": [\n{rows}\n ]' if rows else ' "shards": []')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _need(raw: dict, key: str, types, path: Path, optional: bool = False):
    if key not in raw:
        if optional:
            return None
        raise DataError(f"{path}: missing field '{key}'")
    value = raw[key]
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        raise DataError(f"{path}: field '{key}' has an invalid value {value!r}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def load_manifest(root: str | Path) -> Manifest:
    """Read and check `root/manifest.json`; raise DataError naming the file on any problem."""
    path = manifest_path(root)
    if not Path(root).is_dir():
        raise DataError(f"shard set directory not found: {root}")
    if not path.is_file():
        raise DataError(f"no {MANIFEST_NAME} in {root} (build one with `dcscale shards`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a manifest") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")

    version = _need(raw, "version", int, path)
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format version {version} is newer than this dcscale reads ({FORMAT_VERSION})")
    shards = []
    for entry in _need(raw, "shards", list, path):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: invalid shard entry {str(entry)[:80]}")
        name = _need(entry, "name", str, path)
        count = _need(entry, "count", int, path)
        size = _need(entry, "size", int, path, optional=True)
        if count < 0:
            raise DataError(f"{path}: shard {name} has a negative count")
        shards.append(ShardInfo(name=name, count=count, size=size))
    seen: dict[str, str] = {}
    for shard in shards:  # the same file under two spellings ('a.tar', './a.tar', its absolute path) too
        where = os.path.normpath(os.path.join(os.path.abspath(root), shard.name))
        if where in seen:
            raise DataError(f"{path}: shard {shard.name} is listed twice"
                            + (f" (also as {seen[where]})" if seen[where] != shard.name else ""))
        seen[where] = shard.name

    manifest = Manifest(
        version=version,
        shards=shards,
        total=_need(raw, "total", int, path),
        has_labels=_need(raw, "has_labels", bool, path),
        num_classes=_need(raw, "num_classes", int, path, optional=True),
        class_names=_need(raw, "class_names", list, path, optional=True),
        source=_need(raw, "source", str, path, optional=True) or "",
        image_shape=_need(raw, "image_shape", list, path, optional=True),
        channels=_need(raw, "channels", int, path, optional=True),
        extra=_need(raw, "extra", dict, path, optional=True) or {},
    )
    counted = sum(s.count for s in shards)
    if manifest.total != counted:
        raise DataError(f"{path}: total is {manifest.total} but the shard counts add up to {counted}")
    if manifest.class_names is not None and manifest.num_classes is not None \
            and len(manifest.class_names) != manifest.num_classes:
        raise DataError(f"{path}: {len(manifest.class_names)} class names for {manifest.num_classes} classes")
    if manifest.image_shape is not None and (len(manifest.image_shape) != 3
                                             or not all(isinstance(v, int) and v > 0 for v in manifest.image_shape)):
        raise DataError(f"{path}: image_shape must be [C, H, W], got {manifest.image_shape!r}")
    return manifest
