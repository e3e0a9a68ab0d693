#!/usr/bin/env python
"""Write the key reference of docs/configuration.md from the declarations in dcscale/config_schema.py.

Every key is declared once there (`key(default, help, check, resume)`); this tool renders the
declarations as one table per section between `<!-- config_reference -->` and
`<!-- /config_reference -->`, leaving the page's hand-written prose around the block as it is.

    python tools/config_reference.py            # print the block
    python tools/config_reference.py --write    # rewrite the block in docs/configuration.md
    python tools/config_reference.py --check    # exit 1 when the page's block is stale

tests/test_config_reference.py fails when the page is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from dcscale.config import Config, all_keys, declared, default_of, format_value

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- config_reference -->", "<!-- /config_reference -->"
BLOCK = re.compile(rf"({re.escape(BEGIN)}\n).*?({re.escape(END)})", re.S)


def type_name(tp) -> str:
    """An annotation as the reference shows it: `int or null`, `fp32`, `bf16` or `fp16`, `list of float`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        shown = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(shown + (["null"] if type(None) in args else []))
    if origin is Literal:
        names = [f"`{a}`" for a in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    if origin is list:
        return "list of " + type_name(typing.get_args(tp)[0])
    return tp.__name__


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(key: str, tp) -> str:
    declaration = declared(key)
    meta = declaration.metadata
    described = meta["help"]
    if meta["check"] is not None:
        described += f" Must be {meta['check'][1]}."
    cells = [f"`{key}`", type_name(tp), f"`{format_value(default_of(declaration))}`", meta["resume"], described]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def reference() -> str:
    """The generated block's body: one table per section, the top-level keys first."""
    header = ["| key | type | default | on resume | meaning |", "|---|---|---|---|---|"]
    hints = typing.get_type_hints(Config)
    top = [name for name, tp in hints.items() if not dataclasses.is_dataclass(tp)]
    sections = [("Top level", Config, top, "")]
    sections += [(f"`{name}`", tp, list(typing.get_type_hints(tp)), name + ".")
                 for name, tp in hints.items() if dataclasses.is_dataclass(tp)]
    lines = ["Generated from `dcscale/config_schema.py` by `python tools/config_reference.py --write`; edit the",
             "declarations there, not this table. \"on resume\": whether a resumed run may change the key",
             "(keys that extend or only watch the run) or must keep the run's value.", ""]
    for title, cls, names, prefix in sections:
        section_hints = typing.get_type_hints(cls)
        doc = [cls.__doc__.strip()] if prefix else ["The keys outside any section."]
        lines += [f"### {title}", "", *doc, "", *header]
        lines += [_row(prefix + name, section_hints[name]) for name in names]
        lines.append("")
    assert sum(line.startswith("| `") for line in lines) == len(all_keys()), "a key is missing from the reference"
    return "\n".join(lines)


def rewritten(text: str, where: str) -> str:
    """`text` with the block's body replaced by the reference (the rest kept byte for byte)."""
    if len(BLOCK.findall(text)) != 1:
        raise SystemExit(f"config_reference: error: {where} needs exactly one {BEGIN} ... {END} block")
    return BLOCK.sub(lambda m: m.group(1) + reference() + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the block in the page")
    action.add_argument("--check", action="store_true", help="exit 1 when the page's block differs from the code")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the page (default: {DOC.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(reference())
        return 0
    text = args.doc.read_text()
    new = rewritten(text, str(args.doc))
    if args.check:
        if new != text:
            print(f"{args.doc}: the config reference is stale; run python tools/config_reference.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.doc.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
