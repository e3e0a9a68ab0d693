"""The run's two optimizers: the body's, kept for the whole run, and the head's, new every cycle."""

from __future__ import annotations

import torch

from dcscale.config import Config


def body_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.body_parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


def new_head_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    # As in the original, the head gets a fresh optimizer every cycle; the body's momentum persists.
    return torch.optim.SGD(model.head_parameters(), lr=cfg.train.lr, momentum=cfg.train.head_momentum,
                           weight_decay=cfg.train.weight_decay)
