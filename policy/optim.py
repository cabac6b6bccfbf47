"""The optimizer and the learning-rate schedule of the policy, from `[train]`.

    optimizer = build_optimizer(model.parameters(), config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps)

The schedule is linear warm-up from 0 to `optm_lr` over `optm_warmup_steps` (a count, or a
fraction of the run), then `optm_decay_type` ('linear', 'cosine', or none) down to
`optm_lr x optm_min_lr_factor` at the last step. It is a LambdaLR, so its state is saved and
restored with the checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from gantry.config.schema import TrainConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], train: TrainConfig
) -> torch.optim.Optimizer:
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    cls = torch.optim.AdamW if train.optm_name == "AdamW" else torch.optim.Adam
    return cls(
        params,
        lr=train.optm_lr,
        betas=tuple(train.optm_betas),
        eps=train.epsilon,
        weight_decay=train.optm_weight_decay,
        **impl[train.optm_impl],
    )


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    value = train.optm_warmup_steps
    return math.ceil(value * total_steps) if isinstance(value, float) else value


def lr_factor(step: int, *, warmup: int, total: int, decay: str | None, min_factor: float) -> float:
    """The learning rate of optimizer step `step` (0-based), as a fraction of the peak."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already learns, at 1/warmup of the peak
    if decay in (None, "constant") or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    shape = 1.0 - progress if decay == "linear" else cosine
    return min_factor + (1.0 - min_factor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`total_steps` counts optimizer steps (policy steps x mu_iterations)."""
    factor = functools.partial(
        lr_factor,
        warmup=warmup_steps(train, total_steps),
        total=total_steps,
        decay=train.optm_decay_type,
        min_factor=train.optm_min_lr_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
