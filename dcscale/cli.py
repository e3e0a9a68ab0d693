"""The `dcscale` command: one subcommand per job, each implemented in the module that owns it.

Every subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their subcommand runs, so `dcscale config` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dcscale.errors import DcscaleError

SUBCOMMANDS = {
    "config": ("dcscale.config", "print the resolved config, or why it is invalid"),
    "shards": ("dcscale.data.build", "build or index a WebDataset shard set"),
    "train": ("dcscale.train.run", "run DeepCluster (plainly, or under torchrun / submitit)"),
    "probe": ("dcscale.eval.probe", "linear-probe evaluation of a network's layers"),
    "ia": ("dcscale.eval.ia", "sample Initial Alignment distributions over a hyperparameter"),
    "report": ("dcscale.eval.report", "plot a run's curves from metrics.jsonl"),
    "export": ("dcscale.export", "write a trained network for torchvision or as a dcscale backbone"),
    "embed": ("dcscale.eval.embed", "write a layer's features of every image of a shard set"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="dcscale", description="DeepCluster at scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module whose subcommand is asked for: `dcscale --help` lists the subcommands
        # without importing any of them (torch alone takes seconds to import).
        if wanted == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    logging.basicConfig(level=logging.WARNING, format="dcscale: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dcscale").setLevel(logging.INFO)
    try:
        parser, modules = build_parser()
        args = parser.parse_args(sys.argv[1:])
        if not args.command:
            parser.print_help()
            return 2
        return int(modules[args.command].run(args) or 0)
    except DcscaleError as err:
        print(f"dcscale: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
