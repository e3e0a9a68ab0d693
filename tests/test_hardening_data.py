"""Hostile files and silently wrong results (issue 21, part A): links planted in a run directory, a YAML
bomb, a decompression bomb, damaged indexes, metrics and checkpoints, labels out of range, caches
that must follow the content. Every case ends in one clear line (exit 2), a logged skip, or the right
number; never a traceback, a write outside the run directory or a silently wrong result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import metrics, one_line, tiny_run_overrides

from dcscale.cli import main

CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DCSCALE = [sys.executable, "-m", "dcscale"]


def dcscale(capsys, *argv) -> tuple[int, str]:
    """`dcscale ARGV` in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(digits_train_shards, tmp_path_factory) -> Path:
    """A finished 1-cycle run (something to resume)."""
    run_dir = tmp_path_factory.mktemp("hardening") / "run"
    proc = subprocess.run([*DCSCALE, "train", "--config", CONFIG,
                           *tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 1})],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))
    return to


# ---- 1. no write through a link planted in the run directory ---------------------------------------

@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.yaml", "labels.npy", "checkpoints", "tb"])
def test_a_link_in_the_run_directory_is_refused_and_its_target_untouched(name, digits_train_shards, tmp_path,
                                                                          capsys):
    victim = tmp_path / "victim"
    if name in ("checkpoints", "tb"):
        victim.mkdir()
        (victim / "keep.txt").write_text("precious\n")
    else:
        victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 1}))
    line = one_line(err)
    assert code == 2 and f"{run_dir / name} is a symbolic link" in line and "refused" in line, line
    if victim.is_dir():
        assert [p.name for p in victim.iterdir()] == ["keep.txt"]
        assert (victim / "keep.txt").read_text() == "precious\n"
    else:
        assert victim.read_text() == "precious\n"


