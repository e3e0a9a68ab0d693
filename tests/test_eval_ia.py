"""`dcscale ia`: Initial Alignment samples, their summary, the recommendation and --select-seed."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from dcscale.cli import main
from dcscale.data.shardset import ShardSet
from dcscale.cluster.metrics import nmi_scores
from dcscale.eval.ia import parse_vary, recommend, summarise


def nmi_by_hand(a, b):
    """NMI with the arithmetic-mean normalisation: 2 I(a; b) / (H(a) + H(b)), natural logs."""
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    h = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())  # noqa: E731
    mi = sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())
    return 2 * mi / (h(pa) + h(pb))


def ia(gt, pseudo) -> float:
    """What `dcscale ia` reports as a sample's IA: the arithmetic NMI of nmi_scores."""
    return nmi_scores(np.array(gt), np.array(pseudo))["arithmetic"]


def test_ia_equals_nmi_by_hand_on_a_known_case():
    gt = [0, 0, 0, 1, 1, 1]
    pseudo = [0, 0, 1, 1, 2, 2]
    # H(gt) = ln 2, H(pseudo) = ln 3; only cluster 1 (a third of the images) is mixed, half/half,
    # so H(gt | pseudo) = (1/3) ln 2 and I = H(gt) - H(gt | pseudo) = (2/3) ln 2.
    mi = 2 * math.log(2) / 3
    expected = 2 * mi / (math.log(2) + math.log(3))
    assert nmi_by_hand(gt, pseudo) == pytest.approx(expected)
    assert ia(gt, pseudo) == pytest.approx(expected)
    assert ia(gt, [5, 5, 5, 7, 7, 7]) == pytest.approx(1.0)
    # Unlabelled images (-1) are left out.
    assert ia(gt + [-1, -1], pseudo + [0, 2]) == pytest.approx(expected)


def test_summary_and_recommendation():
    s = summarise([0.1, 0.2, 0.3, 0.4, 0.5])
    assert (s["median"], s["q1"], s["q3"], s["n"]) == (0.3, 0.2, 0.4, 5)
    assert s["iqr"] == pytest.approx(0.2)
    assert recommend({"10": {"median": 0.5, "q1": 0.4}, "50": {"median": 0.6, "q1": 0.1},
                      "100": {"median": 0.6, "q1": 0.3}}) == "100"
    assert parse_vary("model.sobel=true,false") == ("model.sobel", [True, False])
    assert parse_vary("cluster.pca_dim=null,16") == ("cluster.pca_dim", [None, 16])


@pytest.fixture
def ia_config(tmp_path, digits_train_shards):
    cfg = tmp_path / "ia.yaml"
    cfg.write_text(f"seed: 3\ndata: {{train: {digits_train_shards}, image_size: 32, workers: 0}}\n"
                   "model: {arch: lenet5}\ncluster: {k: 10, pca_dim: 16}\n")
    return cfg


def test_ia_cli_end_to_end(ia_config, digits_train_shards, tmp_path, capsys):
    out = tmp_path / "ia"
    code = main(["ia", "--config", str(ia_config), "--vary", "cluster.k=5,10", "--seeds", "3", "--out", str(out),
                 "--select-seed", "--save-labels"])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "ia.json").read_text())
    assert result["key"] == "cluster.k" and result["values"] == [5, 10]
    assert len(result["samples"]) == 6
    assert sorted((s["value"], s["seed"]) for s in result["samples"]) == [(5, 3), (5, 4), (5, 5), (10, 3), (10, 4), (10, 5)]

    # Every sample's IA is the NMI of its saved pseudo-labels with the ground truth, computed by hand.
    gt = ShardSet(digits_train_shards).labels()
    for s in result["samples"]:
        labels = np.load(out / "labels" / f"cluster.k={s['value']}_seed{s['seed']}.npy")
        assert len(labels) == len(gt) and labels.max() < s["value"]
        assert s["ia"] == pytest.approx(nmi_by_hand(list(gt), list(labels)), abs=1e-9)
        assert 0.3 < s["ia"] < 1.0  # random LeNet features on digits are far from chance (0)
        # the original DeepCluster's NMI (scikit-learn <= 0.20 normalised by the geometric mean)
        assert s["ia_geometric"] == pytest.approx(
            normalized_mutual_info_score(gt, labels, average_method="geometric"), abs=1e-9)

    for v in ("5", "10"):
        ias = [s["ia"] for s in result["samples"] if str(s["value"]) == v]
        assert result["summary"][v]["median"] == pytest.approx(float(np.median(ias)))
        geometric = [s["ia_geometric"] for s in result["samples"] if str(s["value"]) == v]
        assert result["summary_geometric"][v]["median"] == pytest.approx(float(np.median(geometric)))
    best_value = max(("5", "10"), key=lambda v: result["summary"][v]["median"])
    assert str(result["recommendation"]["value"]) == best_value
    assert f"recommended cluster.k={best_value}" in printed.strip().splitlines()[-1]

    with Image.open(out / "ia_boxplot.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"ia/cluster.k=5", "ia/cluster.k=10", "ia/by_value"} <= set(acc.Tags()["histograms"])

    # --select-seed: the best init of the recommended value, loadable as the training run's model.init.
    ckpt = torch.load(out / "best_init.pt", weights_only=True)
    best = max((s for s in result["samples"] if str(s["value"]) == best_value), key=lambda s: s["ia"])
    assert ckpt["seed"] == best["seed"] and ckpt["ia"] == pytest.approx(best["ia"])
    assert result["best_init"]["train_command"] in printed
    assert f"model.init={out / 'best_init.pt'}" in result["best_init"]["train_command"]
    assert result["best_init"]["train_command"].endswith(f"output.dir={out / 'train'}"), "a run directory of its own"
    from dcscale.cycle.network import load_checkpoint_model
    from dcscale.train.checkpoint import load_initial_weights
    model, cfg, shape = load_checkpoint_model(out / "best_init.pt", torch.device("cpu"))
    assert cfg.seed == best["seed"] and cfg.cluster.k == int(best_value) and shape == [1, 32, 32]
    load_initial_weights(model, str(out / "best_init.pt"))


def test_ia_same_under_torchrun(ia_config, tmp_path, capsys):
    assert main(["ia", "--config", str(ia_config), "--vary", "cluster.pca_dim=8,null", "--seeds", "2",
                 "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "dcscale", "ia", "--config", str(ia_config), "--vary", "cluster.pca_dim=8,null",
                          "--seeds", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "ia.json").read_text())
    two = json.loads((tmp_path / "two" / "ia.json").read_text())
    assert two["world_size"] == 2
    assert [s["ia"] for s in two["samples"]] == pytest.approx([s["ia"] for s in one["samples"]], abs=1e-6)


def test_ia_errors_are_one_line(ia_config, tmp_path, capsys):
    assert main(["ia", "--config", str(ia_config), "--vary", "cluster.kk=5,10", "--out", str(tmp_path)]) == 2
    assert "unknown config key 'cluster.kk'" in capsys.readouterr().err
    assert main(["ia", "--config", str(ia_config), "--vary", "cluster.k=1,10", "--out", str(tmp_path)]) == 2
    assert "cluster.k" in capsys.readouterr().err
