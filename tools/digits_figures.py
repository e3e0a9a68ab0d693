#!/usr/bin/env python
"""The digits numbers of docs/evaluation.md, measured again in one command: the demo's output, IA and
probe tables.

    .venv/bin/python tools/digits_figures.py --doc            # measure and rewrite docs/evaluation.md
    .venv/bin/python tools/digits_figures.py --doc FILE.md    # ... or another file with the blocks
    .venv/bin/python tools/digits_figures.py                  # measure and print the markdown

1. The demo, as `make demo` runs it (configs/digits_demo.yaml under torchrun with 2 processes,
   OMP_NUM_THREADS=1), in OUT/demo: its last cycle line, NMI curves and summary line.
2. Initial Alignment over 20 random initialisations for K in 10, 50, 100 (`dcscale ia`):
   OUT/ia/ia.json and OUT/ia/ia_boxplot.png.
3. Linear probes per layer (`dcscale probe`, the config's eval.probe_* settings): raw pixels (8x8 as
   stored, and the network's 32x32 input), the randomly initialised LeNet-5, and the network after
   the demo run.
The digits shard sets are built in OUT/data as `make demo` builds them, unless --data names a
directory holding train/ and test/. A step whose output is already in OUT is not run again:
remove OUT to measure everything afresh. With --doc (alias --readme), each block between
`<!-- digits_figures:NAME -->` and `<!-- /digits_figures:NAME -->` (NAME: demo, ia, probe) is
replaced; otherwise the blocks are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits_demo.yaml"
DEMO_RUN_DIR = "runs/digits_demo"  # where `make demo` writes: the paths the docs show
DOC = ROOT / "docs" / "evaluation.md"  # the page that holds the digits_figures blocks
BLOCKS = ("demo", "ia", "probe")


def dcscale(*args: str, nproc: int = 1, log: Path | None = None) -> None:
    """Run a dcscale command (under torchrun for nproc > 1), OMP_NUM_THREADS=1 unless set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    print("$ dcscale " + " ".join(args), flush=True)
    out = open(log, "w") if log is not None else None
    try:
        subprocess.run([*launcher, "-m", "dcscale", *args], check=True, env=env, cwd=ROOT, stdout=out)
    finally:
        if out is not None:
            out.close()


def ensure_data(data: Path) -> tuple[Path, Path]:
    for split in ("train", "test"):
        if not (data / split / "manifest.json").is_file():
            dcscale("shards", "digits", "--split", split, "--out", str(data / split))
    return data / "train", data / "test"


def _elide(line: str, head: int = 10, tail: int = 3) -> str:
    """'NMI(t-1, t) by cycle: a b c ...' with only the first and last values of a long curve."""
    label, _, values = line.partition(": ")
    values = values.split()
    if len(values) > head + tail + 1:
        values = values[:head] + ["..."] + values[-tail:]
    return f"{label}: {' '.join(values)}"


