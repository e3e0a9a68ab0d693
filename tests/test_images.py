"""TensorBoard images of a run (cluster montages, first-layer filters, the contingency heatmap, the
k-NN confusion matrix), read back from real event files; and what they are drawn from."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcscale.cycle import images
from dcscale.cycle.phases import nearest_rows


def _event_images(run_dir) -> dict[str, dict[int, Image.Image]]:
    """{tag: {step: decoded image}} from the run's TensorBoard event files."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["images"]:
        out[tag] = {}
        for event in acc.Images(tag):
            picture = Image.open(io.BytesIO(event.encoded_image_string))
            assert picture.size == (event.width, event.height)
            picture.load()
            out[tag][event.step] = picture
    return out


def test_event_files_hold_the_documented_images(halted_image_run, digits_train_shards):
    run_dir, _ = halted_image_run  # cycle 0 clusters, cycle 1 keeps its labels (halt_after=1); images every cycle
    found = _event_images(run_dir)
    assert set(found) == {"clusters/montage", "filters/first_layer", "clusters/contingency", "eval/knn_confusion"}
    # montage and contingency on clustered cycles only; filters on every image cycle; the confusion when k-NN ran
    assert sorted(found["clusters/montage"]) == sorted(found["clusters/contingency"]) == [0]
    assert sorted(found["filters/first_layer"]) == sorted(found["eval/knn_confusion"]) == [0, 1]

    record = json.loads((run_dir / "clusters.json").read_text())
    assert record["cycle"] == 0 and len(record["clusters"]) == 10  # K = 10: every cluster has a row
    montage = found["clusters/montage"][0]
    tile = 32  # the digits are stored 8x8: shown enlarged 4x
    assert montage.height >= 10 * tile and montage.width >= images.MONTAGE_PER_ROW * tile
    # it is the record's rows drawn from the shard set, and a picture with content
    from dcscale.data.shardset import ShardSet

    np.testing.assert_array_equal(np.asarray(montage), images.render_montage(ShardSet(digits_train_shards), record))
    assert np.asarray(montage.convert("L"), dtype=np.float64).std() > 20, "not a blank picture"

    filters = found["filters/first_layer"][1]
    assert filters.width >= 3 * 40 and filters.height >= 2 * 40  # LeNet-5's 6 filters of 5x5, enlarged
    heat = np.asarray(found["clusters/contingency"][0])
    assert heat.shape[0] >= 10 * 24 and heat.shape[1] >= 10 * 24  # 10 clusters x 10 classes, 24 px cells
    confusion = np.asarray(found["eval/knn_confusion"][1])
    assert confusion.shape[0] >= 10 * 24 and confusion.shape[1] >= 10 * 24


def test_montage_rows_are_each_clusters_nearest_images(halted_image_run, digits_train_shards):
    from dcscale.data.shardset import ShardSet

    run_dir, _ = halted_image_run
    record = json.loads((run_dir / "clusters.json").read_text())
    labels = np.load(run_dir / "labels.npy")
    truth = ShardSet(digits_train_shards).labels()
    sizes = np.bincount(labels, minlength=10)
    roles = [(c["id"], c["role"]) for c in record["clusters"]]
    assert roles == images.montage_clusters(sizes, seed=0)
    assert roles[0] == (int(np.argmax(sizes)), "largest") and roles[1] == (int(np.argmin(sizes)), "smallest")
    for row in record["clusters"]:
        members = np.flatnonzero(labels == row["id"])
        assert row["size"] == len(members)
        assert len(row["nearest"]) == images.MONTAGE_PER_ROW and set(row["nearest"]) <= set(members)
        counts = np.bincount(truth[members], minlength=10)
        assert row["class"] == int(counts.argmax()) and row["share"] == pytest.approx(counts.max() / len(members))


def test_montage_keeps_its_clusters_while_they_are_not_empty():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, 100)
    first = images.montage_clusters(sizes, seed=3)
    assert first[0] == (int(np.argmax(sizes)), "largest") and first[1] == (int(np.argmin(sizes)), "smallest")
    sampled = [c for c, role in first if not role]
    assert sampled == sorted(sampled) and len({c for c, _ in first}) == len(first) >= images.MONTAGE_SAMPLE
    # another cycle: other sizes, the same sampled clusters; an emptied one is replaced by the next in line
    sizes2 = rng.integers(1, 50, 100)
    sizes2[sampled[0]] = 0
    second = images.montage_clusters(sizes2, seed=3)
    shown = {c for c, _ in second}
    assert set(sampled[1:]) <= shown and sampled[0] not in shown and len(shown) == len(second) >= images.MONTAGE_SAMPLE
    assert second[0] == (int(np.argmax(sizes2)), "largest")
    assert second[1] == (int(np.flatnonzero(sizes2 == sizes2[sizes2 > 0].min())[0]), "smallest")
    assert images.montage_clusters(np.zeros(5, int), seed=3) == []


def test_nearest_rows_are_the_smallest_distances_of_each_cluster():
    rng = np.random.default_rng(0)
    n = 500
    indices = np.arange(1000, 1000 + n)
    labels = rng.integers(0, 7, n)
    dist = rng.integers(0, 20, n).astype(np.float32)  # many ties: the lower index goes first
    got = nearest_rows(indices, labels, dist, [5, 2, 6], 4)
    for cluster in (5, 2, 6):
        members = np.flatnonzero(labels == cluster)
        order = members[np.lexsort((indices[members], dist[members]))][:4]
        assert got[cluster] == [int(i) for i in indices[order]]


@pytest.mark.parametrize("every, due", [(10, [0, 10, 20, 29]), (1, list(range(30))), (None, [])])
def test_image_cycles(every, due):
    assert [c for c in range(30) if images.images_due(every, c, 30)] == due


def test_contingency_sorts_clusters_by_majority_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, -1])
    truth = np.array([2, 2, 1, 0, 0, 1, 1, 1, 0])
    counts = images.pair_counts(labels, truth, 4, 3)
    np.testing.assert_array_equal(counts, [[0, 1, 2], [2, 0, 0], [0, 3, 0], [0, 0, 0]])
    rows, ids = images.contingency(labels, truth, 4)  # majority classes 2, 0, 1; cluster 3 is empty
    assert ids.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(rows, [[2, 0, 0], [0, 3, 0], [0, 1, 2]])
    picture = images.render_contingency(labels, truth, 4, "t")
    assert picture.dtype == np.uint8 and picture.shape[0] > 3 * 24 and picture.shape[1] > 3 * 24
