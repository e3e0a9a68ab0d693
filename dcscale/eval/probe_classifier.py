"""The linear probe's classifier: its settings and learning-rate schedules, SGD on features extracted
once (`train_linear_probe`; under torchrun `train_linear_probe_ranks`: each rank keeps its own rows and
the classifiers step on the sum of the ranks' gradients, `LinearClassifier.step_shared`), and online on
batches augmented afresh every epoch (`train_probe_online`). What each protocol feeds it:
`dcscale.eval.probe_protocols`; the command: `dcscale.eval.probe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcscale.config import EvalConfig
from dcscale.errors import DcscaleError

SCHEDULES = ("cosine", "step", "constant", "inv_sqrt")


@dataclass
class ProbeSettings:
    epochs: int = EvalConfig.probe_epochs
    lr: float = EvalConfig.probe_lr
    momentum: float = 0.9
    weight_decay: float = EvalConfig.probe_weight_decay
    batch_size: int = EvalConfig.probe_batch_size
    # cosine | step (x0.1 at 50% and 75% of the epochs) | constant | inv_sqrt (both references:
    # lr / sqrt(1 + lr * weight_decay * t) at iteration t)
    schedule: str = "cosine"
    seed: int = 0
    standardise: bool = True  # zero mean, unit variance per feature (ours; neither reference does)
    init: str = "normal"  # normal: weights N(0, 0.01), bias 0 (ours) | torch: nn.Linear's own (both references)


def _lr_at(settings: ProbeSettings, epoch: int, step: int) -> float:
    """The learning rate of iteration `step` (counted from 0 over all epochs), in epoch `epoch`."""
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
    if settings.schedule == "step":
        return settings.lr * 0.1 ** sum(epoch >= settings.epochs * f for f in (0.5, 0.75))
    if settings.schedule == "inv_sqrt":
        return settings.lr / math.sqrt(1 + settings.lr * settings.weight_decay * step)
    return settings.lr


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per dimension, with the train set's statistics (constant dims -> 0)."""
    x = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-6)
    return (x - mean) / std, (y - mean) / std


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


