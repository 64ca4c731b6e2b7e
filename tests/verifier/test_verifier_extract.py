"""Final-answer extraction and the parent-side pre-checks (pure functions, no processes)."""

from __future__ import annotations

import time

import pytest

from verifier.extract import (
    extract_answer,
    extract_answer_line,
    extract_boxed,
    nesting_depth,
    quick_verdict,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} and more text", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} then \fbox{3}", "3"),
        (r"\fbox{3} then \boxed{1}", "1"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces don't close the box
        (r"\boxed{a \} b}", r"a \} b"),
        (r"\boxed{\boxed{5}}", r"\boxed{5}"),  # the outer box is the answer
        (r"\boxed{1} and \boxed{2 + \fbox{3}}", r"2 + \fbox{3}"),
        (r"\boxed {  9 }", "9"),
        (r"\boxed 5 apples", "5"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{}", None),
        (r"\boxed{   }", None),
        (r"\boxed{5", None),  # unterminated last box: no answer, not an earlier one
        (r"\boxed{1} \boxed{2", None),
        (r"\boxedx{5}", None),  # a different command
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("work\nAnswer: 17", "17"),
        ("work\nanswer: 17", "17"),
        ("Final answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Answer:** 18", "18"),
        ("**Answer: 18**", "18"),
        ("## Final Answer: 3.", "3"),
        ("The final answer: \\(x+1\\)", "x+1"),
        ("Answer: 1\nmore\nAnswer: 2", "2"),
        ("Answer:   ", None),
        ("The answer is 5", None),  # not an "Answer:" line
        ("answers: 5", None),
    ],
)
def test_extract_answer_line(text, expected):
    assert extract_answer_line(text) == expected


def test_extract_answer_prefers_box_and_is_configurable():
    text = "Answer: 1\nso \\fbox{2} and \\boxed{3}"
    assert extract_answer(text) == "3"
    assert extract_answer(text, boxed_commands=("fbox",)) == "2"
    assert extract_answer(text, boxed_commands=()) == "1"
    assert extract_answer("Answer: 1", answer_line_fallback=False) is None
    assert extract_answer("nothing", boxed_commands=()) is None


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 200_000,  # many opening boxes, none closed
        "{" * 1_000_000,
        "\\" * 1_000_000,
        "\n" * 1_000_000,
        " " * 1_000_000 + "Answer:",
        "Answer:" + " x" * 500_000,
        "\\boxed{" + "(" * 500_000 + "1" + ")" * 500_000 + "}",
        "\\fbox" * 200_000,
        "answer" * 200_000,
    ],
    ids=[
        "open-boxes", "braces", "backslashes", "newlines", "spaces", "long-line", "parens", "fbox", "answer",
    ],
)
def test_extraction_is_fast_on_megabyte_inputs(text):
    start = time.perf_counter()
    extract_answer(text)
    nesting_depth(text[:10_000])
    assert time.perf_counter() - start < 2.0


def test_nesting_depth():
    assert nesting_depth("1") == 0
    assert nesting_depth(r"\frac{1}{2}") == 1
    assert nesting_depth("((1))[{2}]") == 2
    assert nesting_depth(")))(((") == 3
    assert nesting_depth("(" * 50) == 50


@pytest.mark.parametrize(
    "answer, reference, verdict",
    [
        ("42", "42", True),
        (" 42 ", "42", True),
        ("042", "42", True),
        ("+7", "7", True),
        ("41", "42", False),
        ("-3", "3", False),
        (r"\frac{1}{2}", r"\frac{1}{2}", True),
        (r"\frac{1}{2}", "0.5", None),  # needs math-verify
        ("1,000", "1000", None),
        ("0.5", "0.50", None),
        ("", "", None),
    ],
)
def test_quick_verdict(answer, reference, verdict):
    assert quick_verdict(answer, reference) is verdict
