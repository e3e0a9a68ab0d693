#!/usr/bin/env python
"""The README's digits measurements: IA distributions and per-layer linear probes.

    python tools/digits_figures.py --out runs/digits_figures [--run-dir runs/digits_demo] [--train-demo]

1. Initial Alignment over 20 random initialisations for K in 10, 50, 100 (`dcscale ia` with
   configs/digits_demo.yaml): OUT/ia/ia.json and OUT/ia/ia_boxplot.png.
2. Linear probes per layer (`dcscale probe`, 20 epochs, the config's eval.probe_* settings): raw
   pixels (8x8 as stored, and the network's 32x32 input), the randomly initialised LeNet-5, and the
   network after the demo run (RUN_DIR/checkpoints/last.pt; --train-demo runs `dcscale train` first
   when it is missing).
Prints both tables as markdown. The digits shard sets are built in OUT/data unless --data names a
directory holding train/ and test/ shard sets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits_demo.yaml"


def dcscale(*args: str) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    print("$ dcscale " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dcscale", *args], check=True, env=env, cwd=ROOT)


def ensure_data(data: Path) -> tuple[Path, Path]:
    for split in ("train", "test"):
        if not (data / split / "manifest.json").is_file():
            dcscale("shards", "digits", "--split", split, "--out", str(data / split))
    return data / "train", data / "test"


def ia_table(out: Path, train: Path, seeds: int, ks: str) -> str:
    if not (out / "ia.json").is_file():
        dcscale("ia", "--config", str(DEMO), "--vary", f"cluster.k={ks}", "--seeds", str(seeds),
                "--out", str(out), f"data.train={train}")
    result = json.loads((out / "ia.json").read_text())
    lines = [f"| K | median IA | IQR (q1 - q3) | min | max | seeds |", "|---|---|---|---|---|---|"]
    for value, s in result["summary"].items():
        lines.append(f"| {value} | {s['median']:.3f} | {s['q1']:.3f} - {s['q3']:.3f} | {s['min']:.3f} | "
                     f"{s['max']:.3f} | {s['n']} |")
    rec = result["recommendation"]
    lines.append(f"\nHighest median IA: K={rec['value']} ({rec['median_ia']:.3f}).")
    return "\n".join(lines)


def probe(out_json: Path, train: Path, test: Path, *args: str) -> dict:
    if not out_json.is_file():
        dcscale("probe", "--train", str(train), "--test", str(test), "--json", str(out_json), *args)
    return json.loads(out_json.read_text())["layers"]


def probe_table(out: Path, train: Path, test: Path, checkpoint: Path | None) -> str:
    common = ["--config", str(DEMO)]
    pixels_native = probe(out / "pixels_8x8.json", train, test, "--layer", "pixels")
    pixels_32 = probe(out / "pixels_32x32.json", train, test, "--layer", "pixels", *common)
    random = probe(out / "random_init.json", train, test, "--random-init", "--layer", "all,features", *common)
    trained = probe(out / "after_demo.json", train, test, "--checkpoint", str(checkpoint),
                    "--layer", "all,features") if checkpoint else {}
    lines = ["| features | dim | random-init top-1 | after demo run top-1 |", "|---|---|---|---|"]
    for name, res in (("raw pixels 8x8", pixels_native["pixels"]), ("raw pixels 32x32", pixels_32["pixels"])):
        lines.append(f"| {name} | {res['dim']} | {100 * res['top1']:.1f} (no network) | - |")
    for layer, res in random.items():
        after = f"{100 * trained[layer]['top1']:.1f}" if layer in trained else "not run"
        lines.append(f"| LeNet-5 {layer} | {res['dim']} | {100 * res['top1']:.1f} | {after} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/digits_figures")
    p.add_argument("--data", default=None, help="directory with train/ and test/ digits shard sets")
    p.add_argument("--run-dir", default="runs/digits_demo", help="the demo run to probe after training")
    p.add_argument("--train-demo", action="store_true", help="run the demo training when it is missing")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--ks", default="10,50,100")
    args = p.parse_args()

    out = Path(args.out).resolve()
    train, test = ensure_data(Path(args.data).resolve() if args.data else out / "data")
    checkpoint = Path(args.run_dir).resolve() / "checkpoints" / "last.pt"
    if not checkpoint.is_file() and args.train_demo:
        dcscale("train", "--config", str(DEMO), f"data.train={train}", f"data.test={test}",
                f"output.dir={Path(args.run_dir).resolve()}")
    ia = ia_table(out / "ia", train, args.seeds, args.ks)
    probes = probe_table(out / "probe", train, test, checkpoint if checkpoint.is_file() else None)
    print(f"\n### Initial Alignment on digits (LeNet-5, {args.seeds} random initialisations)\n\n{ia}")
    print(f"\n### Linear probe on digits (test top-1, %)\n\n{probes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
