"""Reward shaping after scoring: the cap's truncated reward and DAPO's soft overlong punishment."""

from __future__ import annotations

import re

import pytest

from conf.schema import VerifierConfig
from verifier.extract import extract_answer
from verifier.shaping import overlong_penalty, shape_rewards

L_MAX, BUFFER, FACTOR = 100, 20, 1.5


@pytest.mark.parametrize("length, expected", [
    (1, 0.0),
    (L_MAX - BUFFER, 0.0),                      # the buffer's first edge: no penalty yet
    (L_MAX - BUFFER + 1, -1 / BUFFER * FACTOR),  # one token into the buffer
    (L_MAX - BUFFER // 2, -0.5 * FACTOR),
    (L_MAX, -FACTOR),                           # at the cap: the full factor
])
def test_overlong_penalty_at_the_buffer_edges(length, expected):
    assert overlong_penalty(length, L_MAX, BUFFER, FACTOR) == pytest.approx(expected)


def test_overlong_penalty_matches_verls_dapo_formula():
    # verl's DAPO reward manager: min(-(L - (L_max - B)) / B * factor, 0), added to the score.
    for length in range(1, L_MAX + 1):
        verl = min(-(length - (L_MAX - BUFFER)) / BUFFER * FACTOR, 0)
        assert overlong_penalty(length, L_MAX, BUFFER, FACTOR) == pytest.approx(verl)


def test_a_zero_buffer_is_off():
    assert overlong_penalty(L_MAX, L_MAX, 0, FACTOR) == 0.0
    rewards, metrics = shape_rewards([1.0, 0.0], [L_MAX, 3], ["length", "stop"],
                                     VerifierConfig(truncated_reward=None), L_MAX)
    assert rewards == [1.0, 0.0] and metrics == {}


def test_penalty_is_added_after_the_truncated_reward():
    cfg = VerifierConfig(truncated_reward=0.0, overlong_buffer_len=BUFFER,
                         overlong_penalty_factor=FACTOR)
    scores = [1.0, 1.0, 1.0, 0.0]
    lengths = [10, L_MAX - BUFFER // 2, L_MAX, L_MAX]
    reasons = ["stop", "stop", "stop", "length"]
    rewards, metrics = shape_rewards(scores, lengths, reasons, cfg, L_MAX)
    assert rewards == pytest.approx([1.0, 1.0 - 0.5 * FACTOR, 1.0 - FACTOR, 0.0 - FACTOR])
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(-(0.5 + 1 + 1) * FACTOR / 4)
    assert metrics["reward/overlong_frac"] == pytest.approx(0.75)


def test_without_a_truncated_reward_it_is_verls_dapo_reward():
    cfg = VerifierConfig(truncated_reward=None, overlong_buffer_len=BUFFER,
                         overlong_penalty_factor=FACTOR)
    rewards, _ = shape_rewards([1.0], [L_MAX], ["length"], cfg, L_MAX)
    assert rewards == pytest.approx([1.0 - FACTOR])


def test_buffer_longer_than_the_cap_is_refused():
    from conf.load import ConfigError, load_config

    with pytest.raises(ConfigError, match="'verifier.overlong_buffer_len'"):
        load_config(overrides=["rollout.max_response_tokens=16", "verifier.overlong_buffer_len=17"])
    cfg = load_config(overrides=["rollout.max_response_tokens=16", "verifier.overlong_buffer_len=16"])
    assert cfg.verifier.overlong_buffer_len == 16


# verl's math_dapo.py: the last match of this pattern anywhere in the response is the answer.
DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

DAPO_STYLE_RESPONSES = [
    # (response to a prompt that asks for a final "Answer: $Answer" line, answer lpreg extracts)
    ("First, 3 * 11 = 33. Adding 1 gives 34.\n\nAnswer: 34", "34"),
    ("... so the sum is 1/2.\nAnswer: $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("We guess 5 at first.\nAnswer: 5 is wrong, retry.\nAnswer: 7", "7"),
    ("**Answer:** 18", "18"),
    ("Answer: 42.\n", "42"),
    ("Answer:12", "12"),
    ("Answer : 12", "12"),
    ("answer: -3", "-3"),
]


@pytest.mark.parametrize("response, expected", DAPO_STYLE_RESPONSES)
def test_answer_lines_of_dapo_style_prompts_are_extracted(response, expected):
    assert extract_answer(response) == expected
    # The Answer line alone (no boxed answers) is DAPO's rule; lpreg finds the same line.
    assert extract_answer(response, boxed_commands=()) == expected
    dapo = DAPO_ANSWER.findall(response)[-1]
    assert expected in dapo.replace("$", "").replace("*", "").rstrip(". ")


def test_where_the_answer_rules_differ_from_dapos():
    # A box before the Answer line: lpreg takes the box, DAPO the line; with
    # verifier.boxed_commands=[] lpreg takes the line too.
    response = "Halfway, \\boxed{3}.\nAnswer: 4"
    assert extract_answer(response) == "3"
    assert extract_answer(response, boxed_commands=()) == "4"
    assert DAPO_ANSWER.findall(response)[-1] == "4"
    # "answer:" in the middle of a line: DAPO takes it, lpreg only reads lines that
    # start with it.
    assert DAPO_ANSWER.findall("so the answer: 5")[-1] == "5"
    assert extract_answer("so the answer: 5") is None


def test_dapo_style_answers_verify_by_value():
    from verifier import MathVerifier

    responses = ["Answer: 34", "Answer: $\\frac{1}{2}$", "Answer: x = 5", "Answer: 1,000",
                 "Answer: 90^\\circ", "Answer: 33"]
    answers = ["34", "0.5", "5", "1000", "90", "34"]
    with MathVerifier(num_workers=1) as verifier:
        assert verifier.score_batch(responses, answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
