"""Rollout correction (TIS, sequence masking) and the reference KL, against hand-computed values."""

import math

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner import POLICY_LOSSES, LossInputs, kl_penalty, policy_loss
from learner.rollout_correction import mis_keep, rollout_correction, tis_weights, token_ratio

F64 = torch.float64
CAP = 2.0

# Three sequences; every valid token's ratio pi_old / pi_behaviour written down:
#   row 0: 1.5, 3, 0.5   geometric mean 2.25^(1/3) = 1.31 -> kept
#   row 1: 4, 2.5, (pad) geometric mean sqrt(10)  = 3.16 -> dropped (> 2)
#   row 2: 1/3           geometric mean 1/3             -> dropped (< 1/2)
RATIOS = [[1.5, 3.0, 0.5], [4.0, 2.5, 100.0], [1 / 3, 7.0, 7.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=F64)
ADV = torch.tensor([[1.0] * 3, [-2.0] * 3, [0.5] * 3], dtype=F64)


def hand_batch():
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.2, -1.0], [-0.7, -0.1, -0.1]], dtype=F64)
    old = rollout + torch.tensor(RATIOS, dtype=F64).log()
    return old, rollout


def test_token_ratio_is_one_on_padding():
    old, rollout = hand_batch()
    ratio = token_ratio(old, rollout, MASK)
    expected = torch.tensor([[1.5, 3.0, 0.5], [4.0, 2.5, 1.0], [1 / 3, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(ratio, expected, rtol=1e-12, atol=0)


def test_tis_weights_and_metrics_hand_values():
    old, rollout = hand_batch()
    weights, metrics = tis_weights(old, rollout, MASK, CAP)
    expected = torch.tensor([[1.5, 2.0, 0.5], [2.0, 2.0, 1.0], [1 / 3, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
    assert float(metrics["rollout_correction/truncated_frac"]) == pytest.approx(3 / 6)  # 3, 4, 2.5
    assert float(metrics["rollout_correction/mean_ratio"]) == pytest.approx(
        (1.5 + 3 + 0.5 + 4 + 2.5 + 1 / 3) / 6)
    assert not weights.requires_grad


def test_mis_keeps_the_sequences_inside_the_band():
    old, rollout = hand_batch()
    keep, metrics = mis_keep(old, rollout, MASK, CAP)
    assert keep.tolist() == [[True, True, True], [False, False, False], [False, False, False]]
    assert float(metrics["rollout_correction/masked_frac"]) == pytest.approx(2 / 3)
    assert float(metrics["rollout_correction/mean_ratio"]) == pytest.approx(
        (1.5 + 3 + 0.5 + 4 + 2.5 + 1 / 3) / 6)


def test_mis_band_is_closed_and_empty_rows_are_kept():
    rollout = torch.zeros(3, 2, dtype=F64)
    # geometric means 2^(1/2) * 2^(1/2) = 2 (edge, kept), 1/2 (edge, kept), and a row with no tokens.
    old = torch.tensor([[0.5, 0.5], [-1.0, 0.0], [9.0, 9.0]], dtype=F64) * math.log(2.0)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=F64)
    keep, metrics = mis_keep(old, rollout, mask, 2.0)
    assert keep.any(-1).tolist() == [True, True, False]  # row 2: nothing to keep
    assert float(metrics["rollout_correction/masked_frac"]) == 0.0


def test_none_is_no_correction_and_bad_modes_fail():
    old, rollout = hand_batch()
    none = rollout_correction("none", old, rollout, MASK, CAP)
    assert none.weights is None and none.keep is None and none.metrics == {}
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction("is", old, rollout, MASK, CAP)
    with pytest.raises(ValueError, match="cap"):
        rollout_correction("tis", old, rollout, MASK, 1.0)


def on_policy_inputs(**extra):
    """log_prob = old (ratio 1), so ppo_clip's per-token loss is -A and its gradient -A / N."""
    old, rollout = hand_batch()
    log_prob = old.clone().requires_grad_()
    return log_prob, LossInputs(log_prob, old, ADV, MASK, rollout_log_prob=rollout, **extra)


def test_tis_multiplies_every_token_term_by_its_weight():
    log_prob, inputs = on_policy_inputs()
    loss, metrics = policy_loss("ppo_clip", inputs, AlgorithmConfig(rollout_correction="tis"))
    weights = torch.tensor([[1.5, 2.0, 0.5], [2.0, 2.0, 0.0], [1 / 3, 0.0, 0.0]], dtype=F64)
    assert float(loss.detach()) == pytest.approx(float(-(weights * ADV).sum() / 6), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -weights * ADV / 6, rtol=1e-12, atol=0)
    assert float(metrics["rollout_correction/truncated_frac"]) == pytest.approx(0.5)


@pytest.mark.parametrize("global_num_tokens", [None, 6.0])
def test_mis_drops_sequences_but_keeps_the_global_denominator(global_num_tokens):
    log_prob, inputs = on_policy_inputs()
    loss, metrics = policy_loss("ppo_clip", inputs, AlgorithmConfig(rollout_correction="mis"),
                                global_num_tokens=global_num_tokens)
    # Only row 0 (3 tokens, A = 1) remains; the denominator is still all 6 tokens.
    assert float(loss.detach()) == pytest.approx(-3.0 / 6, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, log_prob)
    expected = torch.zeros(3, 3, dtype=F64)
    expected[0] = -1.0 / 6
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert float(metrics["rollout_correction/masked_frac"]) == pytest.approx(2 / 3)


def random_inputs(seed=0, batch=6, length=12):
    g = torch.Generator().manual_seed(seed)
    log_prob = (-3.0 * torch.rand(batch, length, generator=g, dtype=F64) ** 2).requires_grad_()
    old = log_prob.detach() + 0.2 * torch.randn(batch, length, generator=g, dtype=F64)
    # Per-sequence offsets drive some geometric-mean ratios out of [1/2, 2].
    offset = torch.tensor([0.0, 1.2, -1.2, 0.0, 0.3, -0.3], dtype=F64)[:batch, None]
    rollout = old + offset + 0.8 * torch.randn(batch, length, generator=g, dtype=F64)
    adv = torch.randn(batch, 1, generator=g, dtype=F64).expand(batch, length)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    proxy = log_prob.detach() + torch.randn(batch, length, generator=g, dtype=F64)
    entropy = 2.0 * torch.rand(batch, length, generator=g, dtype=F64)
    return log_prob, old, rollout, adv, mask, proxy, entropy


ALGO = dict(lp_reg_neg_frac=0.3, kl_cov_ratio=0.1, clip_cov_ratio=0.05, entropy_top_frac=0.5)


def grad_for(name, correction, *, seed=0):
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs(seed)
    inputs = LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy, entropy=entropy,
                        rollout_log_prob=rollout, generator=torch.Generator().manual_seed(3))
    loss, _ = policy_loss(name, inputs, AlgorithmConfig(loss=name, rollout_correction=correction, **ALGO),
                          global_num_tokens=float(mask.sum()), global_num_seqs=float(mask.shape[0]))
    (grad,) = torch.autograd.grad(loss, log_prob)
    return grad, old, rollout, mask


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_tis_scales_each_tokens_gradient_for_every_loss(name):
    plain, old, rollout, mask = grad_for(name, "none")
    corrected, *_ = grad_for(name, "tis")
    weights, _ = tis_weights(old, rollout, mask, 2.0)
    assert (weights < 1).any() and (weights == 2).any()
    torch.testing.assert_close(corrected, weights * plain, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in POLICY_LOSSES if n != "gspo"])
def test_mis_silences_dropped_sequences_for_every_loss(name):
    corrected, old, rollout, mask = grad_for(name, "mis")
    keep, _ = mis_keep(old, rollout, mask, 2.0)
    dropped = ~keep.any(-1) & mask.bool().any(-1)
    assert dropped.any() and (~dropped).any()
    assert torch.count_nonzero(corrected[dropped]) == 0
    assert torch.count_nonzero(corrected[~dropped]) > 0


def test_mis_with_gspo_too():
    # GSPO's sequence-level aggregation: a dropped sequence adds nothing either.
    corrected, old, rollout, mask = grad_for("gspo", "mis")
    keep, _ = mis_keep(old, rollout, mask, 2.0)
    assert torch.count_nonzero(corrected[~keep.any(-1)]) == 0


def test_correction_without_rollout_log_probs_fails():
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    with pytest.raises(ValueError, match="rollout_log_prob"):
        policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask),
                    AlgorithmConfig(rollout_correction="tis"))


# ----------------------------------------------------------------------------- reference KL


@pytest.mark.parametrize("kl_type", ["low_var_kl", "kl", "mse"])
def test_kl_loss_is_coef_times_the_aggregated_penalty(kl_type):
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    ref = log_prob.detach() + 0.3
    algo = dict(loss="ppo_clip", kl_loss_type=kl_type)
    base, _ = policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask), AlgorithmConfig(**algo))
    with_kl, metrics = policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask, ref_log_prob=ref),
                                   AlgorithmConfig(kl_loss_coef=0.1, **algo))
    kl = kl_penalty(log_prob.detach(), ref, kl_type)
    expected_kl = float((kl * mask).sum() / mask.sum())
    assert float(metrics["actor/kl_loss"]) == pytest.approx(expected_kl, rel=1e-12)
    assert float((with_kl - base).detach()) == pytest.approx(0.1 * expected_kl, rel=1e-10)


