"""Outcome-reward advantage estimators: one scalar reward in, one advantage per response out.

Responses that answer the same prompt form a group (``group_index`` holds the prompt id of
each response). Every estimator here uses the group to build a baseline:

- ``grpo``:         (r - mean_g) / (std_g + eps), std unbiased (Shao et al., 2024).
- ``drgrpo``:       r - mean_g, no std normalisation (Liu et al., 2025, "Dr. GRPO").
- ``rloo``:         r - mean of the *other* responses of the group (Ahmadian et al., 2024).
- ``reinforce_pp``: r - mean_g, then whitened over the whole batch (REINFORCE++ baseline,
                    Hu, 2025). Pass ``response_lengths`` to whiten over tokens, as the token-level
                    reference implementation does.

A group of size 1 carries no baseline information, so it gets advantage 0 (``reinforce_pp``
keeps it at 0 before whitening). The caller broadcasts the result over the response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "compute_advantages",
    "drgrpo_advantages",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
]


def _group_ids(group_index: Tensor | np.ndarray | Sequence[Any], n: int, device: torch.device) -> Tensor:
    """Map arbitrary group labels (ints, strings, uuids) to contiguous int64 ids."""
    if isinstance(group_index, Tensor):
        ids = torch.unique(group_index.reshape(-1), return_inverse=True)[1]
    else:
        labels = list(np.asarray(group_index, dtype=object).reshape(-1))
        lookup: dict[Any, int] = {}
        ids = torch.tensor([lookup.setdefault(label, len(lookup)) for label in labels], dtype=torch.long)
    if ids.numel() != n:
        raise ValueError(f"group_index has {ids.numel()} entries, scores has {n}")
    return ids.to(device)


def _group_stats(scores: Tensor, group_index: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response group size, group mean and unbiased group std, in float64."""
    x = scores.detach().reshape(-1).to(torch.float64)
    ids = _group_ids(group_index, x.numel(), x.device)
    num_groups = int(ids.max().item()) + 1 if ids.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64, device=x.device)
    count.index_add_(0, ids, torch.ones_like(x))
    total = torch.zeros_like(count).index_add_(0, ids, x)
    mean = (total / count)[ids]
    sq_dev = torch.zeros_like(count).index_add_(0, ids, (x - mean) ** 2)
    # Bessel-corrected; a group of one has no spread (its advantage is forced to 0 anyway).
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()[ids]
    return count[ids], mean, std


def _like_scores(adv: Tensor, scores: Tensor) -> Tensor:
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    return adv.to(dtype).reshape(scores.shape)


def grpo_advantages(
    scores: Tensor,
    group_index: Tensor | np.ndarray | Sequence[Any],
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> Tensor:
    """GRPO: (r - mean_g) / (std_g + epsilon) with the unbiased group std; Dr.GRPO without it."""
    count, mean, std = _group_stats(scores, group_index)
    x = scores.detach().reshape(-1).to(torch.float64)
    adv = x - mean
    if norm_by_std:
        adv = adv / (std + epsilon)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return _like_scores(adv, scores)


def drgrpo_advantages(scores: Tensor, group_index: Tensor | np.ndarray | Sequence[Any]) -> Tensor:
    """Dr.GRPO: r - mean_g. Dropping the std avoids up-weighting near-uniform groups."""
    return grpo_advantages(scores, group_index, norm_by_std=False)


def rloo_advantages(scores: Tensor, group_index: Tensor | np.ndarray | Sequence[Any]) -> Tensor:
    """RLOO: r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_g)."""
    count, mean, _ = _group_stats(scores, group_index)
    x = scores.detach().reshape(-1).to(torch.float64)
    adv = (x - mean) * count / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return _like_scores(adv, scores)


def reinforce_pp_advantages(
    scores: Tensor,
    group_index: Tensor | np.ndarray | Sequence[Any],
    response_lengths: Tensor | None = None,
    epsilon: float = 1e-8,
) -> Tensor:
    """REINFORCE++ baseline: subtract the group mean, then whiten over the batch.

    The reference whitens the token-level tensor, so every response is weighted by its
    length; ``response_lengths`` (valid tokens per response) reproduces that. Without it,
    each response counts once. Variance is Bessel-corrected; whitening uses
    ``(x - mean) / sqrt(var + epsilon)``.
    """
    centred = drgrpo_advantages(scores, group_index).reshape(-1).to(torch.float64)
    if response_lengths is None:
        weight = torch.ones_like(centred)
    else:
        weight = response_lengths.detach().reshape(-1).to(device=centred.device, dtype=torch.float64)
    total = weight.sum()
    mean = (weight * centred).sum() / total
    var = (weight * (centred - mean) ** 2).sum() / total
    var = var * total / (total - 1).clamp(min=1)
    adv = (centred - mean) * torch.rsqrt(var + epsilon)
    return _like_scores(adv, scores)


ADVANTAGE_ESTIMATORS = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def compute_advantages(
    name: str,
    scores: Tensor,
    group_index: Tensor | np.ndarray | Sequence[Any],
    **kwargs: Any,
) -> Tensor:
    """Dispatch by ``algorithm.advantage``: "grpo", "drgrpo", "rloo" or "reinforce_pp".

    Keyword arguments go to the estimator: ``epsilon`` and ``norm_by_std`` for grpo,
    ``response_lengths`` and ``epsilon`` for reinforce_pp; drgrpo and rloo take none.
    """
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        choices = sorted(ADVANTAGE_ESTIMATORS)
        raise ValueError(f"unknown advantage estimator {name!r}; choose from {choices}") from None
    return fn(scores, group_index, **kwargs)
