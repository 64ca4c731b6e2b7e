import math

import pytest

from launch.data.prompts import PromptRecord
from launch.training.evaluation import pass_at_k, summarize


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
