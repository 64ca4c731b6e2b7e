"""Metrics of one training step, computed from its samples, rewards and learner results."""

from __future__ import annotations

import hashlib
import statistics

import torch

from launch.data.prompts import PromptRecord
from learner.losses import is_count_metric, lp_reg_ratio_metrics

# Edges of the sampled-token probability buckets. The lowest buckets are the tail where
# Lp-Reg's "reasoning sparks" live, and where plain policy gradient on negative answers
# pushes hardest; watching their share over training shows whether the tail survives.
PROB_BUCKET_EDGES = (0.01, 0.1, 0.5, 0.9)
PROB_BUCKET_KEYS = ("sampled_prob/below_0.01", "sampled_prob/0.01_to_0.1", "sampled_prob/0.1_to_0.5",
                    "sampled_prob/0.5_to_0.9", "sampled_prob/above_0.9")
# The low-probability-token mass: the share of sampled tokens below 0.1, the two lowest buckets.
LOW_PROB_MASS_KEY = "sampled_prob/below_0.1"


def probability_buckets(logprobs: torch.Tensor, policy_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Share of sampled tokens in each probability bucket, as the generating policy saw them.

    ``logprobs``: the step's sampled-token log-probs, flat (``RaggedBatch.rollout_log_probs``);
    one vectorised pass, since a long-response step holds millions of tokens. ``policy_mask``
    (``RaggedBatch.policy_mask``) leaves out tool observations, which nothing sampled."""
    if policy_mask is not None:
        logprobs = logprobs[policy_mask]
    probs = logprobs.detach().to(torch.float64).exp()
    edges = torch.tensor(PROB_BUCKET_EDGES, dtype=torch.float64)
    # right=True: a probability equal to an edge goes to the bucket above, as "0.1_to_0.5" says.
    index = torch.bucketize(probs, edges, right=True)
    counts = torch.bincount(index, minlength=len(PROB_BUCKET_KEYS)).tolist()
    total = max(1, probs.numel())
    shares = {key: count / total for key, count in zip(PROB_BUCKET_KEYS, counts, strict=True)}
    shares[LOW_PROB_MASS_KEY] = (counts[0] + counts[1]) / total
    return shares


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
    } | tool_metrics(samples)


def tool_metrics(samples) -> dict[str, float]:
    """Tool calls of multi-turn responses (rollout.max_turns > 0); none when they are off."""
    if all(s.tool_calls is None for s in samples):
        return {}
    calls = [c for s in samples for c in s.tool_calls or []]
    tokens = sum(len(s.response_token_ids) for s in samples)
    observed = sum(c.observation_tokens for c in calls)
    return {
        "tool/calls_per_sample": len(calls) / len(samples),
        "tool/error_frac": sum(c.status in ("error", "killed", "failed") for c in calls) / max(1, len(calls)),
        "tool/timeout_frac": sum(c.status == "timeout" for c in calls) / max(1, len(calls)),
        "tool/exec_s": statistics.fmean(c.exec_s for c in calls) if calls else 0.0,
        # A turn is a stretch of the policy's tokens: one more than the calls.
        "rollout/turns_mean": 1 + len(calls) / len(samples),
        "rollout/observation_token_frac": observed / tokens if tokens else 0.0,
    }


def tool_wait_metrics(before: list[tuple[float, float]],
                      after: list[tuple[float, float]]) -> dict[str, float]:
    """How the rollout engines spent the step's tool time, from each worker's running totals
    (``RolloutPool.tool_wait_seconds``: seconds with a sample waiting on its tool, and the
    part of them with its engine idle) at the step's start and end. The idle share is tool
    time that no other sample's generation covered."""
    wait = idle = 0.0
    for (wait_before, idle_before), (wait_after, idle_after) in zip(before, after, strict=True):
        if wait_after < wait_before:  # a replacement's totals start again from zero
            wait_before = idle_before = 0.0
        wait += wait_after - wait_before
        idle += idle_after - idle_before
    return {"tool/wait_s": wait / max(1, len(after)),
            "tool/engine_idle_frac": idle / wait if wait > 0 else 0.0}


def prompt_ids_hash(records: list[PromptRecord]) -> str:
    """A short fingerprint of a step's prompts, in order, to compare runs and resumes."""
    return hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest()[:16]


def average_learner_metrics(results) -> dict[str, float]:
    """The ranks' metrics: means averaged, token counts added up, and Lp-Reg's token means
    (``lp_reg_ratio_metrics``) from the sums over every rank."""
    keys = sorted({k for r in results for k in r.metrics})
    combine = {k: sum if is_count_metric(k) else statistics.fmean for k in keys}
    metrics = {k: combine[k]([r.metrics[k] for r in results if k in r.metrics]) for k in keys}
    return metrics | lp_reg_ratio_metrics(metrics)
