"""Held-out evaluation through the rollout workers: greedy accuracy, mean@k and pass@k."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from launch.data.prompts import PromptRecord


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def as_record(self) -> dict:
        return {"step": self.step, **self.metrics}


def summarize(records: list[PromptRecord], scores_per_prompt: list[list[float]], k: int,
              prefix: str = "eval") -> dict[str, float]:
    """Accuracy metrics overall and per ``data_source``.

    With one sample per prompt the mean is the (greedy) accuracy; with several,
    ``mean@k`` averages them and ``pass@k`` is the unbiased estimate.
    """
    by_source: dict[str, list[list[float]]] = defaultdict(list)
    for record, scores in zip(records, scores_per_prompt, strict=True):
        by_source[record.data_source].append(scores)
    metrics: dict[str, float] = {}
    groups = {"": [s for scores in by_source.values() for s in scores], **{
        f"/{source}": scores for source, scores in by_source.items()}}
    for suffix, groups_scores in groups.items():
        correct = [[score >= 1.0 for score in scores] for scores in groups_scores]
        if k == 1:
            metrics[f"{prefix}/accuracy{suffix}"] = statistics.fmean(c[0] for c in correct)
        else:
            metrics[f"{prefix}/mean@{k}{suffix}"] = statistics.fmean(
                sum(c) / len(c) for c in correct)
            metrics[f"{prefix}/pass@{k}{suffix}"] = statistics.fmean(
                pass_at_k(len(c), sum(c), k) for c in correct)
        metrics[f"{prefix}/num_problems{suffix}"] = float(len(groups_scores))
    return metrics


def evaluate(pool, verifier, records: list[PromptRecord], prompt_ids: list[list[int]],
             *, step: int, temperature: float, samples: int, seed: int,
             max_response_tokens: int, top_p: float = 1.0) -> EvalResult:
    """Generate on the rollout workers with the weights they hold now, and score."""
    from launch.training.pipeline import group_seed
    from rollout.types import GroupRequest, SamplingSettings

    def sampling(index: int) -> SamplingSettings:
        return SamplingSettings(samples_per_prompt=samples, temperature=temperature, top_p=top_p,
                                max_response_tokens=max_response_tokens,
                                seed=group_seed(seed, "eval", step, index))

    groups = pool.generate([GroupRequest(pool.group_id(f"eval{step}-{i}"), ids, sampling(i))
                            for i, ids in enumerate(prompt_ids)])
    responses = [s.response_text for g in groups for s in g.samples]
    answers = [r.answer for r, g in zip(records, groups, strict=True) for _ in g.samples]
    report = verifier.score_batch_detailed(responses, answers)
    per_prompt, start = [], 0
    for group in groups:
        per_prompt.append(report.scores[start:start + len(group.samples)])
        start += len(group.samples)
    metrics = summarize(records, per_prompt, k=samples)
    metrics["eval/temperature"] = temperature
    samples_out = [s for g in groups for s in g.samples]
    if any(s.tool_calls is not None for s in samples_out):  # a multi-turn run
        metrics["eval/tool_calls_per_sample"] = statistics.fmean(
            len(s.tool_calls or []) for s in samples_out)
    return EvalResult(step=step, metrics=metrics)


def load_eval_results(path, up_to_step: int | None = None) -> list[EvalResult]:
    """The training-time evaluations recorded in an ``eval.jsonl``, oldest first.

    Records written by ``lpreg eval`` (they carry a ``source``) are not part of a run's
    curve and are left out; so are steps after ``up_to_step``.
    """
    from launch.reporting.metrics import read_jsonl

    results = []
    for record in read_jsonl(path):
        step = record.pop("step", None)
        if "source" in record or not isinstance(step, int):
            continue
        if up_to_step is None or step <= up_to_step:
            results.append(EvalResult(step=step, metrics=record))
    return results