def test_a_link_at_a_temporary_name_is_replaced_not_followed(digits_train_shards, tmp_path, capsys):
    """A checkpoint's temporary file (a name anyone can predict: it holds the pid) planted as a link: the
    run removes the link and writes its own file; the link's target keeps its bytes."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in (f".last.pt.{os.getpid()}.tmp", ".write-test.{}.tmp".format(os.getpid())):
        (run_dir / "checkpoints" / name).symlink_to(victim)
    (run_dir / "config.yaml.tmp").symlink_to(victim)
    (run_dir / ".clusters.json.tmp").symlink_to(victim)
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 1}))
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "checkpoints" / "last.pt").is_symlink()


# ---- 2. config loading is bounded ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
YAML_BOMB = "".join(
    [f"{a}: &{a} [" + ", ".join(['"lol"'] * 9) + "]\n" for a in "a"]
    + [f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]\n" for a, b in zip("abcdefg", "bcdefgh")]
    + ["seed: [" + ", ".join(["*h"] * 9) + "]\n"])  # 9^9 = 387 million strings once expanded, in 420 bytes


@pytest.mark.parametrize("command", [
    lambda bomb, t: [*DCSCALE, "config", bomb],
    lambda bomb, t: [*DCSCALE, "train", "--config", bomb],
    lambda bomb, t: [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", bomb, "--dry-run"],
    lambda bomb, t: [sys.executable, str(ROOT / "tools" / "sweep.py"), "--config", bomb, "--grid", "cluster.k=5,6",
                     "--out", str(t / "sweep")],
], ids=["config", "train", "slurm.py", "sweep.py"])
def test_a_yaml_bomb_is_one_line_in_well_under_a_second(command, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(YAML_BOMB)
    assert len(YAML_BOMB) < 450
    started = time.monotonic()
    proc = subprocess.run(command(str(bomb), tmp_path), env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "aliases expand to more than 100,000 values" in lines[0], lines[0]
    assert time.monotonic() - started < 20  # (the process start dominates: the refusal itself takes milliseconds)


def test_config_loading_is_bounded_in_time_and_still_reads_aliases(tmp_path):
    from dcscale.config import load_config
    from dcscale.errors import ConfigError

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(YAML_BOMB)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(None, ["data.mean=" + YAML_BOMB.replace("\n", ", ").replace("seed: ", "x: ")
                           .join(["{", "}"])])
    assert time.perf_counter() - started < 0.5
    looped = tmp_path / "loop.yaml"
    looped.write_text("seed: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="refers to the collection that holds it"):
        load_config(looped)
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    plain = tmp_path / "plain.yaml"  # anchors and aliases within bounds are still YAML
    plain.write_text("cluster: {k: &k 12, pca_dim: *k}\n")
    assert (load_config(plain).cluster.k, load_config(plain).cluster.pca_dim) == (12, 12)
    # A wrong value is still named, shortened
    with pytest.raises(ConfigError, match=r"data.mean = \[\[0, 0, 0, 0, 0, 0, 0, 0, \.\.\.\]") as err:
        load_config(None, ["data.mean=[[" + ", ".join(["0"] * 5000) + "]]"])
    assert len(str(err.value)) < 300


# ---- 3. `ia --vary data.train=A,B` clusters B for B ------------------------------------------------

def test_ia_varying_the_shard_set_opens_each_shard_set(digits_train_shards, digits_test_shards, tmp_path, capsys):
    import json

    cfg = tmp_path / "ia.yaml"
    cfg.write_text(f"seed: 3\ndata: {{train: {digits_train_shards}, image_size: 32, workers: 0}}\n"
                   "model: {arch: lenet5}\ncluster: {k: 10, pca_dim: 16}\n")

    def ia_of(vary: str, out: Path) -> dict:
        code = main(["ia", "--config", str(cfg), "--vary", vary, "--seeds", "1", "--out", str(out), "--save-labels"])
        assert code == 0, capsys.readouterr().err
        return {s["value"]: s["ia"] for s in json.loads((out / "ia.json").read_text())["samples"]}

    both = ia_of(f"data.train={digits_train_shards},{digits_test_shards}", tmp_path / "both")
    alone = ia_of(f"data.train={digits_test_shards}", tmp_path / "alone")
    test_ia = both[str(digits_test_shards)]
    assert test_ia == alone[str(digits_test_shards)]  # B's line is B's IA ...
    assert test_ia != both[str(digits_train_shards)]  # ... not A's
    # Each value's pseudo-labels are one file in the labels folder (a path value does not make folders)
    saved = {p.name: len(np.load(p)) for p in (tmp_path / "both" / "labels").iterdir()}
    assert sorted(saved.values()) == [360, 1437] and all(name.endswith("_seed3.npy") for name in saved), saved


# ---- 4. the probe's feature cache follows the content, not the path ---------------------------------

def _digits_with_labels(out: Path, permute: bool) -> Path:
    """The digits test split written at `out`; with `permute`, its labels shuffled (same images, same
    tar sizes: only the content differs)."""
    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData, read_digits

    source = read_digits("test")
    samples = list(source.samples)
    labels = [label for _, label in samples]
    if permute:
        labels = list(np.random.default_rng(0).permutation(labels))
    if out.exists():
        shutil.rmtree(out)
    write_shard_set(SourceData([(img, int(y)) for (img, _), y in zip(samples, labels)], len(samples),
                               source.class_names, "digits test"), out, samples_per_shard=200)
    return out


def test_the_probe_cache_is_keyed_by_content(digits_train_shards, tmp_path, capsys):
    import json

    test_set = tmp_path / "test"

    def top1() -> float:
        code = main(["probe", "--train", str(digits_train_shards), "--test", str(test_set), "--layer", "pixels",
                     "--json", str(tmp_path / "p.json"), "--workers", "0"])
        assert code == 0, capsys.readouterr().err
        return json.loads((tmp_path / "p.json").read_text())["layers"]["pixels"]["top1"]

    _digits_with_labels(test_set, permute=False)
    first = top1()
    assert first > 0.8 and any((tmp_path / "p_cache").iterdir())
    _digits_with_labels(test_set, permute=True)  # same path, same sizes, other labels
    assert top1() < 0.3  # the rebuilt set's labels, not the cached ones (chance is 0.1)
    _digits_with_labels(test_set, permute=False)
    assert top1() == first


# ---- 5. a damaged metrics.jsonl at resume: the cut row is written again, loudly ---------------------

def test_a_cut_metrics_row_is_restored_at_resume(finished_run, digits_train_shards, tmp_path, capsys, caplog):
    run_dir = copy_run(finished_run, tmp_path / "run")
    rows = metrics(run_dir)
    assert [r["cycle"] for r in rows] == [0]
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text[:len(text) // 2])  # the last (only) line cut in the middle
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 2, "resume": "auto"}))
    assert code == 0, err
    warning = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(warning) == 1 and "line(s) 1 damaged" in warning[0] and \
        "the row of cycle 0 was written again from the checkpoint" in warning[0], err
    after = metrics(run_dir)
    assert [r["cycle"] for r in after] == [0, 1]
    assert after[0] == rows[0]  # the very row the first run wrote


def test_rows_that_cannot_be_restored_are_named(tmp_path, caplog):
    from dcscale.train.metrics_log import MetricsLogger

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"cycle": 0, "loss": 1.0}\n{"cycle": 1, "lo\n{"cycle": 2, "loss": 0.5}\n')
    logger = MetricsLogger(run_dir, resume_cycle=3, last_row={"cycle": 2, "loss": 0.5})
    logger.close()
    assert [r["cycle"] for r in metrics(run_dir)] == [0, 2]
    (line,) = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert "line(s) 2 damaged" in line and "no row for cycle(s) 1" in line and "lost" in line


# ---- 6. a decompression bomb in an indexed tar is a counted skip ------------------------------------

def _png(width: int, height: int, idat: bytes) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A valid 20000 x 20000 8-bit grey PNG (400 M pixels, all black) of about 400 kB."""
    import zlib

    side, rows_per_block = 20000, 500
    deflate = zlib.compressobj(9)
    block = bytes(side + 1) * rows_per_block  # filter byte + a row of zeros, per row
    idat = b"".join(deflate.compress(block) for _ in range(side // rows_per_block)) + deflate.flush()
    return _png(side, side, idat)


def test_a_decompression_bomb_in_an_indexed_tar_is_a_counted_skip(bomb_png, tmp_path, caplog):
    import resource

    import webdataset as wds

    from dcscale.data.build import index_tars
    from dcscale.data.shardset import ShardSet

    assert len(bomb_png) < 1_000_000
    (tmp_path / "tars").mkdir()
    with wds.TarWriter(str(tmp_path / "tars" / "a.tar")) as sink:
        for j in range(4):
            sink.write({"__key__": f"s{j}", "png": np.full((6, 6), 40 * j, np.uint8), "cls": j % 2})
        sink.write({"__key__": "bomb", "png": bomb_png, "cls": 1})  # (bytes: written as they are)
    index_tars([tmp_path / "tars"], tmp_path / "set")
    assert any("1 undecodable image(s)" in r.getMessage() and "20000x20000" in r.getMessage()
               for r in caplog.records)

    shards = ShardSet(tmp_path / "set")
    assert len(shards) == 5 and shards.read_bytes(4)[0] == bomb_png
    assert shards.read_uint8(0, 1)[0].shape == (1, 6, 6)  # (imports torchvision's decoders: not timed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    image, label = shards.read_uint8(4, 1)  # the fast decode path (torchvision's libpng)
    assert image is None and label == 1 and shards.decode_errors == 1
    assert shards.read(4) is None and shards.decode_errors == 2  # (PIL's path: its own limit)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # kB: nothing decoded
    skips = [r.getMessage() for r in caplog.records if "skipping undecodable image 4" in r.getMessage()]
    assert len(skips) == 1 and "beyond the limit" in skips[0] and "bomb" in skips[0], skips
    assert shards.read_uint8(3, 1)[0].shape == (1, 6, 6)  # the other images still read


# ---- 7. the sidecar index is checked against a checksum of its content ------------------------------

def test_an_index_edited_in_place_is_not_used(digits_test_shards, tmp_path, caplog):
    import json

    from dcscale.data.shardset import ShardSet

    root = tmp_path / "set"
    shutil.copytree(digits_test_shards, root)
    reference = ShardSet(root)
    assert reference.used_index_file
    truth = reference.labels().copy()
    a, b = 0, int(np.flatnonzero(truth != truth[0])[0])  # two samples of different classes (shard 0)
    image_a = reference.read_bytes(a)[0]
    rows = np.load(root / "index.npy")
    rows[[a, b]] = rows[[b, a]]  # same size, same shard layout: images now carry each other's labels
    rows["shard"][[a, b]] = 0
    with open(root / "index.npy", "r+b") as f:  # in place, same header
        np.save(f, rows, allow_pickle=False)

    caplog.clear()
    shards = ShardSet(root)  # (shard 0's rows are checked when first read: tests/test_index_checksum.py)
    assert np.array_equal(shards.labels(), truth)  # from the tars, right
    assert shards.read(a).label == truth[a] and shards.read_bytes(a)[0] == image_a
    (warning,) = [r.getMessage() for r in caplog.records if "index.npy" in r.getMessage()]
    assert "do not match their checksum" in warning and "reading that tar's headers instead" in warning

    # A shard set built before the checksums existed is read as before, from its index
    manifest = json.loads((digits_test_shards / "manifest.json").read_text())
    assert len(manifest["extra"].pop("index_file_sha256")) == 64
    for key in ("index_shard_digests", "index_shard_digests_sha256", "index_shard_counts_sha256",
                "index_label_range"):
        manifest["extra"].pop(key)
    old = tmp_path / "old"
    shutil.copytree(digits_test_shards, old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet(old).used_index_file and np.array_equal(ShardSet(old).labels(), truth)


# ---- 8. labels outside the class count are refused when a shard set is built --------------------------

def _idx(array: np.ndarray) -> bytes:
    import struct

    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _mnist_files(root: Path, labels: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    (root / "train-images-idx3-ubyte").write_bytes(_idx(images))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx(np.array(labels, np.uint8)))
    return root


@pytest.mark.parametrize("label", [99, -3])
def test_a_label_outside_the_classes_is_refused_at_build(label, tmp_path, capsys):
    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData
    from dcscale.errors import DataError

    samples = [(np.zeros((4, 4), np.uint8), y) for y in (0, 1, label, 2)]
    with pytest.raises(DataError, match=rf"sample 2 has label {label}; expected one of its 10 classes \(0..9\)"):
        write_shard_set(SourceData(samples, 4, [str(c) for c in range(10)], "tiny"), tmp_path / "set")
    assert not (tmp_path / "set").exists()  # nothing left behind
    if label == 99:  # through the command: an mnist label file with a 99
        code, err = dcscale(capsys, "shards", "mnist", _mnist_files(tmp_path / "raw", [0, 1, 99]),
                            "--out", tmp_path / "m")
        line = one_line(err)
        assert code == 2 and "train-images-idx3-ubyte" in line and "sample 2 has label 99" in line, line


def test_indexed_tars_with_a_negative_or_stray_label(tmp_path, caplog):
    import webdataset as wds

    from dcscale.data.build import index_tars
    from dcscale.errors import DataError

    def tar(name: str, labels: list[str]) -> Path:
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for j, y in enumerate(labels):
                sink.write({"__key__": f"s{j}", "png": np.zeros((3, 3), np.uint8), "cls": y.encode()})
        return tmp_path / name

    with pytest.raises(DataError, match=r"negative.tar sample 's1'.*class label -3 out of range"):
        index_tars([tar("negative.tar", ["0", "-3"])], tmp_path / "a")
    index_tars([tar("stray.tar", ["0", "1", "2", "99"])], tmp_path / "b")  # no class count to hold it to: warned
    (line,) = [r.getMessage() for r in caplog.records if "distinct classes" in r.getMessage()]
    assert "labels run from 0 to 99 but only 4 distinct classes occur (0, 1, 2, 99)" in line


def test_report_with_pseudo_labels_out_of_range(finished_run, tmp_path, capsys, caplog):
    run_dir = copy_run(finished_run, tmp_path / "run")
    labels = np.load(run_dir / "labels.npy")
    labels[5] = 99
    np.save(run_dir / "labels.npy", labels)
    code, err = dcscale(capsys, "report", run_dir)
    assert code == 0 and "Traceback" not in err
    (line,) = [r.getMessage() for r in caplog.records if "no contingency heatmap" in r.getMessage()]
    assert "1 label(s) outside -1..9 (cluster.k = 10), first 99 at image 5" in line
    assert not (run_dir / "report" / "clusters_contingency.png").exists()


# ---- 11. idx files and tar links --------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "0 bytes: the 4-byte header is cut short"),
    (b"\x00\x00", "2 bytes: the 4-byte header is cut short"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x05", "idx header cut short (3 dimensions announced, 1 present)"),
    (b"\x00\x00\x08\x03" + bytes.fromhex("00ffffff00ffffff00ffffff"), "more than the file holds"),
], ids=["empty", "short magic", "short dims", "lying dims"])
def test_a_damaged_idx_header_is_one_line(content, message, tmp_path, capsys):
    root = _mnist_files(tmp_path / "raw", [0, 1])
    (root / "train-images-idx3-ubyte").write_bytes(content)
    code, err = dcscale(capsys, "shards", "mnist", root, "--out", tmp_path / "out")
    line = one_line(err)
    assert code == 2 and "train-images-idx3-ubyte" in line and message in line, line


def test_a_gzipped_idx_is_checked_before_it_is_read(tmp_path):
    import gzip

    from dcscale.data.converters import read_idx
    from dcscale.errors import DataError

    labels = np.arange(10, dtype=np.uint8)
    good = tmp_path / "labels.gz"
    good.write_bytes(gzip.compress(_idx(labels)))
    assert np.array_equal(read_idx(good), labels)
    # A header announcing 4 GB in a 100-byte .gz: refused from the sizes alone
    liar = tmp_path / "liar.gz"
    liar.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (2 ** 32 - 1).to_bytes(4, "big") + b"\x00" * 50))
    started = time.perf_counter()
    with pytest.raises(DataError, match="announces 4,294,967,295 data bytes"):
        read_idx(liar)
    assert time.perf_counter() - started < 0.5
    # More data than the header says, and less: one line each
    for body, says in ((labels.tobytes() + b"\x00", "more than 10 data bytes"), (labels.tobytes()[:4], "4 data bytes")):
        bad = tmp_path / "bad.gz"
        bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + body))
        with pytest.raises(DataError, match=says):
            read_idx(bad)


