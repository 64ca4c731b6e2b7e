"""Lp-Reg's internals as metrics: the selected share the filter keeps, 1 - Z, and the
KL term's pull against the policy gradient's push."""

import math
from types import SimpleNamespace

import pytest
import torch

from conf.schema import AlgorithmConfig
from launch.training.step_metrics import average_learner_metrics
from learner import LossInputs, policy_loss
from learner.losses import COUNT_METRICS, LP_REG_RATIOS, lp_reg_kept_mass, lp_reg_ratio_metrics
from learner.proxy import min_p_proxy_log_prob

E2 = math.exp(2.0)
# The hand case of test_learner_losses: rho = 0.5 selects tokens 0 and 1 (k = 2 of 4
# negative ones); token 1 was filtered, token 0 is regularised.
LP = [-3.0, -2.0, -0.5, -0.1, -5.0]
PROXY = [-1.0, -math.inf, 0.0, 0.0, -1.0]
ADV = [-1.0, -1.0, -1.0, -1.0, 1.0]


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def leaf(*rows):
    return t(*rows).requires_grad_()


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def loss_of(name, log_prob, old, adv, mask, *, proxy_log_prob=None, **algo):
    return policy_loss(name, LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy_log_prob),
                       AlgorithmConfig(**algo))


def _hand(lp=LP, proxy=PROXY, adv=ADV, **algo):
    log_prob = leaf(lp)
    loss, m = loss_of("lp_reg", log_prob, log_prob.detach(), t(adv), torch.ones(1, len(lp)),
                      proxy_log_prob=t(proxy), lp_reg_neg_frac=0.5, **algo)
    return m, grad_of(loss, log_prob)


def test_hand_case_sums_and_means():
    # Tokens 0 and 1 are selected; token 1 was filtered, token 0 is regularised with
    # Z = exp(-3 - (-1)) = e^-2.
    m, g = _hand()
    assert m["lp_reg/selected_tokens"].item() == 2
    assert m["lp_reg/selected_kept_tokens"].item() == 1
    assert m["lp_reg/filtered_mass_sum"].item() == pytest.approx(1 - 1 / E2)
    assert m["lp_reg/protection_ratio_sum"].item() == pytest.approx(E2 - 1)
    means = lp_reg_ratio_metrics({k: float(v) for k, v in m.items()})
    assert means == pytest.approx({"lp_reg/selected_kept_frac": 0.5, "lp_reg/filtered_mass": 1 - 1 / E2,
                                   "lp_reg/protection_ratio": E2 - 1})
    # On-policy the token's gradient is |A| - beta (1/Z - 1): the ratio is the pull over the push.
    assert 1 - g[0, 0].item() * 5 / abs(ADV[0]) == pytest.approx(means["lp_reg/protection_ratio"])


def test_beta_and_advantage_scale_the_ratio():
    m, g = _hand(adv=[-2.0, -2.0, -2.0, -2.0, 1.0], lp_reg_coef=0.5)
    assert m["lp_reg/protection_ratio_sum"].item() == pytest.approx(0.5 * (E2 - 1) / 2)
    assert 1 - g[0, 0].item() * 5 / 2 == pytest.approx(0.5 * (E2 - 1) / 2)


def test_kept_mass_is_the_filters_share_of_the_distribution():
    logits = torch.tensor([[3.0, 2.0, 0.0, -4.0]], dtype=torch.float64)
    ids = torch.tensor([1])
    proxy = min_p_proxy_log_prob(logits, ids, kappa=0.02)
    p = logits.softmax(-1)[0]
    kept = p[p >= 0.02 * p.max()].sum()
    z = lp_reg_kept_mass(logits.log_softmax(-1)[0, 1:2], proxy)
    assert z.item() == pytest.approx(kept.item())


def test_means_are_token_weighted_over_micro_batches_and_ranks():
    # Two calls (micro-batches or ranks) with 1 and 3 regularised tokens: the mean is over
    # the 4 tokens, not the mean of the two calls' means.
    m1, _ = _hand()
    m2, _ = _hand(lp=[-3.0, -3.0, -2.0, -0.1, -0.2, -0.1], proxy=[-2.0, -1.0, -1.5, 0.0, 0.0, 0.0],
                  adv=[-1.0] * 6)
    assert m2["lp_reg/regularized_tokens"].item() == 3
    assert set(LP_REG_RATIOS) | COUNT_METRICS >= {"lp_reg/selected_tokens", "lp_reg/protection_ratio"}
    ranks = [SimpleNamespace(metrics={k: float(v) for k, v in m.items()}) for m in (m1, m2)]
    combined = average_learner_metrics(ranks)
    z = [1 / E2, math.exp(-1), math.exp(-2), math.exp(-0.5)]
    assert combined["lp_reg/regularized_tokens"] == 4
    assert combined["lp_reg/filtered_mass"] == pytest.approx(sum(1 - x for x in z) / 4)
    assert combined["lp_reg/protection_ratio"] == pytest.approx(sum(1 / x - 1 for x in z) / 4)
    assert combined["lp_reg/selected_kept_frac"] == pytest.approx(4 / 5)


def test_no_regularised_token_no_mean():
    m, _ = _hand(proxy=[-math.inf] * 5)
    means = lp_reg_ratio_metrics({k: float(v) for k, v in m.items()})
    assert means == {"lp_reg/selected_kept_frac": 0.0}
