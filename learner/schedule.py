"""Learning-rate schedule over optimizer steps, as a multiplier of ``learner.lr``.

Warm-up as in nanoGPT: step n < W uses ``(n + 1) / (W + 1)``, so it climbs from near 0
without spending an optimizer step (a whole rollout batch, in RL) at a rate of exactly 0.
Then ``constant`` stays at 1; ``linear`` and ``cosine`` decay from 1 to ``min_lr_ratio`` over
the remaining ``total_steps - W`` steps and stay there. ``total_steps == 0`` means the length
of the run is unknown: every schedule is then constant after the warm-up.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LR_SCHEDULERS", "lambda_lr", "lr_multiplier"]

LR_SCHEDULERS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, *, scheduler: str, warmup_steps: int = 0, total_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {scheduler!r}; choose from {LR_SCHEDULERS}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant" or total_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def lambda_lr(optimizer: torch.optim.Optimizer, *, scheduler: str, warmup_steps: int,
              total_steps: int, min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that follows ``lr_multiplier``; stepped once per optimizer step.

    The multiplier is a closure, not a callable object, so a checkpoint restores only the
    step count: the schedule itself always comes from the current config.
    """
    def multiplier(step: int) -> float:
        return lr_multiplier(step, scheduler=scheduler, warmup_steps=warmup_steps,
                             total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
