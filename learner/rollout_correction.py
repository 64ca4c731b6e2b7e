"""Rollout correction: the gap between the policy that sampled a token and pi_old.

vLLM's log-probs are those of the *behaviour* policy: another kernel, another precision
and, with asynchronous training, possibly older weights than pi_old. Per token,

    ratio_t = exp(old_log_prob_t - rollout_log_prob_t) = pi_old / pi_behaviour.

- ``tis`` (token-level truncated importance sampling; Yao et al., 2025, "Your efficient RL
  framework secretly brings you off-policy RL training"; verl's ``rollout_is`` in
  ``truncate`` mode): each token's policy-loss term is multiplied by the detached weight
  ``min(ratio_t, C)``.
- ``mis`` (sequence-level masked importance sampling, verl's geometric ``mask`` mode): a
  sequence whose geometric-mean ratio ``exp(mean_t log ratio_t)`` lies outside ``[1/C, C]``
  leaves the loss. Its tokens' loss mask becomes 0, but the token-mean denominator stays
  the count of all tokens (see ``policy_loss``): a dropped sequence adds zero, and the
  others keep their weight. verl instead drops the masked tokens from the denominator too;
  here the mask is known only micro-batch by micro-batch (on the on-policy fast path pi_old
  comes from the training pass itself), after the global denominator is fixed.

Both are pure functions of ``(B, L)`` tensors; ``policy_loss`` applies them to any loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ROLLOUT_CORRECTIONS", "Correction", "mis_keep", "rollout_correction", "tis_weights",
           "token_ratio"]

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")

# exp(20) ~ 5e8: far above any cap, and finite in every float type we train in.
_MAX_LOG_RATIO = 20.0


@dataclass
class Correction:
    """What a correction does to the per-token policy loss of one micro-batch."""

    weights: Tensor | None = None  # (B, L) detached multiplier; None: 1
    keep: Tensor | None = None  # (B, L) bool, tokens left in the loss; None: all
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_ratio(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor) -> Tensor:
    """pi_old / pi_behaviour per token, detached; 1 outside ``mask``; log-ratio capped at +-20."""
    valid = mask.bool()
    log_ratio = (old_log_prob.detach() - rollout_log_prob.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.where(valid, log_ratio, torch.zeros_like(log_ratio)).exp()


def tis_weights(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor,
                cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level truncated importance weights ``min(ratio, cap)`` (1 outside ``mask``)."""
    valid = mask.bool()
    ratio = token_ratio(old_log_prob, rollout_log_prob, mask)
    return ratio.clamp(max=cap), {
        "rollout_correction/mean_ratio": _masked_mean(ratio, valid),
        "rollout_correction/truncated_frac": _masked_mean((ratio > cap).to(ratio.dtype), valid),
    }


def mis_keep(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor,
             cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Tokens of the sequences whose geometric-mean ratio lies in ``[1/cap, cap]``.

    A row without valid tokens is kept (it has nothing to drop) and not counted.
    """
    valid = mask.bool()
    ratio = token_ratio(old_log_prob, rollout_log_prob, mask)
    counts = valid.sum(-1)
    # log ratio is 0 outside the mask, so the row sum is the sum over valid tokens.
    mean_log_ratio = ratio.log().sum(-1) / counts.clamp(min=1)
    bound = math.log(cap)
    seq_kept = (mean_log_ratio >= -bound) & (mean_log_ratio <= bound)
    has_tokens = counts > 0
    dropped = (~seq_kept & has_tokens).sum()
    return valid & seq_kept[:, None], {
        "rollout_correction/mean_ratio": _masked_mean(ratio, valid),
        "rollout_correction/masked_frac": dropped.to(ratio.dtype) / has_tokens.sum().clamp(min=1),
    }


def rollout_correction(mode: str, old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor,
                       cap: float) -> Correction:
    """The correction ``mode`` (one of ``ROLLOUT_CORRECTIONS``) for one micro-batch."""
    if mode == "none":
        return Correction()
    if cap <= 1.0:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    if mode == "tis":
        weights, metrics = tis_weights(old_log_prob, rollout_log_prob, mask, cap)
        return Correction(weights=weights, metrics=metrics)
    if mode == "mis":
        keep, metrics = mis_keep(old_log_prob, rollout_log_prob, mask, cap)
        return Correction(keep=keep, metrics=metrics)
    raise ValueError(f"unknown rollout correction {mode!r}; choose from {ROLLOUT_CORRECTIONS}")