def test_kl_loss_is_zero_with_zero_gradient_at_the_reference():
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    algo = AlgorithmConfig(loss="ppo_clip", kl_loss_coef=1.0)
    inputs = LossInputs(log_prob, old, adv, mask, ref_log_prob=log_prob.detach())
    loss, metrics = policy_loss("ppo_clip", inputs, algo)
    assert float(metrics["actor/kl_loss"]) == 0.0
    base, _ = policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask),
                          AlgorithmConfig(loss="ppo_clip"))
    torch.testing.assert_close(torch.autograd.grad(loss, log_prob)[0],
                               torch.autograd.grad(base, log_prob)[0], rtol=0, atol=1e-15)


def test_kl_loss_needs_reference_log_probs():
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    with pytest.raises(ValueError, match="ref_log_prob"):
        policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask), AlgorithmConfig(kl_loss_coef=0.1))


def test_no_kl_metric_when_off():
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    _, metrics = policy_loss("ppo_clip", LossInputs(log_prob, old, adv, mask), AlgorithmConfig())
    assert "actor/kl_loss" not in metrics and not any(k.startswith("rollout_correction/") for k in metrics)


def test_loss_metrics_are_this_calls_own_mean_not_its_share():
    # With global counts the loss is this micro-batch's share of the mini-batch's mean; the
    # metrics stay means, so averaging them over micro-batches and ranks gives the batch's.
    log_prob, old, rollout, adv, mask, proxy, entropy = random_inputs()
    ref = log_prob.detach() - 0.2
    algo = AlgorithmConfig(loss="ppo_clip", kl_loss_coef=0.1)
    inputs = LossInputs(log_prob, old, adv, mask, ref_log_prob=ref)
    whole, whole_metrics = policy_loss("ppo_clip", inputs, algo)
    share, share_metrics = policy_loss("ppo_clip", inputs, algo, global_num_tokens=float(4 * mask.sum()))
    assert float(share.detach()) == pytest.approx(float(whole.detach()) / 4, rel=1e-12)
    for key in ("actor/pg_loss", "actor/kl_loss"):
        assert float(share_metrics[key]) == pytest.approx(float(whole_metrics[key]), rel=1e-12)
