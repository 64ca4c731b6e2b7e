"""Metrics of one training step, computed from its samples, rewards and learner results."""

from __future__ import annotations

import hashlib
import statistics

from launch.data.prompts import PromptRecord


def summarize_rollout(samples, rewards: list[float], max_tokens: int) -> dict[str, float]:
    lengths = [len(s.response_token_ids) for s in samples]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "reward/max": max(rewards),
        "reward/min": min(rewards),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": max(lengths),
        "response_length/clip_ratio": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
        "rollout/num_samples": len(samples),
    }


def prompt_ids_hash(records: list[PromptRecord]) -> str:
    """A short fingerprint of a step's prompts, in order, to compare runs and resumes."""
    return hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest()[:16]


def average_learner_metrics(results) -> dict[str, float]:
    keys = sorted({k for r in results for k in r.metrics})
    return {k: statistics.fmean(r.metrics[k] for r in results if k in r.metrics) for k in keys}
