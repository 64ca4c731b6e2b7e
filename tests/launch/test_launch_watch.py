import math

import pytest

from launch.models.tiny_model import build_tokenizer
from launch.training.watch import (
    WATCH_HIST_EDGES,
    hist_bin_labels,
    watch_hist_due,
    watch_metrics,
    watch_token_ids,
)
from rollout.types import Sample


def _sample(ids, probs, mask=None):
    s = Sample(prompt_index=0, prompt_token_ids=[1], response_token_ids=ids,
               response_logprobs=[math.log(p) for p in probs], finish_reason="stop",
               weight_version=0, worker_index=0)
    if mask is not None:
        s.response_mask = mask
    return s


class _WordTokenizer:
    """BPE-like: a word and the word after a space are different tokens."""

    vocab = {"wait": 5, " wait": 6, " ": 7, "W": 8, "Wa": 9, " W": 10}

    def __call__(self, text, add_special_tokens=False):
        if text in self.vocab:
            return {"input_ids": [self.vocab[text]]}
        return {"input_ids": [self.vocab[text[:2]], 99]}  # several tokens: the first leads


def test_watched_ids_with_and_without_a_leading_space():
    assert watch_token_ids(_WordTokenizer(), ["wait"]) == {"wait": frozenset({5, 6})}
    assert watch_token_ids(_WordTokenizer(), ["Wait!"]) == {"Wait!": frozenset({9, 10})}
    # Character level: " W" is a space then W, so only W itself is watched.
    tok = build_tokenizer()
    assert watch_token_ids(tok, ["W"]) == {"W": frozenset({tok.convert_tokens_to_ids("W")})}


def test_share_and_mean_probability_by_hand():
    samples = [_sample([5, 1, 6, 2], [0.1, 0.9, 0.3, 0.5]), _sample([1, 1, 1, 5], [1, 1, 1, 0.02])]
    m = watch_metrics(samples, {"wait": frozenset({5, 6}), "x": frozenset({42})})
    assert m["watch/wait/sampled_frac"] == pytest.approx(3 / 8)
    assert m["watch/wait/sampled_prob"] == pytest.approx((0.1 + 0.3 + 0.02) / 3)
    assert m["watch/x/sampled_frac"] == 0.0 and "watch/x/sampled_prob" not in m
    assert not any(k.endswith("prob_hist") for k in m)
    assert watch_metrics(samples, {}) == {}


def test_observation_tokens_are_not_counted():
    samples = [_sample([5, 5, 1, 1], [0.5, 1.0, 0.5, 1.0], mask=[1, 0, 1, 0])]
    m = watch_metrics(samples, {"wait": frozenset({5})})
    assert m["watch/wait/sampled_frac"] == pytest.approx(1 / 2)
    assert m["watch/wait/sampled_prob"] == pytest.approx(0.5)


def test_histogram_counts_in_fixed_bins():
    samples = [_sample([5] * 5, [0.0005, 0.01, 0.015, 0.95, 1.0])]
    hist = watch_metrics(samples, {"w": frozenset({5})}, histogram=True)["watch/w/prob_hist"]
    assert len(hist) == len(WATCH_HIST_EDGES) + 1 == len(hist_bin_labels())
    assert sum(hist) == 5 and hist[0] == 1 and hist[2] == 2 and hist[-1] == 2
    assert [watch_hist_due(s, 5) for s in (1, 5, 10)] == [False, True, True]
    assert not watch_hist_due(5, 0)
