"""What a cycle looks like: the images rank 0 writes to TensorBoard (and `dcscale report` to PNGs).

- clusters/montage: for a fixed, seeded sample of clusters (the same ids every cycle while they are
  non-empty) plus the largest and the smallest, the images nearest to the centroid, one row per
  cluster, labelled with its id, size and, with ground truth, its majority class and that class's
  share. The nearest rows come from the assignment's distances (phases.nearest_rows), so there is no
  extra pass over the data; the few images are read by global index.
- filters/first_layer: the body's first convolution (after the Sobel front when there is one).
- clusters/contingency: pseudo-labels against ground-truth classes, each cluster's class shares,
  clusters sorted by majority class: the picture behind NMI.
- eval/knn_confusion: the k-NN monitor's votes against the true classes.

Every picture is drawn with numpy and PIL into a uint8 array, [H, W] when it is grey (heatmaps, a grey
shard set's montage, filters on one or two input channels: a third of the bytes to encode) or
[H, W, 3]; no matplotlib, so that an image cycle costs milliseconds on a small model.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dcscale.safefile import atomic_write_text

TAG_MONTAGE = "clusters/montage"
TAG_CONTINGENCY = "clusters/contingency"
TAG_FILTERS = "filters/first_layer"
TAG_KNN_CONFUSION = "eval/knn_confusion"
MONTAGE_SAMPLE = 16  # seeded clusters in a montage, besides the largest and the smallest
MONTAGE_PER_ROW = 8  # images per cluster, nearest to its centroid first
RECORD_NAME = "clusters.json"  # the newest montage's rows, in the run directory
HEATMAP_MAX_CELLS = 256  # rows (or columns) of a heatmap; more are summed in consecutive bins
_CHUNK = 1 << 22  # labels per pass when counting pairs: bounded temporary memory whatever N
_GAP = 2  # pixels between tiles
_INK, _MISSING = (0, 0, 0), (200, 200, 200)
_LIGHT, _DARK = 255.0, 25.0  # heatmap grey levels of 0% and 100% (grey: a third of the bytes of colour)


def images_due(every: int | None, cycle: int, cycles: int) -> bool:
    """Images at cycle 0, every `every` cycles and at the last cycle; never when `every` is None."""
    return every is not None and (cycle % every == 0 or cycle == cycles - 1)


def montage_due(cfg, cycle: int) -> bool:
    """Whether a clustered cycle picks its montage's images (RUN_DIR/clusters.json): on image cycles,
    and at the run's last clustered cycle, whose montage `dcscale report` draws."""
    last = cfg.train.cycles if cfg.cluster.halt_after is None else min(cfg.cluster.halt_after, cfg.train.cycles)
    return images_due(cfg.output.images_every, cycle, cfg.train.cycles) or cycle == last - 1


# ---- which clusters, which images -----------------------------------------------------------------

def montage_clusters(sizes: np.ndarray, seed: int, n: int = MONTAGE_SAMPLE) -> list[tuple[int, str]]:
    """(cluster id, role) of a montage's rows: the largest and the smallest non-empty clusters, then the
    first n non-empty clusters of a permutation fixed by the run seed (so the same ids every cycle
    while they are non-empty), by id."""
    ids = np.flatnonzero(sizes > 0)
    if not len(ids):
        return []
    order = np.random.default_rng([int(seed), 0x4D4F4E]).permutation(len(sizes))
    sample = sorted(int(c) for c in order[sizes[order] > 0][:n])
    largest, smallest = int(ids[np.argmax(sizes[ids])]), int(ids[np.argmin(sizes[ids])])
    rows = [(largest, "largest")] + ([(smallest, "smallest")] if smallest != largest else [])
    return rows + [(c, "") for c in sample if c not in (largest, smallest)]


