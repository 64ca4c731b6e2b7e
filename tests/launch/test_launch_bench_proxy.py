"""The proxy-agreement benchmark's arithmetic, on hand-built cases."""

import math

import torch

from launch.benchmarks.proxy import agreement, regularized_set

NEG_INF = -math.inf


def test_regularized_set_takes_the_lowest_negative_tokens_the_proxy_rates_higher():
    log_prob = torch.tensor([-5.0, -4.0, -3.0, -0.1, -6.0, -2.0], dtype=torch.float64)
    negative = torch.tensor([True, True, True, True, False, True])
    proxy = torch.tensor([-4.5, NEG_INF, -2.5, -0.05, -1.0, -1.0], dtype=torch.float64)
    # rho 0.5 of 5 negative tokens: the 2 lowest (-5, -4); -4 is filtered by the proxy.
    assert regularized_set(log_prob, proxy, negative, 0.5).tolist() == [
        True, False, False, False, False, False]
    # Fewer than 2 selected: Lp-Reg does not act.
    assert not regularized_set(log_prob, proxy, negative, 0.3).any()


def test_agreement_counts_kept_verdicts_and_the_overlap_of_the_regularised_sets():
    log_prob = torch.tensor([-5.0, -4.0, -3.0, -1.0], dtype=torch.float64)
    negative = torch.ones(4, dtype=torch.bool)
    exact = torch.tensor([-4.0, -3.5, -2.0, -0.5], dtype=torch.float64)
    # The behaviour proxy misses the second token (unlisted): filtered.
    behaviour = torch.tensor([-4.0, NEG_INF, -2.0, -0.5], dtype=torch.float64)
    result = agreement(exact, behaviour, log_prob, negative, rho=0.5)
    assert result["kept_agreement"] == 0.75
    assert (result["regularized_exact"], result["regularized_behaviour"],
            result["regularized_both"]) == (2, 1, 1)
    assert result["regularized_jaccard"] == 0.5
