"""The run configuration: YAML loading, `key.sub=value` overrides, validation, against the schema of
`dcscale.config_schema` (its sections and keys; re-exported here).

`load_config(path, overrides)` returns a validated `Config` or raises `ConfigError` with one line
that names the key, the file and what is allowed. `dump_config(cfg)` writes YAML that
`load_config` reads back to the same `Config`, so a run directory's `config.yaml` reproduces it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

# The schema (sections and keys) lives in config_schema; its public names are re-exported here.
from dcscale.config_schema import (  # noqa: F401
    ARCHS, MAX_TIMEOUT_MIN, MIN_STD, RESUME_POLICIES, CheckpointConfig, ClusterConfig, Config, DataConfig, DistConfig,
    EvalConfig, ModelConfig, OutputConfig, TrainConfig, default_of)
from dcscale.errors import ConfigError
from dcscale.safefile import write_new_text


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache  # (resolving the string annotations is the slow part of reading a config)
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp)]
        return " or ".join(p for p in parts)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return "a list of " + {int: "integers", float: "finite numbers"}.get(inner, _describe(inner))
    return {int: "an integer", float: "a finite number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming the key and what is allowed."""
    origin = typing.get_origin(tp)
    bad = _Invalid(key, value, source, tp)  # (its message, the value's repr included, is built only when shown)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        if number is None or not math.isfinite(number):  # inf and NaN only fail later, deep in a run
            raise bad
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


class _Invalid(ConfigError):
    """`key = value in source: expected <type>`: the message is formatted when it is shown, so valid
    values (tried against each type of a union) never pay for their repr."""

    def __init__(self, key: str, value: Any, source: str, tp):
        super().__init__()
        self.key, self.value, self.source, self.tp = key, value, source, tp

    def __str__(self) -> str:
        return f"{self.key} = {_shown(self.value)} in {self.source}: expected {_describe(self.tp)}"