def pair_counts(labels: np.ndarray, truth: np.ndarray, k: int, n_classes: int,
                clusters: np.ndarray | None = None) -> np.ndarray:
    """int64 [len(clusters) (or k), n_classes]: how many images of each cluster carry each class;
    entries -1 in either array are left out. Counted in chunks, so temporary memory does not grow
    with N."""
    row_of = np.arange(k) if clusters is None else np.full(k, -1)
    if clusters is not None:
        row_of[np.asarray(clusters, dtype=np.int64)] = np.arange(len(clusters))
    n_rows = k if clusters is None else len(clusters)
    counts = np.zeros(n_rows * n_classes, np.int64)
    for lo in range(0, len(labels), _CHUNK):
        lab, cls = labels[lo:lo + _CHUNK], truth[lo:lo + _CHUNK]
        both = (lab >= 0) & (cls >= 0)
        rows, cls = row_of[lab[both]], cls[both].astype(np.int64)
        wanted = rows >= 0
        counts += np.bincount(rows[wanted] * n_classes + cls[wanted], minlength=n_rows * n_classes)
    return counts.reshape(n_rows, n_classes)


def cluster_record(cycle: int, rows: list[tuple[int, str]], nearest: dict[int, list[int]], labels: np.ndarray,
                   truth: np.ndarray | None, k: int) -> dict:
    """What the montage of a clustered cycle shows (JSON-able): every row's cluster id, role, size,
    nearest images (global indices) and, with ground truth, majority class and its share."""
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    clusters = []
    majority = {}
    if truth is not None and rows and (truth >= 0).any():
        ids = np.array([c for c, _ in rows])
        counts = pair_counts(labels, truth, k, int(truth.max()) + 1, ids)
        for cluster, row in zip(ids, counts):
            if row.sum():
                majority[int(cluster)] = (int(row.argmax()), float(row.max() / row.sum()))
    for cluster, role in rows:
        entry = {"id": cluster, "role": role, "size": int(sizes[cluster]), "nearest": list(nearest.get(cluster, []))}
        if cluster in majority:
            entry["class"], entry["share"] = majority[cluster]
        clusters.append(entry)
    return {"cycle": int(cycle), "clusters": clusters}


def write_record(run_dir: Path, record: dict) -> None:
    """Replace RUN_DIR/clusters.json (a rename: a reader never sees half a file)."""
    path = Path(run_dir) / RECORD_NAME
    atomic_write_text(path, json.dumps(record))


def read_record(run_dir: Path, n_images: int) -> dict | None:
    """The newest montage record, or None when there is none, or it is damaged or names images beyond
    the shard set's `n_images`."""
    try:
        record = json.loads((Path(run_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None

    def whole(value, below=None) -> bool:  # an int >= 0 (not a bool), under `below` when given
        return type(value) is int and value >= 0 and (below is None or value < below)

    ok = isinstance(record, dict) and whole(record.get("cycle")) and isinstance(record.get("clusters"), list) and all(
        isinstance(c, dict) and whole(c.get("id")) and whole(c.get("size")) and isinstance(c.get("role"), str)
        and isinstance(c.get("nearest"), list) and all(whole(i, n_images) for i in c["nearest"])
        for c in record["clusters"])
    return record if ok else None


# ---- drawing --------------------------------------------------------------------------------------

@functools.cache
def _font():
    """PIL's built-in bitmap font: ~30x faster to draw than a FreeType font, with which text was most
    of a montage's cost. (Pillow < 10.1: load_default() is that font.)"""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


@functools.cache
def _measure():
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = _measure().multiline_textbbox((0, 0), text, font=font, spacing=1)
    return right - left, bottom - top


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] as PNG, rows unfiltered and deflated at level 2: for these
    mostly flat pictures smaller than PIL's level-1 PNG, and 2-3x faster to write (encoding was half of
    an image cycle's cost)."""
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + image[0].size), np.uint8)  # each row: filter type 0, then its bytes
    rows[:, 1:] = image.reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 2))
            + chunk(b"IEND", b""))


