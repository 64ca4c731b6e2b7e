"""A dense reward for integration tests: an untrained model never boxes a right answer,
but the share of digits in its output varies from sample to sample, so every GRPO group
has non-zero advantages and the learners really move the weights."""

import hashlib


def digit_share(response: str, answer: str) -> float:
    return sum(ch.isdigit() for ch in response) / max(1, len(response))


def digit_share_on_odd_answers(response: str, answer: str) -> float:
    """``digit_share`` for odd answers, a flat 0 for even ones: every group of an even
    answer has equal rewards, which dynamic sampling must drop."""
    return 0.0 if int(answer) % 2 == 0 else digit_share(response, answer)


def distinct_on_odd_answers(response: str, answer: str) -> float:
    """A flat 0 for even answers; for odd ones a value read off the response's bytes, so two
    different responses all but never tie. Which groups dynamic sampling keeps then depends
    on the prompts alone, not on what a particular generation happened to produce."""
    if int(answer) % 2 == 0:
        return 0.0
    digest = hashlib.sha256(response.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32