def _shown(value: Any) -> str:
    """A value's repr, cut short when it is long (a config value is a few characters; a hostile one need not be)."""
    shorten = reprlib.Repr()
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = 8
    shorten.maxstring = shorten.maxother = 80
    shorten.maxlevel = 3
    text = shorten.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _unknown_key(key: str, valid: list[str], source: str) -> ConfigError:
    in_section = [v for v in valid if v.startswith(key + ".")]
    if in_section:  # e.g. 'cluster=5'
        return ConfigError(f"'{key}' in {source} is a config section, not a key: set one of its keys, "
                           f"e.g. {in_section[0]}=...")
    # Suggest among keys of the same depth: a section for a section, a leaf for a leaf.
    depth = key.count(".")
    names = sorted({".".join(v.split(".")[: depth + 1]) for v in valid if v.count(".") >= depth})
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if not close and depth:  # right leaf name under a wrong section, e.g. 'train.k'
        leaf = key.rsplit(".", 1)[-1]
        close = [v for v in names if v.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def declared(key: str) -> dataclasses.Field:
    """The field that declares a dotted key: its metadata holds the key's help, check and resume policy."""
    cls = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = _type_hints(cls)[section]
    return _fields(cls)[name]


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'cluster.k'."""
    keys = []
    hints = _type_hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _build(cls, raw: dict, source: str, prefix: str = "", from_cli: frozenset = frozenset()):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source}: expected a mapping, got {_shown(raw)}")
    hints = _type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown_key(key, all_keys(), source)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, source, key + ".", from_cli)
        else:
            kwargs[name] = _coerce(value, tp, key, "the command line" if key in from_cli else source)
    return cls(**kwargs)


def _check_ranges(cfg: Config, source: str, from_cli: frozenset = frozenset()) -> None:
    def where(key: str) -> str:
        return "the command line" if key in from_cli else source

    for key in all_keys():
        value = get_key(cfg, key)
        check = declared(key).metadata["check"]
        if value is None or check is None:
            continue
        ok, allowed = check
        if not ok(value):
            raise ConfigError(f"{key} = {value!r} in {where(key)}: expected {allowed}")
    if cfg.data.mean is not None and cfg.data.std is not None and len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError(f"data.mean and data.std in {where('data.std')}: expected lists of the same length")


def get_key(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """'cluster.k=500' -> ('cluster.k', 500); the value is parsed as YAML (null, true, 0.05, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. cluster.k=500")
    key, _, value = text.partition("=")
    key = key.strip()
    try:
        parsed = _load_yaml(value, f"override '{key}'") if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def parse_value_list(spec: str, option: str, example: str) -> tuple[str, list]:
    """'cluster.k=10,50' -> ('cluster.k', [10, 50]) for --vary/--grid; each value parsed as YAML."""
    if "=" not in spec:
        raise ConfigError(f"{option} '{spec}': expected KEY=V1,V2,..., e.g. {example}")
    key, _, values = spec.partition("=")
    key = key.strip()
    if key not in all_keys():
        raise ConfigError(f"{option} '{spec}': unknown config key '{key}'")
    parsed = [parse_override(f"{key}={v.strip()}")[1] for v in values.split(",") if v.strip()]
    if not parsed:
        raise ConfigError(f"{option} '{spec}': no values")
    return key, parsed


def format_value(value: Any) -> str:
    """A value as written in a key=value override (YAML: null, true, 0.05)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _set_nested(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise _unknown_key(key, all_keys(), source)
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> Config:
    raw = dict(raw or {})
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    from_cli = set()
    for text in overrides:
        key, value = parse_override(text)
        if key not in all_keys():
            raise _unknown_key(key, all_keys(), "the command line")
        _set_nested(raw, key, value, "the command line")
        from_cli.add(key)
    cfg = _build(Config, raw, source, from_cli=frozenset(from_cli))
    _check_ranges(cfg, source, frozenset(from_cli))
    return cfg


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.mark = key, mark


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


MAX_YAML_NODES = 100_000  # a config has a few hundred values; aliases may not expand it beyond this


def _load_yaml(text: str, where: str):
    """YAML as the config loader reads it (duplicate keys refused), with its size bounded: aliases are
    counted as what they expand to, so a few hundred bytes of nested aliases ("billion laughs") are one
    line, not the whole memory. A structure deeper than Python's recursion limit is one line too."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _check_expanded_size(root, where: str) -> None:
    """Raise ConfigError when the document, aliases expanded, has more than MAX_YAML_NODES nodes, or
    refers to itself (iterative: a deep document cannot exhaust the stack here)."""
    size: dict[int, int] = {}  # id(node) -> expanded size, once known
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[key] = 1
            continue
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"{where}: its aliases expand to more than {MAX_YAML_NODES:,} values; a config "
                                  f"is far smaller (refused, as a YAML bomb would be)")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ConfigError(f"{where}: an alias refers to the collection that holds it (a config cannot be "
                              f"infinite)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _read_yaml(path: Path):
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8); expected a YAML config") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes); expected a YAML config")
    try:
        return _load_yaml(text, str(path))
    except _DuplicateKey as err:
        raise ConfigError(f"{path} (line {err.mark.line + 1}): key '{err.key}' is given twice in the same "
                          f"section") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a config; raise ConfigError with one clear line on bad input."""
    raw: dict = {}
    source = "the command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return config_from_dict(raw, overrides, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path, footer: str = "") -> None:
    """Write the resolved config atomically (the run directory's config.yaml), then `footer`
    (YAML comments)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_new_text(tmp, dump_config(cfg) + footer)  # (never through a link planted at the temporary name)
    tmp.replace(path)


def resume_may_change(leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The keys declared resume="may change" (they extend the run or only watch it, never what it computes),
    less `leave_out`, in schema order; a section whose keys all may change is named as a whole ("eval.")."""
    keys = [k for k in all_keys() if declared(k).metadata["resume"] == "may change" and k not in leave_out]
    named = []
    for k in keys:
        section = k.rpartition(".")[0]
        if section and all(s in keys for s in all_keys() if s.startswith(section + ".")):
            k = section + "."
        if k not in named:
            named.append(k)
    return tuple(named)


_PATH_KEYS = ("data.train", "data.test", "model.init", "output.dir")
_MISSING = object()


def resume_differences(saved: dict, cfg: Config) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(allowed, refused): the (key, old, new) of every key whose value in `cfg` differs from a run's
    `saved` config (config_to_dict form). Keys the saved config lacks (added to dcscale since) are
    skipped; a path that names the same file in another way is the same value."""
    allowed, refused = [], []
    for key in all_keys():
        node = saved
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        new = get_key(cfg, key)
        if node is _MISSING or node == new or (key in _PATH_KEYS and _same_path(node, new)):
            continue
        may_change = declared(key).metadata["resume"] == "may change"
        (allowed if may_change else refused).append((key, node, new))
    return allowed, refused


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


# ---- `dcscale config FILE [key=value ...]` ---------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0
