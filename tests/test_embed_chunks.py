"""Reading an embedding chunk by chunk: `iter_embeddings` yields each chunk file in index order, one at a
time (a later chunk is not read before it is asked for), the same rows as `read_embeddings`; a damaged
chunk is one line."""

from __future__ import annotations

import numpy as np
import pytest
from test_embed import embed_args
from test_export import write_test_checkpoint

from dcscale.cli import main
from dcscale.errors import DcscaleError
from dcscale.eval.embed import iter_embeddings, read_embeddings

N_DIGITS_TRAIN = 1437


@pytest.fixture(scope="module")
def embedding(tmp_path_factory, digits_train_shards):
    root = tmp_path_factory.mktemp("chunks")
    write_test_checkpoint(root / "last.pt", "lenet5", channels=1, size=32, k=10)
    assert main(embed_args(root / "last.pt", digits_train_shards, root / "emb", "--chunk-rows", "500")) == 0
    return root / "emb"


def test_chunks_come_one_at_a_time_in_index_order(embedding, capsys):
    capsys.readouterr()
    chunks = list(iter_embeddings(embedding))
    assert [len(indices) for indices, _ in chunks] == [500, 500, 437]  # never more than --chunk-rows rows
    assert all(feats.shape == (len(indices), 84) and feats.dtype == np.float16 for indices, feats in chunks)
    indices, feats = read_embeddings(embedding)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in chunks]), np.arange(N_DIGITS_TRAIN))
    np.testing.assert_array_equal(np.concatenate([f for _, f in chunks]), feats)
    np.testing.assert_array_equal(indices, np.arange(N_DIGITS_TRAIN))


def test_a_chunk_is_read_when_asked_for_and_a_damaged_one_is_one_line(embedding, tmp_path):
    copy = tmp_path / "emb"
    copy.mkdir()
    for path in embedding.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    chunks = iter_embeddings(copy)
    first_indices, _ = next(chunks)
    assert first_indices[0] == 0
    (copy / "feats-000000001000.npy").unlink()  # the third chunk: not read yet, so the second still comes
    second_indices, _ = next(chunks)
    assert second_indices[0] == 500
    with pytest.raises(DcscaleError, match="cannot read chunk feats-000000001000.npy"):
        next(chunks)
    np.save(copy / "feats-000000001000.npy", np.zeros((10, 84), np.float16))  # too few rows
    expected = r"holds 437 indices and features of shape \(10, 84\); embed.json lists 437 rows of 84"
    with pytest.raises(DcscaleError, match=expected) as err:
        read_embeddings(copy)
    assert "\n" not in str(err.value)
