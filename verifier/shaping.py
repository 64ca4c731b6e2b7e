"""Reward shaping applied after scoring: rules about how a response ended, not what it says.

Two rules, both off the verifier's score and both about length:

- ``truncated_reward`` replaces the score of a response cut off at the length cap (its
  finish reason is "length"), whatever it contains;
- DAPO's soft overlong punishment (Yu et al., 2025, eq. 13; verl's DAPO reward manager)
  adds a penalty that grows linearly over the last ``overlong_buffer_len`` tokens
  before the cap, whatever the response contains or how it ended.

When both are on, the penalty is added to the replaced score: a cut-off response (L =
L_max) gets ``truncated_reward - overlong_penalty_factor``. Longer is then never better:
a response that stops at the cap and one cut off there pay the same penalty, and with
the default ``truncated_reward=0`` a wrong answer gains nothing by running out of room.
``truncated_reward=None`` with the penalty on is verl's DAPO reward exactly: the score
of the response as it is, plus the penalty.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conf.schema import VerifierConfig


def apply_truncated_reward(scores: list[float], finish_reasons: list[str],
                           truncated_reward: float | None) -> list[float]:
    """Give responses that hit the length cap ``truncated_reward`` instead of their score."""
    if truncated_reward is None:
        return list(scores)
    return [truncated_reward if reason == "length" else score
            for score, reason in zip(scores, finish_reasons, strict=True)]


def overlong_penalty(length: int, max_response_tokens: int, buffer_len: int,
                     penalty_factor: float) -> float:
    """DAPO's soft overlong punishment of a ``length``-token response; 0 or negative.

    With ``L_max = max_response_tokens`` and ``B = buffer_len``: 0 up to ``L_max - B``
    tokens, then ``-(length - (L_max - B)) / B * penalty_factor``, reaching
    ``-penalty_factor`` at ``L_max``. As in verl, ``length`` counts every response token
    the engine returned, the end-of-sequence token included, and nothing bounds the
    value below (no response is longer than the cap). ``buffer_len=0`` is off.
    """
    if buffer_len <= 0:
        return 0.0
    exceed = length - (max_response_tokens - buffer_len)
    return min(-exceed / buffer_len * penalty_factor, 0.0) if exceed > 0 else 0.0


def shape_rewards(scores: list[float], response_lengths: list[int], finish_reasons: list[str],
                  cfg: VerifierConfig, max_response_tokens: int) -> tuple[list[float], dict[str, float]]:
    """The rewards the advantages are computed from, and what to log about the shaping.

    ``truncated_reward`` first, then the overlong penalty added on top (see the module
    docstring for why in that order). The metrics (``reward/overlong_penalty_mean``, and
    ``reward/overlong_frac``, the fraction of responses penalised) are there only when
    the penalty is on.
    """
    rewards = apply_truncated_reward(scores, finish_reasons, cfg.truncated_reward)
    if cfg.overlong_buffer_len <= 0:
        return rewards, {}
    penalties = [overlong_penalty(length, max_response_tokens, cfg.overlong_buffer_len,
                                  cfg.overlong_penalty_factor)
                 for length in response_lengths]
    rewards = [reward + penalty for reward, penalty in zip(rewards, penalties, strict=True)]
    metrics = {
        "reward/overlong_penalty_mean": statistics.fmean(penalties) if penalties else 0.0,
        "reward/overlong_frac": (sum(p < 0 for p in penalties) / len(penalties)
                                 if penalties else 0.0),
    }
    return rewards, metrics