def test_a_tar_link_to_itself_is_one_line(tmp_path, capsys):
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "loop.tar").symlink_to("loop.tar")
    for given in (tmp_path / "tars" / "loop.tar", tmp_path / "tars"):
        code, err = dcscale(capsys, "shards", "index", given, "--out", tmp_path / "out")
        line = one_line(err)
        assert code == 2 and "loop.tar: a symbolic link that loops" in line, line


# ---- 12. a shard set gets the user's umask, not 0700 ----------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_shard_set_directory_follows_the_umask(umask, tmp_path):
    import stat

    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData

    old = os.umask(umask)
    try:
        write_shard_set(SourceData([(np.zeros((4, 4), np.uint8), 0)] * 3, 3, ["a"], "tiny"), tmp_path / "set")
    finally:
        os.umask(old)
    for path in (tmp_path / "set", *(tmp_path / "set").iterdir()):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


# ---- 9. a training checkpoint must carry its checksum, and fields of the right type --------------------

def _raw_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_checkpoint_resaved_without_its_checksum_is_refused(finished_run, digits_train_shards, tmp_path, capsys,
                                                             caplog):
    import torch

    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    state = _raw_checkpoint(last)
    del state["sha256"]
    torch.save(state, last)  # the same content, re-saved without its checksum
    overrides = tiny_run_overrides(digits_train_shards, run_dir, **{"train.cycles": 2})

    code, err = dcscale(capsys, "train", "--config", CONFIG, *overrides, f"resume={last}")
    line = one_line(err)
    assert code == 2 and "refused: a training checkpoint without its checksum" in line, line
    # resume=auto falls back to the newest intact one, saying why
    code, err = dcscale(capsys, "train", "--config", CONFIG, *overrides, "resume=auto")
    assert code == 0, err
    (note,) = [r.getMessage() for r in caplog.records if "without its checksum" in r.getMessage()]
    assert "resuming from" in note and "cycle00001" in note


