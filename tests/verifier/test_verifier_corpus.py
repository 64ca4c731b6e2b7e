"""Equivalence corpus: labelled (response, reference, expected reward) cases, scored by the pool."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from verifier import MathVerifier

CORPUS = Path(__file__).with_name("verifier_equivalence_corpus.jsonl")
CASES = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]

REQUIRED_CATEGORIES = {
    "integer",
    "decimal",
    "fraction",
    "radical_pi",
    "polynomial",
    "tuple",
    "set",
    "interval",
    "units_text_degrees",
    "scientific",
    "negative",
}


@pytest.fixture(scope="module")
def corpus_report():
    # A generous timeout: this tests equivalence, not speed, on a possibly busy machine.
    with MathVerifier(timeout_s=30.0, num_workers=2) as verifier:
        yield verifier.score_batch_detailed(
            [case["response"] for case in CASES], [case["reference"] for case in CASES]
        )


def test_corpus_covers_every_category_both_ways():
    assert len(CASES) >= 150
    assert len({case["id"] for case in CASES}) == len(CASES)
    counts = Counter((case["category"], case["expected"]) for case in CASES)
    for category in REQUIRED_CATEGORIES:
        assert counts[(category, 1.0)] >= 3, category
        assert counts[(category, 0.0)] >= 3, category


def test_corpus_has_no_timeouts_or_errors(corpus_report):
    assert corpus_report.timeouts == 0
    assert corpus_report.errors == 0


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case["id"] for case in CASES])
def test_equivalence(index, corpus_report):
    case = CASES[index]
    got = corpus_report.scores[index]
    assert got == case["expected"], (
        f"{case['id']}: response {case['response']!r} vs reference {case['reference']!r}: "
        f"got {got}, expected {case['expected']}"
    )
