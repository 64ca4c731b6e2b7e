"""Advantage estimators against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from learner import (
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

# Group "a": 1, 0, 1, 1 (mean 0.75, unbiased std 0.5); group "b": 0, 0; group "c": a single 5.
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 1.0, 0.0], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 1, 0, 2, 0, 1])


def test_grpo_unbiased_std_and_singleton_group():
    adv = grpo_advantages(SCORES, GROUPS)
    eps = 1e-6
    hi, lo = 0.25 / (0.5 + eps), -0.75 / (0.5 + eps)
    expected = [hi, lo, 0.0, hi, 0.0, hi, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_grpo_epsilon_and_dtype():
    adv = grpo_advantages(SCORES.float(), GROUPS, epsilon=0.5)
    assert adv.dtype == torch.float32
    assert adv[0].item() == pytest.approx(0.25 / 1.0)


def test_group_labels_may_be_strings_or_numpy():
    labels = ["a", "a", "b", "a", "c", "a", "b"]
    expected = grpo_advantages(SCORES, GROUPS)
    torch.testing.assert_close(grpo_advantages(SCORES, labels), expected)
    torch.testing.assert_close(grpo_advantages(SCORES, np.array(labels, dtype=object)), expected)


def test_drgrpo_is_centred_only():
    adv = drgrpo_advantages(SCORES, GROUPS)
    expected = torch.tensor([0.25, -0.75, 0.0, 0.25, 0.0, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(grpo_advantages(SCORES, GROUPS, norm_by_std=False), expected)


def test_rloo_leave_one_out_baseline():
    adv = rloo_advantages(SCORES, GROUPS)
    # 1 - mean(0, 1, 1) = 1/3;  0 - mean(1, 1, 1) = -1
    expected = torch.tensor([1 / 3, -1.0, 0.0, 1 / 3, 0.0, 1 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_whitens_over_the_batch():
    centred = torch.tensor([0.25, -0.75, 0.0, 0.25, 0.0, 0.25, 0.0], dtype=torch.float64)
    mean = centred.mean()
    var = ((centred - mean) ** 2).sum() / (len(centred) - 1)
    expected = (centred - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(reinforce_pp_advantages(SCORES, GROUPS), expected)


def test_reinforce_pp_token_weighted_whitening_matches_token_level():
    lengths = torch.tensor([3, 1, 2, 4, 1, 2, 5])
    adv = reinforce_pp_advantages(SCORES, GROUPS, response_lengths=lengths)
    centred = drgrpo_advantages(SCORES, GROUPS)
    tokens = torch.repeat_interleave(centred, lengths)  # the token-level tensor, flattened
    expected_tokens = (tokens - tokens.mean()) / torch.sqrt(tokens.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(torch.repeat_interleave(adv, lengths), expected_tokens)


def test_dispatcher():
    torch.testing.assert_close(compute_advantages("grpo", SCORES, GROUPS), grpo_advantages(SCORES, GROUPS))
    torch.testing.assert_close(
        compute_advantages("drgrpo", SCORES, GROUPS), drgrpo_advantages(SCORES, GROUPS)
    )
    torch.testing.assert_close(compute_advantages("rloo", SCORES, GROUPS), rloo_advantages(SCORES, GROUPS))
    torch.testing.assert_close(
        compute_advantages("reinforce_pp", SCORES, GROUPS), reinforce_pp_advantages(SCORES, GROUPS)
    )
    assert compute_advantages("grpo", SCORES, GROUPS, epsilon=1.0)[0].item() == pytest.approx(0.25 / 1.5)
    with pytest.raises(ValueError, match="unknown advantage"):
        compute_advantages("ppo", SCORES, GROUPS)


def test_all_equal_group_gets_zero_not_nan():
    adv = grpo_advantages(torch.ones(4), [7, 7, 7, 7])
    assert torch.equal(adv, torch.zeros(4))
    assert not math.isnan(reinforce_pp_advantages(torch.ones(4), [7, 7, 7, 7]).sum().item())


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="entries"):
        grpo_advantages(torch.ones(3), [0, 0])
