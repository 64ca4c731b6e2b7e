"""A dense reward for integration tests: an untrained model never boxes a right answer,
but the share of digits in its output varies from sample to sample, so every GRPO group
has non-zero advantages and the learners really move the weights."""


def digit_share(response: str, answer: str) -> float:
    return sum(ch.isdigit() for ch in response) / max(1, len(response))
