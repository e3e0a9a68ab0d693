"""`dcscale embed`: one layer's features of every image of a shard set, as float16 .npy chunks.

Each rank extracts its contiguous slice of the global index with the extraction pass the training
run, the probe and the k-NN monitor use (`phases.extract_features` on `features.layer_fn`: eval
transform, conv maps average-pooled to about --pool-dim values) and writes it in chunks of at most
--chunk-rows rows: `feats-F.npy` (float16 [n, D]) and `indices-F.npy` (int64 global indices), F being
the chunk's first global index (12 digits), so the file names sort in the shard set's index order.
Undecodable images are left out. Rank 0 writes `embed.json` last (layer, dimension, the chunks in
order, the left-out indices): its presence marks a complete embedding. Every file is written to a
temporary name and renamed, so none is ever half-written. `iter_embeddings` reads an embedding back one
chunk at a time; `read_embeddings` reads it whole.

    dcscale embed --checkpoint runs/x/checkpoints/last.pt --shards data/train --out emb/ --layer relu5
    torchrun --standalone --nproc-per-node 8 -m dcscale embed ...    # --out on a file system every rank sees
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dcscale.errors import DcscaleError
from dcscale.cycle import network
from dcscale.eval import features as ft
from dcscale.outputs import output_dir, output_error, writing
from dcscale.safefile import atomic_write

SUMMARY = "embed.json"
DEFAULT_CHUNK_ROWS = 100_000


def chunk_name(kind: str, first: int) -> str:
    return f"{kind}-{first:012d}.npy"


def _ours(out: Path) -> list[Path]:
    """The files a previous embedding left in `out` (temporary ones of a killed run too)."""
    names = ("feats-*.npy", "indices-*.npy", SUMMARY, ".feats-*.tmp", ".indices-*.tmp", f".{SUMMARY}.*.tmp")
    return sorted(path for pattern in names for path in out.glob(pattern))


def _summary(out: Path) -> dict:
    summary_path = out / SUMMARY
    if not summary_path.is_file():
        raise DcscaleError(f"{out}: no {SUMMARY}: not an embedding, or one that did not finish")
    return json.loads(summary_path.read_text())


def iter_embeddings(out: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(global indices int64 [c], features float16 [c, D]) of a complete embedding, one chunk file at a
    time, in index order: memory is one chunk (at most the embedding's --chunk-rows rows), whatever
    the embedding's size. A chunk file that is missing or not the size embed.json lists is one line."""
    out = Path(out)
    summary = _summary(out)
    for chunk in summary["chunks"]:
        try:
            indices = np.load(out / chunk["indices"])
            feats = np.load(out / chunk["feats"])
        except (OSError, ValueError) as err:
            raise DcscaleError(f"{out}: cannot read chunk {chunk['feats']} of {SUMMARY}: {err}") from None
        if indices.shape != (chunk["rows"],) or feats.shape != (chunk["rows"], summary["dim"]):
            raise DcscaleError(f"{out}: chunk {chunk['feats']} holds {len(indices)} indices and features of shape "
                               f"{tuple(feats.shape)}; {SUMMARY} lists {chunk['rows']} rows of {summary['dim']}")
        yield indices, feats


def read_embeddings(out: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(global indices int64 [n], features float16 [n, D]) of a complete embedding, in index order, as
    two whole arrays: 2 D + 8 bytes per image (ImageNet at D = 4096: 10.5 GB), filled chunk by chunk
    (no second copy). For embeddings larger than memory, loop over `iter_embeddings` instead."""
    out = Path(out)
    summary = _summary(out)
    n = sum(int(c["rows"]) for c in summary["chunks"])
    indices, feats = np.empty(n, np.int64), np.empty((n, summary["dim"]), np.float16)
    filled = 0
    for chunk_indices, chunk_feats in iter_embeddings(out):
        rows = slice(filled, filled + len(chunk_indices))
        indices[rows], feats[rows] = chunk_indices, chunk_feats
        filled += len(chunk_indices)
    return indices, feats


def check_layer(layer: str, model) -> str:
    """One layer of the network ('features' or a probe layer), or one line listing the valid ones."""
    valid = [ft.FEATURES, *model.probe_layers()]
    if layer not in valid:
        raise DcscaleError(f"--layer {layer}: no such layer in {model.arch}; available: {', '.join(valid)}")
    return layer


def write_chunks(out: Path, indices: np.ndarray, feats: np.ndarray, chunk_rows: int) -> np.ndarray:
    """This rank's rows as chunk files; returns int64 [chunks, 3]: (first index, rows, dim) of each."""
    table = []
    for lo in range(0, len(indices), chunk_rows):
        rows = slice(lo, lo + chunk_rows)
        first = int(indices[lo])
        for kind, array in (("indices", indices[rows]), ("feats", feats[rows])):
            atomic_write(out / chunk_name(kind, first), lambda f, a=array: np.save(f, a))
        table.append((first, len(indices[rows]), feats.shape[1]))
    return np.array(table, np.int64).reshape(-1, 3)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a dcscale checkpoint or backbone export")
    parser.add_argument("--shards", required=True, help="the shard set to embed")
    parser.add_argument("--out", required=True, help="output directory (chunks and embed.json)")
    parser.add_argument("--layer", default=ft.FEATURES,
                        help="'features' (the clustered output, default) or a probe layer (conv1, relu5, ...)")
    parser.add_argument("--pool-dim", type=int,
                        help="average-pool conv maps to about this many values (default: eval.probe_pool_dim)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per chunk file")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: data.extract_batch_size)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: data.workers)")
    parser.add_argument("--force", action="store_true", help="replace an embedding already in --out")