@pytest.mark.parametrize("field, value, message", [
    ("cycle", -1, "its field 'cycle' is -1, expected an integer >= 0"),
    ("config", "a string", "its field 'config' is 'a string', expected a config"),
    ("rng", "zeros", "its field 'rng' is a Tensor, expected a random generator state"),
    ("labels", "floats", "its field 'labels' is a Tensor, expected a 1-d integer tensor or None"),
])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_one_line(field, value, message, finished_run,
                                                                 digits_train_shards, tmp_path, capsys):
    import torch

    from dcscale.train.checkpoint import write_checkpoint_file

    state = _raw_checkpoint(finished_run / "checkpoints" / "last.pt")
    del state["sha256"]
    state[field] = {"zeros": torch.zeros(3, dtype=torch.uint8),
                    "floats": torch.zeros(len(state["labels"]))}.get(value, value)
    crafted = tmp_path / "crafted.pt"
    write_checkpoint_file(state, crafted)  # a valid checksum over the wrong content
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, tmp_path / "run", **{"resume": crafted}))
    line = one_line(err)
    assert code == 2 and message in line, line


def test_a_flipped_bit_in_the_pickle_is_damage_not_an_object(finished_run, tmp_path):
    import struct
    import zipfile

    from dcscale.train.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "last.pt"
    shutil.copy(finished_run / "checkpoints" / "last.pt", path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        pickled = archive.read(info)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + pickled.find(b"_rebuild_tensor_v2")
    data[at] ^= 0x01  # "_rebuild_tensor_v2" -> "^rebuild_tensor_v2": an object weights_only refuses
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="damaged: checksum mismatch in its member") as err:
        load_checkpoint(path)
    assert "Python object" not in str(err.value)


