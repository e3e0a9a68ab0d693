"""Weighted k-NN accuracy (as in InstDisc / DINO) and the k-NN monitor of a training run.

Votes: each test row's k nearest training rows by cosine similarity vote for their class with
weight exp(sim / T). The monitor keeps the memory bank distributed: every rank scores all test rows
against its own slice of the training rows, only the k best (similarity, label) pairs per test row
travel to rank 0, which merges them and votes. Nothing of size N_train x D sits on one host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dcscale import dist

_CHUNK = 1024  # test rows per similarity block: keeps the [chunk, N_train] matrix small


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def nearest_neighbours(test_feats, train_feats, train_labels, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities [n_test, k] and the neighbours' labels [n_test, k].

    Fewer than k training rows: the missing columns get similarity -inf and label -1 (no vote).
    """
    test = F.normalize(_as_tensor(test_feats, torch.float32), dim=1)
    train = F.normalize(_as_tensor(train_feats, torch.float32), dim=1)
    labels = _as_tensor(train_labels, torch.int64)
    n_test, kk = test.shape[0], min(k, train.shape[0])
    sims = torch.full((n_test, k), float("-inf"))
    nbr_labels = torch.full((n_test, k), -1, dtype=torch.int64)
    if kk == 0:
        return sims, nbr_labels
    for start in range(0, n_test, _CHUNK):
        block = test[start:start + _CHUNK] @ train.T
        top, idx = block.topk(kk, dim=1)
        sims[start:start + _CHUNK, :kk] = top
        nbr_labels[start:start + _CHUNK, :kk] = labels[idx]
    return sims, nbr_labels


def vote(sims: torch.Tensor, nbr_labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Predicted class per row from neighbours' (similarity, label): sum of exp(sim/T) per class."""
    weights = torch.exp(sims / temperature)  # exp(-inf) = 0: padding columns do not vote
    valid = nbr_labels >= 0
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    scores.scatter_add_(1, nbr_labels.clamp(min=0), weights)
    return scores.argmax(dim=1)


def merge_topk(sims: torch.Tensor, nbr_labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best columns of per-rank candidates concatenated along dim 1."""
    top, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    return top, nbr_labels.gather(1, idx)


def _features_fn(model):
    body = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
    return body.features


@dataclass
class KnnResult:
    top1: float  # the same on every rank (NaN without labels)
    confusion: np.ndarray | None = None  # rank 0: int64 [classes, classes], rows true, columns predicted


@torch.no_grad()
def knn_evaluate(model, train_shardset, test_shardset, transform, env, cfg) -> KnnResult:
    """Weighted k-NN top-1 of the model's features, data.train as memory bank and data.test as queries
    (the same on every rank, NaN without labels), and on rank 0 the confusion matrix of the votes
    (labelled queries). Collective: every rank must call it."""
    from dcscale.cycle.phases import extract_features

    train_gt, test_gt = train_shardset.labels(), test_shardset.labels()
    if train_gt is None or test_gt is None:
        return KnnResult(float("nan"))
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    try:
        fn = _features_fn(model)
        kwargs = dict(env=env, batch_size=cfg.data.extract_batch_size, workers=cfg.data.workers,
                      dtype=cfg.cluster.feature_dtype)
        tr_idx, tr_feats, _ = extract_features(fn, train_shardset, transform, **kwargs)
        te_idx, te_feats, _ = extract_features(fn, test_shardset, transform, **kwargs)
    finally:
        net.train(was_training)
    dim = max(tr_feats.shape[1] if tr_feats.size else 0, te_feats.shape[1] if te_feats.size else 0)
    dim = dist.broadcast_object(dim) if env.world_size > 1 else dim

    # Every rank needs every query row; the memory bank stays where it was extracted.
    te_feats = te_feats.reshape(len(te_idx), dim) if len(te_idx) else np.zeros((0, dim), te_feats.dtype)
    all_te_idx = dist.all_gather_rows(te_idx)
    all_te_feats = dist.all_gather_rows(te_feats)
    tr_labels = train_gt[tr_idx] if len(tr_idx) else np.zeros(0, np.int64)
    keep = tr_labels >= 0
    tr_feats = tr_feats.reshape(len(tr_idx), dim) if len(tr_idx) else np.zeros((0, dim), np.float32)
    sims, nbr = nearest_neighbours(all_te_feats, tr_feats[keep], tr_labels[keep], cfg.eval.knn_k)

    # Rank 0 merges every rank's k candidates per query: [W * n_test, k] -> [n_test, W * k].
    cand = np.concatenate([sims.numpy().astype(np.float32), nbr.numpy().astype(np.float32)], axis=1)
    gathered = dist.gather_rows_to_main(cand)
    result, confusion = float("nan"), None
    if gathered is not None:
        n_test, k = len(all_te_idx), cfg.eval.knn_k
        per_rank = torch.from_numpy(gathered).reshape(-1, n_test, 2 * k)
        all_sims = per_rank[:, :, :k].permute(1, 0, 2).reshape(n_test, -1)
        all_nbr = per_rank[:, :, k:].permute(1, 0, 2).reshape(n_test, -1).to(torch.int64)
        sims, nbr = merge_topk(all_sims, all_nbr, k)
        truth = torch.from_numpy(test_gt[all_te_idx].astype(np.int64))
        labelled = truth >= 0
        num_classes = int(max(train_gt.max(initial=0), test_gt.max(initial=0))) + 1
        if labelled.any():
            pred = vote(sims, nbr, cfg.eval.knn_temperature, num_classes)
            result = float((pred[labelled] == truth[labelled]).double().mean())
            pairs = truth[labelled].numpy() * num_classes + pred[labelled].numpy()
            confusion = np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    top1 = float(dist.broadcast_object(result)) if env.world_size > 1 else result
    return KnnResult(top1, confusion)
