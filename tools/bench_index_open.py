"""What opening a shard set costs: seconds and bytes read (Linux /proc/self/io rchar) per
`ShardSet(root)` (verify=True, as training, extraction and evaluation open it), then for the first read
of one sample and for the label column. Run with the code to measure first on PYTHONPATH:

    python tools/bench_index_open.py --n 1000000 --scratch /tmp/bench-index   # synthesises the set once
    python tools/bench_index_open.py --n 1000000 --samples-per-shard 10 --scratch /tmp/bench-index-100k
    python tools/bench_index_open.py --shards DIR                              # an existing set, read-only

Timings are with the index in the page cache after the first open (rchar counts the bytes the
process asks for, cached or not). A set whose manifest has the digest of its shard counts is also opened
as a set built before that digest (a view in --scratch: links to its files and the manifest without
the key), side by side: that open reads each shard's first and last index rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def measured(action) -> tuple[object, float, int]:
    before, started = bytes_read(), time.perf_counter()
    result = action()
    return result, time.perf_counter() - started, bytes_read() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="an existing shard set (only read)")
    parser.add_argument("--n", type=int, help="synthesise a set of N images (tools/bench_scale.py's writer)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench-index-open"))
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="with --n (default 1000)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dcscale.data.shardset import ShardSet
    from dcscale.data.tarindex import SHARD_COUNTS_KEY

    root = args.shards
    if root is None:
        from bench_scale import shard_set_for

        root, _ = shard_set_for(args.n, None, args.scratch, args.samples_per_shard)
    ShardSet(root)  # warm: imports, the page cache
    opens = [measured(lambda: ShardSet(root)) for _ in range(args.repeat)]
    shards = opens[-1][0]
    _, read_s, read_bytes = measured(lambda: shards.read_bytes(len(shards) // 2))
    _, labels_s, labels_bytes = measured(shards.labels)
    report = {
        "root": str(root), "n": len(shards), "shards": shards.num_shards,
        "index_bytes": (root / shards.manifest.extra["index_file"]).stat().st_size,
        "per_shard_digests": "index_shard_digests" in shards.manifest.extra,
        "counts_digest": SHARD_COUNTS_KEY in shards.manifest.extra,
        "open_s": min(s for _, s, _ in opens), "open_bytes": opens[-1][2],
        "first_read_s": read_s, "first_read_bytes": read_bytes, "labels_s": labels_s, "labels_bytes": labels_bytes,
    }
    if report["counts_digest"]:
        view = view_without_counts_digest(root, args.scratch / f"{root.name}_without_counts_digest")
        ShardSet(view)
        before = [measured(lambda: ShardSet(view)) for _ in range(args.repeat)]
        report.update(without_counts_digest_open_s=min(s for _, s, _ in before),
                      without_counts_digest_open_bytes=before[-1][2])
    print(json.dumps(report))
    return 0


def view_without_counts_digest(root: Path, view: Path) -> Path:
    """The same set as one built before the counts' digest: links to its files, its manifest without the key."""
    import shutil

    from dcscale.data.tarindex import SHARD_COUNTS_KEY

    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for path in root.iterdir():
        if path.name != "manifest.json":
            (view / path.name).symlink_to(path.resolve())
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["extra"][SHARD_COUNTS_KEY]
    (view / "manifest.json").write_text(json.dumps(manifest))
    return view


if __name__ == "__main__":
    sys.exit(main())