class LinearClassifier:
    """The logistic regression and its SGD: `step` sets the scheduled learning rate, then takes one
    step on a batch. `generator` (seeded by settings.seed) also draws the fast path's batch order."""

    def __init__(self, dim: int, num_classes: int, settings: ProbeSettings, device=None):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init, reproducible from the seed
            torch.manual_seed(settings.seed)
            self.linear = nn.Linear(dim, num_classes)
        if settings.init == "normal":
            with torch.no_grad():
                self.linear.weight.normal_(0.0, 0.01, generator=self.generator)
                self.linear.bias.zero_()
        self.linear.to(device)
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()
        self.iteration = 0
        self.loss_sum = torch.zeros((), device=device)  # the summed loss of this epoch's batches (all ranks')
        self.epoch_losses: list[float] = []  # each epoch's mean batch loss over the train set

    def end_epoch(self, rows: int) -> None:
        """Records the epoch's mean loss over its `rows` train rows (every rank's)."""
        self.epoch_losses.append(float(self.loss_sum) / max(rows, 1))
        self.loss_sum.zero_()

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """One SGD step on (x, y); returns the logits (for the references' running train accuracy)."""
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.settings, epoch, self.iteration)
        logits = self.linear(x)
        loss = self.loss_fn(logits, y)
        self.loss_sum += loss.detach() * len(y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return logits.detach()

    def step_shared(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """One SGD step on a batch split over ranks, this rank holding rows (x, y) of it (maybe none).
        The gradient of the batch's mean loss is the sum over ranks of each rank's summed-loss gradient,
        over the batch's row count: one all-reduce of D x C + C + 2 floats (the count and the summed loss
        ride along).
        Every rank then takes the same step, so the classifiers stay equal. Returns this rank's logits;
        None (no step) when no rank had a row, as `step`'s callers skip an empty batch."""
        from dcscale import dist

        logits = self.linear(x)
        self.opt.zero_grad(set_to_none=False)
        loss_here = F.cross_entropy(logits, y, reduction="sum")
        loss_here.backward()
        params = list(self.linear.parameters())
        rows_here = torch.tensor([float(len(y))], device=logits.device)
        packed = torch.cat([p.grad.reshape(-1) for p in params] + [rows_here, loss_here.detach().reshape(1)])
        dist.all_reduce_tensor_(packed)
        rows = float(packed[-2])
        self.loss_sum += packed[-1]
        if rows == 0:
            return None
        offset = 0
        for p in params:
            p.grad.copy_(packed[offset:offset + p.numel()].view_as(p.grad)).div_(rows)
            offset += p.numel()
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.settings, epoch, self.iteration)
        self.opt.step()
        self.iteration += 1
        return logits.detach()


# A probe "did not settle" when its final weights fit the train set clearly worse than its SGD's iterates
# did on average over its best epoch: the iterates bounce (the learning rate is too high for the features'
# scale) and training stopped at a bad point of the bounce. On 40 Fashion-MNIST networks under the Deep
# Dive probe (lr 0.01, unstandardised), the final loss was 0.72-1.04x the best epoch's (at most 0.019 nats
# above it) on 35, and 1.15-2.33x (0.069-2.7 nats above) on 5, whose test top-1 was 3.2-17.0 points under
# the same network's at lr 0.001 (docs/evaluation.md). The floor in nats keeps near-zero losses (a
# separable set) from tripping the ratio.
UNSETTLED_LOSS_RATIO = 1.1
UNSETTLED_LOSS_FLOOR = 0.05


def settle_numbers(epoch_losses: list[float], train_loss: float) -> dict:
    """The settle check's numbers for a probe's result: each epoch's mean batch loss, the final weights'
    loss over the train set, and whether it stayed near the best epoch's (UNSETTLED_LOSS_RATIO times it,
    or UNSETTLED_LOSS_FLOOR nats above it)."""
    best = min(epoch_losses)
    settled = train_loss <= max(UNSETTLED_LOSS_RATIO * best, best + UNSETTLED_LOSS_FLOOR)
    return {"epoch_losses": [round(v, 5) for v in epoch_losses], "train_loss": round(train_loss, 5),
            "settled": bool(settled)}


def unsettled_warning(layer: str, res: dict, lr: float) -> str | None:
    """One line for a probe that did not settle (None when it did, or its result has no settle check)."""
    if res.get("settled", True):
        return None
    return (f"probe {layer}: the classifier did not settle: its final train loss {res['train_loss']:.3f} is "
            f"{res['train_loss'] / min(res['epoch_losses']):.1f}x its best epoch's mean {min(res['epoch_losses']):.3f} "
            f"(SGD bounces at lr {lr:g} on these features), so its top-1 may be several points low; probe again "
            f"with a lower --lr (e.g. {lr / 10:g}) and keep the probe with the higher train top-1")


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       settings: ProbeSettings, num_classes: int | None = None) -> dict:
    """Multinomial logistic regression on fixed features (standardised if settings.standardise);
    returns top-1/top-5 on both sets. Under several ranks, each passes its own rows
    (`train_linear_probe_ranks`)."""
    from dcscale import dist

    if dist.get_env().distributed:
        return train_linear_probe_ranks(train_x, train_y, test_x, test_y, settings, num_classes)
    if len(train_y) == 0 or len(test_y) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if settings.standardise:
        x, xt = standardise(train_x, test_x)
    else:
        x, xt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (train_x, test_x))
    y, yt = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(test_y.astype(np.int64))
    clf = LinearClassifier(x.shape[1], num_classes, settings)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y), generator=clf.generator)
        for start in range(0, len(y), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            clf.step(x[batch], y[batch], epoch)
        clf.end_epoch(len(y))
    with torch.no_grad():
        train_logits, test_logits = clf.linear(x), clf.linear(xt)
        train_loss = float(F.cross_entropy(train_logits, y))
    return {
        "top1": topk_accuracy(test_logits, yt, 1),
        "top5": topk_accuracy(test_logits, yt, 5),
        "train_top1": topk_accuracy(train_logits, y, 1),
        "dim": int(x.shape[1]),
        "train_n": int(len(y)),
        "test_n": int(len(yt)),
        "num_classes": int(num_classes),
        **settle_numbers(clf.epoch_losses, train_loss),
    }


def standardise_ranks(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`standardise` with the statistics of every rank's train rows: the mean, then the unbiased
    variance about it, each from one all-reduce of float64 sums (D values)."""
    from dcscale import dist

    n = dist.all_reduce_sum([len(train)])[0]
    mean = dist.all_reduce_array_(train.double().sum(0).numpy()) / n
    squares = dist.all_reduce_array_(((train.double() - torch.from_numpy(mean)) ** 2).sum(0).numpy())
    mean = torch.from_numpy(mean).float()[None]
    std = torch.from_numpy(np.sqrt(squares / max(n - 1, 1))).float().clamp_min(1e-6)[None]
    return (train - mean) / std, (test - mean) / std


def _rows_of_width(a: np.ndarray, width: int) -> torch.Tensor:
    """float32 rows; a rank with none (nothing decodable) gets a [0, width] array."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return torch.from_numpy(a if len(a) else np.zeros((0, width), np.float32))


def train_linear_probe_ranks(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                             settings: ProbeSettings, num_classes: int | None = None) -> dict:
    """`train_linear_probe` over every rank's own rows (collective): no rank holds more than its rows.

    The rows of all ranks, in rank order, form the single process's train set, and every rank draws
    the same order of it from the seed: batch b is the same rows as in one process, each rank computes
    the gradient of those it holds, and `step_shared` sums them. So the classifier takes the single
    process's steps up to float rounding (the order of sums); the accuracies count over every rank.
    The returned dict (on every rank) adds `feature_rows_by_rank`: each rank's train and test rows."""
    from dcscale import dist

    train_counts, test_counts = dist.row_counts(len(train_y)), dist.row_counts(len(test_y))
    n, offset = sum(train_counts), sum(train_counts[:dist.get_env().rank])
    if n == 0 or sum(test_counts) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    width = int(max(dist.all_gather_rows(np.array([a.shape[1] if a.ndim == 2 and len(a) else 0
                                                   for a in (train_x, test_x)], np.int64))))
    if num_classes is None:
        local_max = max([int(a.max()) for a in (train_y, test_y) if len(a)], default=0)
        num_classes = int(max(dist.all_gather_rows(np.array([local_max], np.int64)))) + 1
    x, xt = _rows_of_width(train_x, width), _rows_of_width(test_x, width)
    if settings.standardise:
        x, xt = standardise_ranks(x, xt)
    y, yt = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(test_y.astype(np.int64))
    clf = LinearClassifier(width, num_classes, settings)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=clf.generator)
        for start in range(0, n, settings.batch_size):
            batch = order[start:start + settings.batch_size]
            mine = batch[(batch >= offset) & (batch < offset + len(y))] - offset
            clf.step_shared(x[mine], y[mine], epoch)
        clf.end_epoch(n)
    with torch.no_grad():
        train_logits, test_logits = clf.linear(x), clf.linear(xt)
        loss_here = float(F.cross_entropy(train_logits, y, reduction="sum")) if len(y) else 0.0
    hits = dist.all_reduce_sum([_hits(test_logits, yt, 1), _hits(test_logits, yt, 5), _hits(train_logits, y, 1),
                                loss_here])
    return {
        "top1": hits[0] / sum(test_counts),
        "top5": hits[1] / sum(test_counts),
        "train_top1": hits[2] / n,
        "dim": width,
        "train_n": n,
        "test_n": sum(test_counts),
        "num_classes": int(num_classes),
        "feature_rows_by_rank": {"train": train_counts, "test": test_counts},
        **settle_numbers(clf.epoch_losses, hits[3] / n),
    }


def _hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows whose label is among their k highest logits."""
    if len(labels) == 0:
        return 0
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def train_probe_online(features_fn, dims: dict[str, int], train_ss, test_ss, train_tf, test_tf,
                       settings: ProbeSettings, num_classes: int, env, batch_size: int, workers: int,
                       crops: int = 1) -> dict[str, dict]:
    """The references' loop: every epoch, every batch of the train set is transformed afresh, run
    through the frozen network (eval mode, no gradients) and the classifiers take one step on it; one
    classifier per layer, all fed by the same forward pass. Then the test set, averaging the softmax
    over `crops` crops per image (ten-crop) as eval_linear.py does (l.290-293).

    `train_top1` is the accuracy on the last epoch's augmented batches, as the references' meters.

    Under several ranks, each batch is the single process's (the same order from the seed, the same
    augmentation: it is drawn from the image's position in the epoch), rank r taking its positions
    r, r + W, ...; the classifiers step on the sum of the ranks' gradients (`step_shared`), and every
    rank tests on its slice of the test set, the hits summed over ranks."""
    from torch.utils.data import DataLoader

    from dcscale import dist
    from dcscale.data.loaders import SeededDraws, extraction_loader

    world, rank = env.world_size, env.rank

    gt = train_ss.labels()
    labelled = np.flatnonzero(gt >= 0)
    if len(labelled) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    draws = SeededDraws(train_ss, gt, train_tf, settings.seed, cycle=0)
    classifiers = {layer: LinearClassifier(dim, num_classes, settings, env.device) for layer, dim in dims.items()}
    order_gen = torch.Generator().manual_seed(settings.seed)
    train_correct, train_seen = dict.fromkeys(dims, 0), 0
    for epoch in range(settings.epochs):
        draws.epoch = epoch
        order = labelled[torch.randperm(len(labelled), generator=order_gen).numpy()]
        if world == 1:
            loader = DataLoader(draws, batch_size=settings.batch_size, sampler=list(enumerate(order.tolist())),
                                num_workers=workers, collate_fn=draws.collate)
        else:
            shares = [[(p, int(order[p])) for p in range(start, min(start + settings.batch_size, len(order)))
                       if p % world == rank] for start in range(0, len(order), settings.batch_size)]
            loader = DataLoader(draws, batch_sampler=shares, num_workers=workers, collate_fn=draws.collate)
        for batch in loader:
            if len(batch.labels) == 0 and world == 1:
                continue
            y = batch.labels.to(env.device)
            with torch.no_grad():
                feats = (features_fn(batch.images.to(env.device)) if len(y) else
                         {layer: torch.zeros(0, dim, device=env.device) for layer, dim in dims.items()})
            for layer, clf in classifiers.items():
                logits = clf.step(feats[layer], y, epoch) if world == 1 else clf.step_shared(feats[layer], y, epoch)
                if epoch == settings.epochs - 1 and logits is not None:
                    train_correct[layer] += int((logits.argmax(1) == y).sum())
            if epoch == settings.epochs - 1:
                train_seen += len(y)
    test_gt = test_ss.labels()
    outputs: dict[str, list] = {layer: [] for layer in dims}
    labels = []
    loader = extraction_loader(test_ss, test_tf, rank=rank, world_size=world, batch_size=batch_size,
                               num_workers=workers, device=env.device)
    with torch.no_grad():
        for indices, images in loader:
            y = torch.from_numpy(test_gt[indices.numpy()].astype(np.int64))
            feats = features_fn(images.to(env.device))
            for layer, clf in classifiers.items():
                logits = clf.linear(feats[layer])
                if crops > 1:
                    logits = logits.view(len(y), crops, -1).softmax(-1).mean(1)
                outputs[layer].append(logits[(y >= 0).to(logits.device)].cpu())
            labels.append(y[y >= 0])
    yt = torch.cat(labels)
    if world > 1:  # every rank's hits and counts, summed
        test_n = int(dist.all_reduce_sum([len(yt)])[0])
        if test_n == 0:
            raise DcscaleError("the probe needs labelled train and test samples")
        results = {}
        for layer in dims:
            logits = torch.cat(outputs[layer])
            hits = dist.all_reduce_sum([_hits(logits, yt, 1), _hits(logits, yt, 5), train_correct[layer],
                                        train_seen])
            results[layer] = {"top1": hits[0] / test_n, "top5": hits[1] / test_n,
                              "train_top1": hits[2] / max(hits[3], 1),
                              "dim": dims[layer], "train_n": int(len(labelled)), "test_n": test_n,
                              "num_classes": int(num_classes)}
        return results
    if len(yt) == 0:
        raise DcscaleError("the probe needs labelled train and test samples")
    results = {}
    for layer in dims:
        logits = torch.cat(outputs[layer])
        results[layer] = {"top1": topk_accuracy(logits, yt, 1), "top5": topk_accuracy(logits, yt, 5),
                          "train_top1": train_correct[layer] / max(train_seen, 1), "dim": dims[layer],
                          "train_n": int(len(labelled)), "test_n": int(len(yt)), "num_classes": int(num_classes)}
    return results
