"""`dcscale embed`: every image's features exactly once, in index order, the same under 1 and 2 processes
(real gloo under torchrun) and the same as the probe's extraction; one line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_export import write_test_checkpoint

from dcscale import dist
from dcscale.cli import main
from dcscale.data.shardset import ShardSet
from dcscale.cycle import network
from dcscale.eval import features as ft
from dcscale.eval.embed import read_embeddings

N_DIGITS_TRAIN = 1437


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "last.pt"
    write_test_checkpoint(path, "lenet5", channels=1, size=32, k=10)
    return path


def embed_args(ckpt, shards, out, *extra) -> list[str]:
    return ["embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out), "--workers", "0",
            "--batch-size", "200", *extra]


def test_two_processes_write_every_index_once_and_match_one(lenet_checkpoint, digits_train_shards, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(embed_args(lenet_checkpoint, digits_train_shards, one, "--chunk-rows", "500")) == 0
    printed = capsys.readouterr().out
    assert f"embed: {N_DIGITS_TRAIN} of {N_DIGITS_TRAIN} images x 84 (features of lenet5) float16 in 3 chunk(s)" \
        in printed

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "dcscale", *embed_args(lenet_checkpoint, digits_train_shards, two, "--chunk-rows",
                                                       "500")],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "in 4 chunk(s) by 2 process(es)" in run.stdout  # 719 + 718 rows, 2 chunks each

    summary = json.loads((two / "embed.json").read_text())
    assert (summary["count"], summary["dim"], summary["world_size"], summary["skipped"]) == (N_DIGITS_TRAIN, 84, 2, [])
    assert [c["first"] for c in summary["chunks"]] == [0, 500, 718, 1218]
    for out in (one, two):
        indices, feats = read_embeddings(out)
        np.testing.assert_array_equal(indices, np.arange(N_DIGITS_TRAIN))  # each index once, in index order
        assert feats.dtype == np.float16 and feats.shape == (N_DIGITS_TRAIN, 84)
    np.testing.assert_array_equal(read_embeddings(two)[1], read_embeddings(one)[1])


def test_a_conv_layer_is_what_the_probe_extracts(lenet_checkpoint, digits_train_shards, tmp_path, capsys):
    out = tmp_path / "relu2"
    assert main(embed_args(lenet_checkpoint, digits_train_shards, out, "--layer", "relu2", "--pool-dim", "64")) == 0
    assert "x 64 (relu2 of lenet5)" in capsys.readouterr().out  # 16 channels x 10x10 pooled to 2x2
    indices, feats = read_embeddings(out)

    model, cfg, shape = network.load_checkpoint_model(lenet_checkpoint, torch.device("cpu"))
    shardset = ShardSet(digits_train_shards)
    probe_feats, _ = ft.labelled_rows(ft.layer_fn(model, "relu2", 64), shardset,
                                      network.eval_transform_for(cfg, *shape[:2]), dist.get_env(), 200, 0)
    np.testing.assert_array_equal(feats, probe_feats.astype(np.float16))

    image = network.eval_transform_for(cfg, *shape[:2]).finish(shardset.read_uint8(5, 1)[0][None])
    with torch.no_grad():
        direct = ft.pool_flatten(model.layer_activations(image, ["relu2"])["relu2"], 64)
    np.testing.assert_array_equal(feats[5], direct[0].numpy().astype(np.float16))


def test_a_backbone_export_embeds_like_its_checkpoint(lenet_checkpoint, digits_train_shards, tmp_path, capsys):
    backbone = tmp_path / "backbone.pt"
    assert main(["export", str(lenet_checkpoint), "--out", str(backbone), "--format", "backbone"]) == 0
    assert main(embed_args(lenet_checkpoint, digits_train_shards, tmp_path / "a")) == 0
    assert main(embed_args(backbone, digits_train_shards, tmp_path / "b")) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(read_embeddings(tmp_path / "a")[1], read_embeddings(tmp_path / "b")[1])


def test_bad_inputs_are_one_line(lenet_checkpoint, digits_train_shards, tmp_path, capsys):
    out = tmp_path / "emb"

    def fails(argv, message):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    fails(embed_args(lenet_checkpoint, digits_train_shards, out, "--layer", "fc9"),
          "--layer fc9: no such layer in lenet5; available: features, conv1, relu1, conv2, relu2")
    fails(embed_args(lenet_checkpoint, tmp_path / "nowhere", out), "nowhere")
    fails(embed_args(lenet_checkpoint, digits_train_shards, out, "--chunk-rows", "0"), "--chunk-rows 0")
    assert not out.exists()

    assert main(embed_args(lenet_checkpoint, digits_train_shards, out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fails(embed_args(lenet_checkpoint, digits_train_shards, out), "already holds an embedding; give --force")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(embed_args(lenet_checkpoint, digits_train_shards, out, "--force", "--chunk-rows", "1000")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["embed.json", "feats-000000000000.npy", "feats-000000001000.npy",
                                                     "indices-000000000000.npy", "indices-000000001000.npy"]
