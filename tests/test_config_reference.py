"""Each config key is declared once (dcscale/config_schema.py's `key(...)`), and docs/configuration.md's
key reference is generated from those declarations: it fails here when it is stale."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import pytest

from dcscale.config import RESUME_POLICIES, ConfigError, Config, all_keys, config_from_dict, declared, resume_may_change

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_reference_page_is_generated_from_the_code():
    tool = load_tool()
    page = tool.DOC.read_text()
    assert tool.rewritten(page, "docs/configuration.md") == page, \
        "docs/configuration.md's key reference is stale: run python tools/config_reference.py --write"
    assert tool.main(["--check"]) == 0
    for key in all_keys():  # every key has its row, in the table of its section
        assert re.search(rf"^\| `{re.escape(key)}` \|", page, re.M), f"{key} has no row in docs/configuration.md"


def test_write_replaces_only_the_block_and_check_sees_a_stale_one(tmp_path):
    tool = load_tool()
    page = tool.DOC.read_text()
    before, _, rest = page.partition(tool.BEGIN)
    _, _, after = rest.partition(tool.END)
    stale = tmp_path / "configuration.md"
    stale.write_text(f"{before}{tool.BEGIN}\n| `cluster.k` | int | `5` | fixed | old text |\n{tool.END}{after}")
    assert tool.main(["--check", "--doc", str(stale)]) == 1
    assert tool.main(["--write", "--doc", str(stale)]) == 0
    assert stale.read_text() == page, "the hand-written prose around the block is kept byte for byte"
    assert tool.main(["--check", "--doc", str(stale)]) == 0


def test_every_key_is_declared_with_help_check_and_resume_policy():
    for key in all_keys():
        meta = declared(key).metadata
        assert set(meta) == {"help", "check", "resume"}, f"{key} is not declared with key(...)"
        assert meta["help"].strip(), f"{key} has no help text"
        assert meta["resume"] in RESUME_POLICIES
        assert meta["check"] is None or (callable(meta["check"][0]) and meta["check"][1]), key
    for section, tp in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(tp):
            assert (tp.__doc__ or "").strip() and not tp.__doc__.startswith(tp.__name__ + "("), \
                f"section {section} has no docstring (its heading text in the reference)"


def test_help_texts_name_only_keys_that_exist():
    sections = {k.split(".")[0] for k in all_keys() if "." in k}
    for key in all_keys():
        for named in re.findall(r"\b((?:%s)\.[a-z_]+)\b" % "|".join(sections), declared(key).metadata["help"]):
            if not named.endswith(("pt", "json")):  # last.pt, manifest.json
                assert named in all_keys(), f"{key}'s help names {named}, which is not a config key"


def test_each_declared_check_refuses_with_its_own_line():
    """A declaration's check is what the loader applies: a value it refuses is one line naming the key."""
    for key, bad in (("cluster.k", 1), ("train.momentum", 1.0), ("seed", -1), ("data.std", [0.0001]),
                     ("dist.rendezvous_timeout_s", 86_401.0), ("resume", "run.ckpt")):
        allowed = declared(key).metadata["check"][1]
        with pytest.raises(ConfigError) as refused:
            config_from_dict({}, [f"{key}={bad}"])
        assert str(refused.value) == f"{key} = {bad!r} in the command line: expected {allowed}"


def test_the_resume_policy_is_the_one_runs_were_written_under():
    """Which keys a resumed run may change decides whether an old run directory can be resumed: a change
    here must be deliberate (the message of a refused resume lists these)."""
    assert resume_may_change(leave_out=("resume", "output.dir")) == (
        "data.test", "data.workers", "data.extract_batch_size", "cluster.wait_timeout_min", "train.cycles", "eval.",
        "dist.", "output.images_every", "checkpoint.")
    assert {k for k in all_keys() if declared(k).metadata["resume"] == "may change"} >= {"resume", "output.dir"}
