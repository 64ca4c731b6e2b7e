"""Reward shaping applied after scoring: rules about how a response ended, not what it says."""

from __future__ import annotations


def apply_truncated_reward(scores: list[float], finish_reasons: list[str],
                           truncated_reward: float | None) -> list[float]:
    """Give responses that hit the length cap ``truncated_reward`` instead of their score."""
    if truncated_reward is None:
        return list(scores)
    return [truncated_reward if reason == "length" else score
            for score, reason in zip(scores, finish_reasons, strict=True)]