# ---- 10. refused with one line: where a run would write, what it would read ------------------------------

def test_output_dir_empty_or_in_a_shard_set_is_refused(digits_train_shards, digits_test_shards, tmp_path, capsys):
    before = sorted(p.name for p in digits_train_shards.iterdir())
    cases = [("", "output.dir = '' in the command line: expected a directory for the run (not empty"),
             (str(digits_train_shards), f"output.dir {digits_train_shards} is the shard set of data.train"),
             (str(digits_test_shards / "run"), f"is inside the shard set of data.test ({digits_test_shards})")]
    for out, message in cases:
        code, err = dcscale(capsys, "train", "--config", CONFIG,
                            *tiny_run_overrides(digits_train_shards, tmp_path, **{"data.test": digits_test_shards}),
                            f"output.dir={out!r}" if out == "" else f"output.dir={out}")
        line = one_line(err)
        assert code == 2 and message in line, line
    assert sorted(p.name for p in digits_train_shards.iterdir()) == before
    assert not (digits_test_shards / "run").exists()


def test_a_manifest_listing_a_shard_twice_or_nested_too_deeply(digits_test_shards, tmp_path):
    import json

    from dcscale.data.manifest import load_manifest
    from dcscale.errors import DataError

    raw = json.loads((digits_test_shards / "manifest.json").read_text())
    root = tmp_path / "set"
    root.mkdir()
    first = raw["shards"][0]
    raw.update(shards=[first, {**first, "name": "./" + first["name"]}], total=2 * first["count"])
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"shard {first['name']} is listed twice \(also as {first['name']}\)|"
                                        rf"shard ./{first['name']} is listed twice"):
        load_manifest(root)
    (root / "manifest.json").write_text('{"version": 1, "shards": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="nested too deeply to be a manifest"):
        load_manifest(root)


def test_a_knn_test_set_of_another_shape_is_refused(digits_train_shards, tmp_path, capsys):
    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData

    rgb = tmp_path / "rgb"
    write_shard_set(SourceData([(np.zeros((8, 8, 3), np.uint8), j % 10) for j in range(20)], 20,
                               [str(c) for c in range(10)], "rgb"), rgb)
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, tmp_path / "run",
                                            **{"data.test": rgb, "eval.knn_every": 1}))
    line = one_line(err)
    assert code == 2 and f"data.test {rgb} holds 3x8x8 images but data.train" in line and "1x8x8" in line, line
    assert not (tmp_path / "run").exists()


