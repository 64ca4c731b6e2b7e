import math

import pytest

from launch.data.prompts import PromptRecord
from launch.training.evaluation import evaluate, pass_at_k, summarize
from rollout.types import GroupResult, Sample, ToolCall
from verifier.math_verifier import ScoreReport


def test_pass_at_k_matches_the_combinatorial_definition():
    # 5 samples, 2 correct: P(at least one correct among 2 drawn) = 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong answers: always passes
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_greedy_summary_is_accuracy_overall_and_per_source():
    records = [PromptRecord("a", "1", "x"), PromptRecord("b", "2", "x"), PromptRecord("c", "3", "y")]
    metrics = summarize(records, [[1.0], [0.0], [1.0]], k=1)
    assert metrics["eval/accuracy"] == pytest.approx(2 / 3)
    assert metrics["eval/accuracy/x"] == 0.5
    assert metrics["eval/accuracy/y"] == 1.0
    assert metrics["eval/num_problems"] == 3


def test_sampled_summary_reports_mean_and_pass_at_k():
    records = [PromptRecord("a", "1", "x"), PromptRecord("b", "2", "x")]
    metrics = summarize(records, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], k=4)
    assert metrics["eval/mean@4"] == pytest.approx(0.125)
    assert metrics["eval/pass@4"] == pytest.approx(0.5)


# evaluate() with a stand-in pool: its own logic only (what it asks the workers for, what it reports).
class RecordingPool:
    """Answers every group with fixed responses; ``calls`` tool calls per sample, or None
    for a single-turn run."""

    def __init__(self, calls: list[int] | None):
        self.calls = calls
        self.requests = []

    def group_id(self, name: str) -> str:
        return name

    def generate(self, groups):
        self.requests += groups
        results = []
        for i, group in enumerate(groups):
            samples = [Sample(prompt_index=i, prompt_token_ids=list(group.prompt_token_ids),
                              response_token_ids=[1], response_logprobs=[-1.0], finish_reason="stop",
                              weight_version=0, worker_index=0, response_text=f"\\boxed{{{i}}}",
                              tool_calls=None if self.calls is None else
                              [ToolCall("ok", 0.1, 3)] * self.calls[i])
                       for _ in range(group.sampling.samples_per_prompt)]
            results.append(GroupResult(group.group_id, samples, worker_index=0, generate_s=0.0))
        return results


class ExactVerifier:
    def score_batch_detailed(self, responses, answers) -> ScoreReport:
        pairs = zip(responses, answers, strict=True)
        return ScoreReport(scores=[float(r == f"\\boxed{{{a}}}") for r, a in pairs])


RECORDS = [PromptRecord(prompt=f"{i}=", answer=str(i if i < 3 else -1), data_source="t", id=str(i))
           for i in range(4)]


def _evaluate(pool, samples=1):
    return evaluate(pool, ExactVerifier(), RECORDS, [[i] for i in range(4)], step=7, temperature=0.6,
                    samples=samples, seed=1, max_response_tokens=8).metrics


def test_multi_turn_evaluation_reports_the_tool_call_rate():
    metrics = _evaluate(RecordingPool(calls=[0, 1, 2, 1]))
    assert metrics["eval/accuracy"] == 0.75
    assert metrics["eval/tool_calls_per_sample"] == 1.0
    assert "eval/tool_calls_per_sample" not in _evaluate(RecordingPool(calls=None))


def test_each_evaluation_group_samples_with_its_own_seed():
    pool = RecordingPool(calls=None)
    _evaluate(pool, samples=4)
    seeds = [g.sampling.seed + j for g in pool.requests for j in range(4)]
    assert len(set(seeds)) == len(seeds) == 16