def _with_title(body: np.ndarray, title: str, font) -> np.ndarray:
    """`body` (grey or colour) under `title` (wrapped to the body's width), on white."""
    char_w = max(1, _text_size(font, "n")[0])
    lines = textwrap.wrap(title, width=max(20, body.shape[1] // char_w)) or [""]
    text = "\n".join(lines)
    text_w, text_h = _text_size(font, text)
    height, width = text_h + 8, max(body.shape[1], text_w + 8)
    canvas = np.full((height + body.shape[0], width, *body.shape[2:]), 255, np.uint8)
    canvas[height:, :body.shape[1]] = body
    image = Image.fromarray(canvas)
    ImageDraw.Draw(image).multiline_text((4, 3), text, fill=_ink(image), font=font)
    return np.asarray(image)


def _ink(image: Image.Image):
    return 0 if image.mode == "L" else _INK


def montage_tile(shards) -> int:
    """Tile side in pixels: the stored image size within [32, 96] (96 when sizes vary)."""
    return min(max(shards.image_size or 96, 32), 96)


def _tiles(shards, indices: list[int], tile: int, channels: int) -> np.ndarray:
    """Images `indices` as uint8 [n, tile, tile, channels]: each one's centre square, scaled (pixels
    kept sharp when enlarged); images of one size are cut and scaled together."""
    out = np.empty((len(indices), tile, tile, channels), np.uint8)
    by_shape: dict[tuple, list] = {}
    for position, index in enumerate(indices):
        image, _ = shards.read_uint8(int(index), channels)
        if image is None:
            out[position] = _MISSING[:channels]
        else:
            by_shape.setdefault(tuple(image.shape), []).append((position, image.numpy()))
    for (_, h, w), items in by_shape.items():
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        batch = np.stack([a for _, a in items])[:, :, top:top + side, left:left + side].transpose(0, 2, 3, 1)
        if tile % side == 0:
            batch = batch.repeat(tile // side, 1).repeat(tile // side, 2)
        elif side != tile:
            resample = Image.Resampling.BILINEAR if side > tile else Image.Resampling.NEAREST
            batch = np.stack([np.asarray(Image.fromarray(a.squeeze(2) if channels == 1 else a).resize(
                (tile, tile), resample)).reshape(tile, tile, channels) for a in batch])
        out[[p for p, _ in items]] = batch
    return out


def _row_text(entry: dict) -> str:
    role = f" ({entry['role']})" if entry.get("role") else ""
    lines = [f"#{entry['id']}{role}", f"{entry['size']:,} images"]
    if "class" in entry:
        lines.append(f"class {entry['class']}: {entry['share']:.0%}")
    return "\n".join(lines)


def render_montage(shards, record: dict, per_row: int = MONTAGE_PER_ROW) -> np.ndarray:
    """One row per cluster of `record`: its label, then its images nearest to the centroid (grey
    for a grey shard set)."""
    font = _font()
    tile = montage_tile(shards)
    channels = 1 if shards.channels == 1 else 3
    texts = [_row_text(e) for e in record["clusters"]]
    sizes = [_text_size(font, t) for t in texts] or [(0, 0)]
    label_w = max(w for w, _ in sizes) + 10
    row_h = max(tile, max(h for _, h in sizes) + 4) + _GAP
    canvas = np.full((max(1, len(texts)) * row_h, label_w + per_row * (tile + _GAP), channels), 255, np.uint8)
    places = [(r, j) for r, entry in enumerate(record["clusters"]) for j in range(len(entry["nearest"][:per_row]))]
    tiles = _tiles(shards, [record["clusters"][r]["nearest"][j] for r, j in places], tile, channels)
    for (r, j), picture in zip(places, tiles):
        y, x = r * row_h + (row_h - _GAP - tile) // 2, label_w + j * (tile + _GAP)
        canvas[y:y + tile, x:x + tile] = picture
    image = Image.fromarray(canvas.squeeze(2) if channels == 1 else canvas)
    draw = ImageDraw.Draw(image)
    for r, text in enumerate(texts):
        draw.multiline_text((4, r * row_h + 1), text, fill=_ink(image), font=font, spacing=1)
    title = (f"cycle {record['cycle']}: the {per_row} images nearest to the centroid of "
             f"{len(texts)} clusters (a fixed sample, the largest, the smallest)")
    return _with_title(np.asarray(image), title, font)


def first_conv(model):
    """The body's first trainable convolution (a Sobel front is a fixed kernel, not a Conv2d)."""
    import torch

    return next((m for m in model.body.modules() if isinstance(m, torch.nn.Conv2d)), None)


def render_filters(model, cycle: int) -> np.ndarray | None:
    """The first convolution's filters in a grid: colour for 3 input channels, else one grey square
    per input channel side by side (x- and y-gradient after a Sobel front); mid-grey is 0, each
    filter scaled by its largest |weight|."""
    conv = first_conv(model)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu().numpy()  # [out, in, kh, kw]
    n, c, kh, kw = w.shape
    w = w / np.maximum(np.abs(w).reshape(n, -1).max(1), 1e-12)[:, None, None, None]
    pixels = np.clip(np.round((w * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
    if c == 3:
        cells = pixels.transpose(0, 2, 3, 1)  # [n, kh, kw, 3]
    else:  # grey, channels side by side, 1 pixel apart
        cells = np.full((n, kh, c * (kw + 1) - 1), 255, np.uint8)
        for i in range(c):
            cells[:, :, i * (kw + 1):i * (kw + 1) + kw] = pixels[:, i]
    zoom = max(1, 40 // kh)
    cells = cells.repeat(zoom, 1).repeat(zoom, 2)
    cols = math.ceil(math.sqrt(n * cells.shape[1] / cells.shape[2]))  # about square overall
    rows = math.ceil(n / cols)
    ch, cw = cells.shape[1] + 2 * _GAP, cells.shape[2] + 2 * _GAP
    canvas = np.full((rows * ch, cols * cw, *cells.shape[3:]), 255, np.uint8)
    for i, cell in enumerate(cells):
        y, x = (i // cols) * ch + _GAP, (i % cols) * cw + _GAP
        canvas[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
    from dcscale.models.common import SobelFilter

    after_sobel = any(isinstance(m, SobelFilter) for m in model.body.modules())
    sobel = ", on the Sobel front's x- and y-gradients" if after_sobel else ""
    title = f"cycle {cycle}: first-layer filters, {n} x {c}x{kh}x{kw}{sobel}"
    return _with_title(canvas, title, _font())


def _binned(counts: np.ndarray, names: list[str], axis: int) -> tuple[np.ndarray, list[str]]:
    """At most HEATMAP_MAX_CELLS rows (axis 0) or columns (axis 1): consecutive ones summed."""
    n = counts.shape[axis]
    if n <= HEATMAP_MAX_CELLS:
        return counts, names
    step = math.ceil(n / HEATMAP_MAX_CELLS)
    starts = np.arange(0, n, step)
    return np.add.reduceat(counts, starts, axis=axis), [f"{names[s]}.." for s in starts]


def render_heatmap(counts: np.ndarray, row_names: list[str], col_names: list[str], title: str,
                   row_title: str, col_title: str) -> np.ndarray:
    """Each row's shares (counts / row total), from white (0) to near black (the whole row), with the
    column names on top and the row names on the left (every n-th when cells are small); grey."""
    counts, row_names = _binned(np.asarray(counts, dtype=np.float64), row_names, 0)
    counts, col_names = _binned(counts, col_names, 1)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n_rows, n_cols = shares.shape
    cell = min(max(360 // max(n_rows, n_cols, 1), 3), 24)
    font = _font()
    row_w = max([_text_size(font, s)[0] for s in row_names + [row_title]]) + 6
    name_h = _text_size(font, "0123456789")[1] + 4
    col_w = max([_text_size(font, s)[0] for s in col_names] + [1])
    col_every = max(1, math.ceil((col_w + 3) / cell))
    row_every = max(1, math.ceil(name_h / cell))
    top = 2 * name_h + 2
    legend_h = name_h + 14
    legend = "100% of the row"
    ramp_w = 100
    width = max(row_w + n_cols * cell, row_w + ramp_w + 30 + _text_size(font, legend)[0]) + 4
    canvas = np.full((top + n_rows * cell + legend_h, width), 255, np.uint8)
    levels = (_LIGHT + shares * (_DARK - _LIGHT)).round().astype(np.uint8)
    canvas[top:top + n_rows * cell, row_w:row_w + n_cols * cell] = levels.repeat(cell, 0).repeat(cell, 1)
    # the legend: a 0..100% ramp under the map
    ramp_y = top + n_rows * cell + 6
    ramp = (_LIGHT + np.linspace(0, 1, ramp_w) * (_DARK - _LIGHT)).round().astype(np.uint8)
    canvas[ramp_y:ramp_y + 8, row_w + 24:row_w + 24 + ramp_w] = ramp[None]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((row_w, 1), col_title, fill=0, font=font)
    draw.text((2, name_h + 1), row_title, fill=0, font=font)
    for j in range(0, n_cols, col_every):
        draw.text((row_w + j * cell + 1, name_h + 1), col_names[j], fill=0, font=font)
    for i in range(0, n_rows, row_every):
        draw.text((2, top + i * cell + max(0, (cell - name_h) // 2) + 1), row_names[i], fill=0, font=font)
    draw.text((row_w, ramp_y - 2), "0%", fill=0, font=font)
    draw.text((row_w + 28 + ramp_w, ramp_y - 2), legend, fill=0, font=font)
    return _with_title(np.asarray(image), title, font)


def contingency(labels: np.ndarray, truth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [clusters, classes], cluster ids) of the non-empty clusters, sorted by majority class,
    then by that class's share (highest first), then by id: a diagonal when clusters match classes."""
    counts = pair_counts(labels, truth, k, int(truth.max()) + 1)
    ids = np.flatnonzero(counts.sum(1))
    counts = counts[ids]
    share = counts.max(1) / counts.sum(1)
    order = np.lexsort((ids, -share, counts.argmax(1)))
    return counts[order], ids[order]


def render_contingency(labels: np.ndarray, truth: np.ndarray, k: int, title: str) -> np.ndarray | None:
    """Pseudo-labels (rows: non-empty clusters, sorted by majority class) against classes (columns);
    None without labelled images."""
    if not (truth >= 0).any():
        return None
    counts, ids = contingency(labels, truth, k)
    return render_heatmap(counts, [str(c) for c in ids], [str(c) for c in range(counts.shape[1])],
                          f"{title} (rows: clusters, sorted by majority class)", "cluster", "class")


def render_confusion(confusion: np.ndarray, title: str) -> np.ndarray:
    names = [str(c) for c in range(confusion.shape[0])]
    return render_heatmap(confusion, names, names, f"{title} (rows: true class)", "true", "predicted class")


# ---- one cycle's images ---------------------------------------------------------------------------

def cycle_images(cfg, cycle: int, metrics: dict, model, shards, run_dir: Path, labels: np.ndarray,
                 truth: np.ndarray | None, knn_confusion: np.ndarray | None) -> dict:
    """{tag: uint8 [H, W] or [H, W, 3]} for this cycle (rank 0). On the cycles images_due names: the filters,
    and on a clustered cycle the montage and (with ground truth) the contingency heatmap; the k-NN
    confusion whenever the monitor ran."""
    images = {}
    clustered, k = bool(metrics.get("clustered")), cfg.cluster.k
    if images_due(cfg.output.images_every, cycle, cfg.train.cycles):
        filters = render_filters(model, cycle)
        if filters is not None:
            images[TAG_FILTERS] = filters
        record = read_record(run_dir, len(shards)) if clustered else None
        if record is not None and record["cycle"] == cycle and record["clusters"]:
            images[TAG_MONTAGE] = render_montage(shards, record)
        if clustered and truth is not None:
            nmi = metrics.get("nmi_gt")
            heat = render_contingency(labels, truth, k, f"cycle {cycle}: pseudo-labels against classes"
                                      + (f", NMI {nmi:.3f}" if isinstance(nmi, float) else ""))
            if heat is not None:
                images[TAG_CONTINGENCY] = heat
    if knn_confusion is not None:
        top1 = metrics.get("knn_top1")
        score = f", top-1 {top1:.3f}" if top1 is not None else ""
        images[TAG_KNN_CONFUSION] = render_confusion(knn_confusion, f"cycle {cycle}: k-NN votes on data.test{score}")
    return images