def test_embed_refuses_rgb_images_through_a_grey_network(finished_run, tmp_path, capsys):
    from dcscale.data.build import write_shard_set
    from dcscale.data.converters import SourceData

    rgb = tmp_path / "rgb"
    write_shard_set(SourceData([(np.zeros((8, 8, 3), np.uint8), None) for _ in range(6)], 6, None, "rgb"), rgb)
    code, err = dcscale(capsys, "embed", "--checkpoint", finished_run / "checkpoints" / "last.pt", "--shards", rgb,
                        "--out", tmp_path / "emb")
    line = one_line(err)
    assert code == 2 and "3-channel images, but the network of" in line and "takes 1" in line, line
    assert not (tmp_path / "emb").exists()


# ---- 13. degenerate settings warn ---------------------------------------------------------------------

def test_degenerate_cluster_settings_warn_once_at_start(digits_train_shards, tmp_path, capsys, caplog):
    code, err = dcscale(capsys, "train", "--config", CONFIG,
                        *tiny_run_overrides(digits_train_shards, tmp_path / "run", **{
                            "train.cycles": 1, "cluster.pca_dim": 16, "cluster.max_points_per_centroid": 1}))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "cluster." in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "cluster.max_points_per_centroid = 1" in warnings[0] and "each centroid is one image" in warnings[0]


def test_pca_sample_below_pca_dim_is_refused_before_any_work(digits_train_shards, tmp_path, capsys):
    code, err = dcscale(capsys, "train", "--config", CONFIG, *tiny_run_overrides(
        digits_train_shards, tmp_path / "run", **{"cluster.pca_dim": 16, "cluster.pca_sample": 8}))
    line = one_line(err)
    assert code == 2 and "cluster.pca_sample = 8 are too few rows to fit a PCA to cluster.pca_dim = 16" in line, line