def demo_block(out: Path, train: Path, test: Path, nproc: int, overrides: list[str]) -> tuple[str, list[dict]]:
    """The demo's closing output lines (as `make demo` prints them) and its metrics rows."""
    run_dir = out / "demo"
    log = out / "demo.log"
    finished = log.is_file() and "dcscale train: done" in log.read_text()
    if not (finished and (run_dir / "metrics.jsonl").is_file()):
        # a run this tool left unfinished, or whose directory is gone: measure from scratch, and the
        # probe of its network again
        shutil.rmtree(run_dir, ignore_errors=True)
        (out / "probe" / "after_demo.json").unlink(missing_ok=True)
        dcscale("train", "--config", str(DEMO), f"data.train={train}", f"data.test={test}",
                f"output.dir={run_dir}", *overrides, nproc=nproc, log=log)
    lines = log.read_text().replace(str(run_dir), DEMO_RUN_DIR).splitlines()
    last_cycle = [line for line in lines if line.startswith("cycle ")][-1]
    curves = [_elide(line) for line in lines if line.startswith("NMI(")]
    done = next(line for line in lines if line.startswith("dcscale train: done"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return "\n".join(["```", last_cycle, *curves, done, "```"]), rows


def ia_block(out: Path, train: Path, seeds: int, ks: str, overrides: list[str]) -> str:
    if not (out / "ia.json").is_file():
        dcscale("ia", "--config", str(DEMO), "--vary", f"cluster.k={ks}", "--seeds", str(seeds),
                "--out", str(out), f"data.train={train}", *overrides)
    result = json.loads((out / "ia.json").read_text())
    summary = result["summary"]
    lines = ["| K | median IA | IQR (q1 - q3) | min | max | seeds |", "|---|---|---|---|---|---|"]
    for value, s in summary.items():
        lines.append(f"| {value} | {s['median']:.3f} | {s['q1']:.3f} - {s['q3']:.3f} | {s['min']:.3f} | "
                     f"{s['max']:.3f} | {s['n']} |")
    widest = max(summary, key=lambda v: summary[v]["q3"] - summary[v]["q1"])
    rec = result["recommendation"]
    lines.append(f"\nK={rec['value']} has the highest median IA ({rec['median_ia']:.3f}, the recommendation); "
                 f"K={widest} has the widest interquartile range.")
    return "\n".join(lines)


def probe(out_json: Path, train: Path, test: Path, *args: str) -> dict:
    if not out_json.is_file():
        dcscale("probe", "--train", str(train), "--test", str(test), "--json", str(out_json), *args)
    return json.loads(out_json.read_text())["layers"]


def probe_block(out: Path, train: Path, test: Path, checkpoint: Path, demo_rows: list[dict],
                probe_args: list[str]) -> str:
    common = ["--config", str(DEMO)]
    pixels_native = probe(out / "pixels_8x8.json", train, test, "--layer", "pixels", *probe_args)
    pixels_32 = probe(out / "pixels_32x32.json", train, test, "--layer", "pixels", *common, *probe_args)
    random = probe(out / "random_init.json", train, test, "--random-init", "--layer", "all,features", *common,
                   *probe_args)
    trained = probe(out / "after_demo.json", train, test, "--checkpoint", str(checkpoint),
                    "--layer", "all,features", *probe_args)
    lines = ["| features | dim | random init | after demo run |", "|---|---|---|---|"]
    for name, res in (("raw pixels 8x8", pixels_native["pixels"]), ("raw pixels 32x32", pixels_32["pixels"])):
        lines.append(f"| {name} | {res['dim']} | {100 * res['top1']:.1f} | - |")
    for layer, res in random.items():
        lines.append(f"| {layer} | {res['dim']} | {100 * res['top1']:.1f} | {100 * trained[layer]['top1']:.1f} |")
    gains = {layer: 100 * (trained[layer]["top1"] - random[layer]["top1"]) for layer in random}
    conv = [g for layer, g in gains.items() if layer != "features"]
    best = max(trained, key=lambda layer: trained[layer]["top1"])
    text = (f"\nTraining changes the conv layers' probes by {min(conv):+.1f} to {max(conv):+.1f} points and the "
            f"clustered features' by {gains['features']:+.1f}; raw pixels at 32x32 reach "
            f"{100 * pixels_32['pixels']['top1']:.1f}, the best trained layer ({best}) "
            f"{100 * trained[best]['top1']:.1f}.")
    knn = [(r["cycle"], r["knn_top1"]) for r in demo_rows if r.get("knn_top1") is not None]
    if knn:
        text += (f" The demo's k-NN monitor goes from {knn[0][1]:.3f} at cycle {knn[0][0]} to {knn[-1][1]:.3f} "
                 f"at cycle {knn[-1][0]}.")
    return "\n".join(lines) + "\n" + text


def replace_blocks(text: str, blocks: dict[str, str], tag: str = "digits_figures", where: str = "the file") -> str:
    """Replace the body of every `<!-- TAG:NAME -->` ... `<!-- /TAG:NAME -->` block (TAG: the tool's name)."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- {tag}:{name} -->\n).*?(<!-- /{tag}:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{tag}: error: no <!-- {tag}:{name} --> block in {where}")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def add_doc_option(parser: argparse.ArgumentParser, default: Path) -> None:
    """--doc [PATH]: rewrite the tool's marked blocks in PATH (without PATH: the docs page that holds them);
    --readme PATH is the same option under its old name."""
    rel = default.relative_to(ROOT)
    parser.add_argument("--doc", "--readme", dest="doc", nargs="?", const=str(default), default=None, metavar="PATH",
                        help=f"rewrite the marked blocks of PATH (default: {rel}); without --doc, print them")


def _replaced(path: Path, blocks: dict[str, str], tag: str) -> str:
    """`path`'s text with the blocks replaced; a file that cannot be read or lacks a block is one line, exit 2."""
    try:
        return replace_blocks(path.read_text(), blocks, tag=tag, where=str(path))
    except OSError as err:
        message = f"{tag}: error: cannot read {path}: {err.strerror}"
    except SystemExit as err:
        message = str(err)
    print(message, file=sys.stderr)
    raise SystemExit(2)


def check_blocks(path: Path, names: tuple[str, ...], tag: str = "digits_figures") -> None:
    """Before any measuring: `path` holds every block the tool will rewrite."""
    _replaced(path, dict.fromkeys(names, ""), tag)


def rewrite_blocks(path: Path, blocks: dict[str, str], tag: str = "digits_figures") -> None:
    """Replace the blocks in `path` in place (nothing written unless every one is there)."""
    path.write_text(_replaced(path, blocks, tag))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/digits_figures")
    p.add_argument("--data", default=None, help="directory with train/ and test/ digits shard sets")
    add_doc_option(p, DOC)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--ks", default="10,50,100")
    p.add_argument("--nproc", type=int, default=2, help="processes of the demo run (as `make demo`)")
    p.add_argument("--probe-epochs", type=int, default=None, help="default: the config's eval.probe_epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the demo run and IA (e.g. train.cycles=2 for a quick try)")
    args = p.parse_args()
    if args.doc:
        check_blocks(Path(args.doc), BLOCKS)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, test = ensure_data(Path(args.data).resolve() if args.data else out / "data")
    demo, rows = demo_block(out, train, test, args.nproc, args.set)
    probe_args = ["--epochs", str(args.probe_epochs)] if args.probe_epochs else []
    blocks = {
        "demo": demo,
        "ia": ia_block(out / "ia", train, args.seeds, args.ks, args.set),
        "probe": probe_block(out / "probe", train, test, out / "demo" / "checkpoints" / "last.pt", rows, probe_args),
    }
    if args.doc:
        rewrite_blocks(Path(args.doc), blocks)
        print(f"digits_figures: rewrote the demo, ia and probe blocks of {args.doc}")
    else:
        for name, body in blocks.items():
            print(f"\n<!-- digits_figures:{name} -->\n{body}\n<!-- /digits_figures:{name} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