def _prepare_out(out: Path, force: bool) -> str | None:
    """Make `out` ready for a new embedding (removing an old one with `force`), or say why not."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a directory"
    old = _ours(out) if out.is_dir() else []
    if old and not force:
        return f"--out {out} already holds an embedding; give --force to replace it"
    try:
        for path in old:
            path.unlink()
        output_dir(out, "--out")
    except OSError as err:
        return str(output_error("--out", out, err))
    except DcscaleError as err:
        return str(err)
    return None


def run(args) -> int:
    from dcscale import dist
    from dcscale.data.shardset import ShardSet
    from dcscale.cycle.phases import extract_features

    env = dist.init_distributed()
    try:
        for name in ("chunk_rows", "pool_dim", "batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise DcscaleError(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")
        if args.workers is not None and args.workers < 0:
            raise DcscaleError(f"--workers {args.workers}: expected an integer >= 0 (DataLoader workers)")
        model, cfg, shape = network.load_checkpoint_model(args.checkpoint, env.device)
        layer = check_layer(args.layer, model)
        shardset = ShardSet(args.shards)
        network.check_channels(shardset, shape[0], f"the network of {args.checkpoint}")
        out = Path(args.out)
        # Rank 0 alone touches the directory, after every input checked out; the broadcast makes every
        # rank stop (or go on) together.
        problem = dist.broadcast_object(_prepare_out(out, args.force) if env.is_main else None)
        if problem:
            raise DcscaleError(problem)
        pool_dim = args.pool_dim or cfg.eval.probe_pool_dim
        transform = network.eval_transform_for(cfg, shape[0], shape[1])
        batch_size = args.batch_size or cfg.data.extract_batch_size
        workers = args.workers if args.workers is not None else cfg.data.workers

        indices, feats, skipped = extract_features(ft.layer_fn(model, layer, pool_dim), shardset, transform, env,
                                                   batch_size, workers, "float16")
        try:
            table = write_chunks(out, indices, feats, args.chunk_rows)
        except OSError as err:
            raise output_error("--out", out, err) from None
        all_chunks = dist.gather_rows_to_main(table)
        all_skipped = dist.gather_rows_to_main(np.asarray(skipped, np.int64))
        if env.is_main:
            dim = int(all_chunks[0, 2]) if len(all_chunks) else 0
            summary = {
                "checkpoint": str(args.checkpoint), "shards": str(shardset.root), "layer": layer,
                "pool_dim": pool_dim if layer != ft.FEATURES else None, "dim": dim, "dtype": "float16",
                "count": int(all_chunks[:, 1].sum()), "total": len(shardset), "world_size": env.world_size,
                "chunks": [{"first": int(first), "rows": int(rows), "feats": chunk_name("feats", first),
                            "indices": chunk_name("indices", first)} for first, rows, _ in all_chunks],
                "skipped": sorted(int(i) for i in all_skipped),
            }
            text = json.dumps(summary, indent=1) + "\n"
            with writing("--out", out):
                atomic_write(out / SUMMARY, lambda f: f.write(text.encode()))
            print(f"embed: {summary['count']} of {len(shardset)} images x {dim} ({layer} of {cfg.model.arch}) "
                  f"float16 in {len(all_chunks)} chunk(s) by {env.world_size} process(es)"
                  + (f", {len(all_skipped)} undecodable left out" if len(all_skipped) else "") + f"; wrote {out}")
        return 0
    finally:
        dist.shutdown()
