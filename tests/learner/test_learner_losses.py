"""Policy losses, KL estimators and aggregation, against hand-computed values and gradients."""

import math

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner import AGG_MODES, POLICY_LOSSES, LossInputs, aggregate_loss, kl_penalty, policy_loss

F64 = torch.float64
E2 = math.exp(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def leaf(*rows):
    return t(*rows).requires_grad_()


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def loss_of(name, log_prob, old, adv, mask, *, proxy_log_prob=None, entropy=None, generator=None,
            global_num_tokens=None, global_num_seqs=None, **algo):
    """``policy_loss`` with the per-token inputs spelled out and the hyper-parameters as
    ``AlgorithmConfig`` fields (their schema defaults otherwise)."""
    inputs = LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy_log_prob, entropy=entropy,
                        generator=generator)
    return policy_loss(name, inputs, AlgorithmConfig(**algo), global_num_tokens=global_num_tokens,
                       global_num_seqs=global_num_seqs)


def random_batch(seed=0, batch=6, length=40, off_policy=True):
    g = torch.Generator().manual_seed(seed)
    log_prob = (-3.0 * torch.rand(batch, length, generator=g, dtype=F64) ** 2).requires_grad_()
    noise = 0.3 * torch.randn(batch, length, generator=g, dtype=F64)
    old = log_prob.detach() + (noise if off_policy else 0.0)
    adv = torch.randn(batch, 1, generator=g, dtype=F64).expand(batch, length)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    proxy = log_prob.detach() + torch.randn(batch, length, generator=g, dtype=F64)
    proxy[torch.rand(batch, length, generator=g) < 0.2] = -math.inf
    entropy = (2.0 * torch.rand(batch, length, generator=g, dtype=F64)).requires_grad_()
    return log_prob, old, adv, mask, proxy, entropy


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    lp, ref = t(0.0, -1.0, -2.0), t(-1.0, 0.0, -2.0)
    d = lp - ref  # 1, -1, 0
    torch.testing.assert_close(kl_penalty(lp, ref, "kl"), d)
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), d.abs())
    torch.testing.assert_close(kl_penalty(lp, ref, "mse"), 0.5 * d**2)
    k3 = torch.exp(-d) + d - 1  # exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), k3)
    for alias, name in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")):
        torch.testing.assert_close(kl_penalty(lp, ref, alias), kl_penalty(lp, ref, name))
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty(lp, ref, "full")


@pytest.mark.parametrize("kl_type", ["kl", "abs", "mse", "low_var_kl"])
def test_kl_clamped_to_ten_with_finite_zero_gradient(kl_type):
    lp = leaf(-30.0, 30.0)
    ref = t(0.0, 0.0)  # huge |lp - ref| both ways; k3 of ref - lp = 30 overflows without care
    kl = kl_penalty(lp, ref, kl_type)
    assert kl.max().item() <= 10.0 and kl.min().item() >= -10.0
    g = grad_of(kl.sum(), lp)
    assert torch.isfinite(g).all()
    if kl_type != "low_var_kl":  # k3 at lp - ref = +30 is 29 - exp(-30) -> clamped too
        assert torch.equal(g, torch.zeros(2, dtype=F64))
    lp = leaf(-1000.0)
    assert torch.isfinite(grad_of(kl_penalty(lp, t(0.0), kl_type).sum(), lp)).all()


# ----------------------------------------------------------------------------- aggregation

LOSS_MAT = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
MASK = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 7 / 3),
        ("seq-mean-token-mean", (1.5 + 4.0) / 2),
        ("seq-mean-token-sum", (3.0 + 4.0) / 2),
        ("seq-mean-token-sum-norm", 7 / (2 * 3)),
    ],
)
def test_aggregation_modes(mode, expected):
    assert aggregate_loss(LOSS_MAT, MASK, mode).item() == pytest.approx(expected)
    # Masked entries are ignored even when they are not finite.
    poisoned = LOSS_MAT.masked_fill(MASK == 0, math.nan)
    assert aggregate_loss(poisoned, MASK, mode).item() == pytest.approx(expected)


def test_aggregation_global_denominators_and_scale_factor():
    assert aggregate_loss(LOSS_MAT, MASK, "token-mean", global_num_tokens=14).item() == pytest.approx(0.5)
    agg = aggregate_loss
    assert agg(LOSS_MAT, MASK, "seq-mean-token-mean", global_num_seqs=11).item() == pytest.approx(5.5 / 11)
    assert agg(LOSS_MAT, MASK, "seq-mean-token-sum", global_num_seqs=7).item() == pytest.approx(1.0)
    assert agg(LOSS_MAT, MASK, "seq-mean-token-sum-norm", loss_scale_factor=7).item() == pytest.approx(0.5)
    out = aggregate_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm", global_num_seqs=7, loss_scale_factor=2)
    assert out.item() == pytest.approx(0.5)
    assert aggregate_loss(LOSS_MAT, torch.zeros_like(MASK), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(LOSS_MAT, MASK, "sum")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "entropy_bonus"])
def test_global_denominators_make_micro_batches_add_up(mode, name):
    """Sum of per-micro-batch losses (with global counts) == loss of the whole batch."""
    log_prob, old, adv, mask, _, entropy = random_batch(seed=1)
    kwargs = {"loss_agg_mode": mode, "loss_scale_factor": 64}
    if name == "entropy_bonus":
        name, kwargs = "ppo_clip", {**kwargs, "entropy": entropy, "entropy_coef": 0.3}
    full, _ = loss_of(name, log_prob, old, adv, mask, **kwargs)
    g_full = torch.autograd.grad(full, log_prob)[0]
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part_kwargs = dict(kwargs)
        if "entropy" in part_kwargs:
            part_kwargs["entropy"] = entropy[rows]
        part, _ = loss_of(
            name, log_prob[rows], old[rows], adv[rows], mask[rows],
            global_num_tokens=mask.sum(), global_num_seqs=mask.shape[0], **part_kwargs,
        )
        total = total + part
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(torch.autograd.grad(total, log_prob)[0], g_full)


# ----------------------------------------------------------------------------- PPO clip


def test_ppo_clip_hand_case():
    # (A, r): (1, 1.5) clipped at 1.28; (-1, 0.5) clipped at 0.8; (1, 0.9) and (-1, 1.5) unclipped.
    log_prob = leaf([0.0, 0.0, 0.0, 0.0])
    old = t([-math.log(1.5), -math.log(0.5), -math.log(0.9), -math.log(1.5)])
    adv = t([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(1, 4)
    loss, m = loss_of("ppo_clip", log_prob, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.9 + 1.5) / 4)
    torch.testing.assert_close(grad_of(loss, log_prob), t([0.0, 0.0, -0.9 / 4, 1.5 / 4]))
    assert m["actor/pg_clipfrac"].item() == pytest.approx(0.5)
    assert m["actor/pg_loss"].item() == pytest.approx(loss.item())
    expected_kl = (math.log(1.5) + math.log(0.5) + math.log(0.9) + math.log(1.5)) / 4
    assert m["actor/ppo_kl"].item() == pytest.approx(-expected_kl)
    assert m["actor/low_prob_frac"].item() == 0.0
    assert "lp_reg/selected_frac" not in m and "actor/entropy" not in m


def test_metrics_low_prob_entropy_filtered():
    log_prob = leaf([math.log(0.05), math.log(0.5), math.log(0.09), -50.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    proxy = t([-math.inf, 0.0, -2e3, 0.0])
    entropy = t([1.0, 2.0, 3.0, 100.0])
    _, m = loss_of(
        "ppo_clip", log_prob, log_prob.detach(), t([1.0, 1.0, 1.0, 1.0]), mask,
        proxy_log_prob=proxy, entropy=entropy,
    )
    assert m["actor/low_prob_frac"].item() == pytest.approx(2 / 3)
    assert m["actor/entropy"].item() == pytest.approx(2.0)
    assert m["lp_reg/filtered_frac"].item() == pytest.approx(2 / 3)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


# ----------------------------------------------------------------------------- Lp-Reg

# One response: four negative-advantage tokens and one positive one, on-policy (r = 1).
# rho = 0.5 -> k = floor(0.5 * 4) = 2: the two lowest, -3 and -2, are selected. Token 0's proxy
# (-1) is above its log-prob: regularised. Token 1 was removed by the filter: not regularised.
# The positive token (-5, proxy -1) would qualify but the positive side is off.
LP = [-3.0, -2.0, -0.5, -0.1, -5.0]
PROXY = [-1.0, -math.inf, 0.0, 0.0, -1.0]
ADV = [-1.0, -1.0, -1.0, -1.0, 1.0]


def lp_reg_hand(**kwargs):
    log_prob = leaf(LP)
    loss, m = loss_of(
        "lp_reg", log_prob, log_prob.detach(), t(ADV), torch.ones(1, 5),
        proxy_log_prob=t(PROXY), lp_reg_neg_frac=0.5, **kwargs,
    )
    return loss, m, grad_of(loss, log_prob)


def test_lp_reg_hand_case_value_gradient_metrics():
    loss, m, g = lp_reg_hand()
    # token 0: -A r + KL = 1 + (e^2 - 2 - 1); tokens 1-3: 1 each; positive token: -1.
    assert loss.item() == pytest.approx((1 + E2 - 3 + 1 + 1 + 1 - 1) / 5)
    # d/dlp: surrogate -A r = 1; k3 KL: 1 - exp(proxy - lp) = 1 - e^2.
    torch.testing.assert_close(g, t([(2 - E2) / 5, 1 / 5, 1 / 5, 1 / 5, -1 / 5]))
    assert m["lp_reg/selected_frac"].item() == pytest.approx(2 / 5)
    assert m["lp_reg/regularized_frac"].item() == pytest.approx(1 / 5)
    assert m["lp_reg/regularized_tokens"].item() == 1
    assert m["lp_reg/proxy_kl"].item() == pytest.approx(E2 - 3)
    assert m["lp_reg/filtered_frac"].item() == pytest.approx(1 / 5)


def test_lp_reg_coef_and_kl_type():
    loss, _, g = lp_reg_hand(lp_reg_coef=0.5, kl_type="kl")
    # KL "kl" = lp - proxy = -2 for token 0, weighted 0.5; gradient 0.5.
    assert loss.item() == pytest.approx((1 + 0.5 * -2 + 1 + 1 + 1 - 1) / 5)
    assert g[0, 0].item() == pytest.approx((1 + 0.5) / 5)


def test_filtered_token_never_regularised():
    """Even as the single lowest token of a large selection, a filtered token gets no KL."""
    log_prob = leaf([-20.0, -19.0] + [-1.0] * 8)
    proxy = t([-math.inf, -1e4] + [0.0] * 8)  # both lowest tokens filtered (-inf and reference-style)
    adv = t([-1.0] * 10)
    reg, m = loss_of("lp_reg", log_prob, log_prob.detach(), adv, torch.ones(1, 10),
                         proxy_log_prob=proxy, lp_reg_neg_frac=0.2)
    ppo, _ = loss_of("ppo_clip", log_prob, log_prob.detach(), adv, torch.ones(1, 10))
    assert m["lp_reg/selected_frac"].item() == pytest.approx(0.2)
    assert m["lp_reg/regularized_frac"].item() == 0.0
    assert m["lp_reg/proxy_kl"].item() == 0.0
    torch.testing.assert_close(reg, ppo)
    torch.testing.assert_close(grad_of(reg, log_prob), grad_of(ppo, log_prob))


def test_positive_tokens_untouched_while_pos_frac_zero():
    log_prob, old, adv, mask, proxy, _ = random_batch(seed=2)
    adv = adv.abs()  # every token positive
    reg, m = loss_of("lp_reg", log_prob, old, adv, mask, proxy_log_prob=proxy, lp_reg_neg_frac=0.5)
    ppo, _ = loss_of("ppo_clip", log_prob, old, adv, mask)
    torch.testing.assert_close(reg, ppo)
    torch.testing.assert_close(grad_of(reg, log_prob), grad_of(ppo, log_prob))
    assert m["lp_reg/selected_frac"].item() == 0.0


def test_positive_side_when_enabled():
    _, m, _ = lp_reg_hand(lp_reg_pos_frac=1.0)
    # Positive side: only one A > 0 token -> k = 1 < 2 -> still off (the reference needs k >= 2).
    assert m["lp_reg/regularized_frac"].item() == pytest.approx(1 / 5)
    log_prob = leaf([-2.5, -2.0, -0.1])
    adv, proxy = t([1.0, 1.0, 1.0]), t([-1.0, -math.inf, -1.0])
    kw = {"proxy_log_prob": proxy, "lp_reg_neg_frac": 0.0, "lp_reg_pos_frac": 0.7}
    loss, m = loss_of("lp_reg", log_prob, log_prob.detach(), adv, torch.ones(1, 3), **kw)
    # k = floor(0.7 * 3) = 2: tokens 0 and 1; token 1 is filtered. Token 0: -1 + (e^1.5 - 1.5 - 1).
    assert loss.item() == pytest.approx((-1 + math.exp(1.5) - 2.5 - 1 - 1) / 3)
    assert m["lp_reg/regularized_frac"].item() == pytest.approx(1 / 3)
    # Far below the proxy the KL saturates at its clamp (10) and stops pushing.
    log_prob = leaf([-5.0, -2.0, -0.1])
    loss, m = loss_of("lp_reg", log_prob, log_prob.detach(), adv, torch.ones(1, 3), **kw)
    assert loss.item() == pytest.approx((-1 + 10 - 1 - 1) / 3)
    assert m["lp_reg/proxy_kl"].item() == 10.0
    torch.testing.assert_close(grad_of(loss, log_prob), t([-1 / 3, -1 / 3, -1 / 3]))


def test_selection_needs_at_least_two_tokens():
    # The reference's rule: exactly k tokens, ties at the k-th broken by position.
    scope = {"lp_reg_threshold_scope": "micro_batch"}
    log_prob = leaf([-5.0] + [-0.1] * 149)  # N_neg = 150, rho = 0.01 -> k = 1 -> off
    adv = t([-1.0] * 150)
    _, m = loss_of("lp_reg", log_prob, log_prob.detach(), adv, torch.ones(1, 150),
                       proxy_log_prob=torch.zeros(1, 150, dtype=F64), **scope)
    assert m["lp_reg/selected_frac"].item() == 0.0
    log_prob = leaf([-5.0] + [-0.1] * 199)  # N_neg = 200 -> k = 2
    _, m = loss_of("lp_reg", log_prob, log_prob.detach(), t([-1.0] * 200), torch.ones(1, 200),
                       proxy_log_prob=torch.zeros(1, 200, dtype=F64), **scope)
    assert m["lp_reg/selected_frac"].item() == pytest.approx(2 / 200)
    assert m["lp_reg/regularized_frac"].item() == pytest.approx(2 / 200)
    assert m["lp_reg/regularized_tokens"].item() == 2


def test_regularised_tokens_are_unclipped():
    # Off-policy: r = 0.5 for A < 0. PPO clips it to 0.8 (loss 0.8, no gradient); Lp-Reg's
    # regularised token keeps -A r = 0.5 with gradient 0.5, plus the KL.
    log_prob = leaf([-3.0, -2.5, -0.1, -0.2])
    old = log_prob.detach() - math.log(0.5)
    proxy = t([-2.0, -2.0, 0.0, 0.0])
    adv = t([-1.0] * 4)
    loss, m = loss_of("lp_reg", log_prob, old, adv, torch.ones(1, 4), proxy_log_prob=proxy,
                          lp_reg_neg_frac=0.5, clip_ratio_low=0.2, clip_ratio_high=0.28)
    k3 = [math.exp(1.0) - 2.0, math.exp(0.5) - 1.5]  # proxy - lp = 1 and 0.5
    assert loss.item() == pytest.approx((0.5 + k3[0] + 0.5 + k3[1] + 0.8 + 0.8) / 4)
    g = grad_of(loss, log_prob)
    torch.testing.assert_close(
        g, t([(0.5 + 1 - math.exp(1.0)) / 4, (0.5 + 1 - math.exp(0.5)) / 4, 0.0, 0.0])
    )
    assert m["actor/pg_clipfrac"].item() == 1.0  # reported before Lp-Reg replaces the loss


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_rho_zero_equals_ppo_clip_exactly(mode):
    log_prob, old, adv, mask, proxy, _ = random_batch(seed=3)
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": mode}
    reg, m_reg = loss_of(
        "lp_reg", log_prob, old, adv, mask, proxy_log_prob=proxy, lp_reg_neg_frac=0.0, **kw
    )
    ppo, m_ppo = loss_of("ppo_clip", log_prob, old, adv, mask, proxy_log_prob=proxy, **kw)
    assert torch.equal(reg, ppo)
    assert torch.equal(grad_of(reg, log_prob), grad_of(ppo, log_prob))
    for key, value in m_ppo.items():
        assert torch.equal(m_reg[key], value)


def test_lp_reg_matches_a_direct_per_token_reference():
    """Random batch, loop-by-loop restatement of DESIGN's steps 2 and 3 (the reference's
    per-micro-batch selection by the current log-prob)."""
    log_prob, old, adv, mask, proxy, _ = random_batch(seed=4, batch=8, length=50)
    rho, beta, lo, hi = 0.1, 0.7, 0.2, 0.28
    loss, m = loss_of("lp_reg", log_prob, old, adv, mask, proxy_log_prob=proxy,
                          lp_reg_neg_frac=rho, lp_reg_coef=beta, clip_ratio_low=lo, clip_ratio_high=hi,
                          lp_reg_threshold_scope="micro_batch")
    lp = log_prob.detach()
    neg = [(lp[i, j].item(), i, j) for i in range(8) for j in range(50) if mask[i, j] and adv[i, j] < 0]
    k = int(len(neg) * rho)
    assert k >= 2
    chosen = {(i, j) for _, i, j in sorted(neg)[:k]}
    total, reg = 0.0, 0
    for i in range(8):
        for j in range(50):
            if not mask[i, j]:
                continue
            a, r = adv[i, j].item(), math.exp(lp[i, j].item() - old[i, j].item())
            q = proxy[i, j].item()
            if (i, j) in chosen and lp[i, j].item() < q:
                reg += 1
                total += -a * r + beta * min(math.exp(q - lp[i, j].item()) - (q - lp[i, j].item()) - 1, 10.0)
            else:
                total += max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    assert reg > 0
    assert loss.item() == pytest.approx(total / mask.sum().item(), rel=1e-12)
    assert m["lp_reg/regularized_frac"].item() == pytest.approx(reg / mask.sum().item())


def test_lp_reg_needs_proxy():
    log_prob, old, adv, mask, _, _ = random_batch()
    with pytest.raises(ValueError, match="proxy"):
        loss_of("lp_reg", log_prob, old, adv, mask)


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_padding_changes_nothing(name, mode):
    log_prob, old, adv, mask, proxy, entropy = random_batch(seed=5, batch=5, length=30)
    kw = {"loss_agg_mode": mode, "loss_scale_factor": 30, "lp_reg_neg_frac": 0.2, "kl_cov_ratio": 0.05,
          "clip_cov_ratio": 0.0, "entropy_coef": 0.01, "clip_ratio_low": 0.1, "clip_ratio_high": 0.1}
    base, m_base = loss_of(name, log_prob, old, adv, mask, proxy_log_prob=proxy, entropy=entropy, **kw)
    g_base, ge_base = torch.autograd.grad(base, (log_prob, entropy))

    pad = 7  # extra columns of garbage, masked out
    junk = torch.full((5, pad), math.nan, dtype=F64)
    log_prob_p = torch.cat([log_prob.detach(), torch.full((5, pad), -1e9, dtype=F64)], 1).requires_grad_()
    entropy_p = torch.cat([entropy.detach(), torch.full((5, pad), 1e9, dtype=F64)], 1).requires_grad_()
    padded, m_pad = loss_of(
        name, log_prob_p, torch.cat([old, junk], 1), torch.cat([adv, junk], 1),
        torch.cat([mask, torch.zeros(5, pad, dtype=F64)], 1),
        proxy_log_prob=torch.cat([proxy, torch.zeros(5, pad, dtype=F64)], 1), entropy=entropy_p, **kw,
    )
    g_pad, ge_pad = torch.autograd.grad(padded, (log_prob_p, entropy_p))
    torch.testing.assert_close(padded, base)
    torch.testing.assert_close(g_pad[:, :30], g_base)
    torch.testing.assert_close(ge_pad[:, :30], ge_base)
    assert torch.equal(g_pad[:, 30:], torch.zeros(5, pad, dtype=F64))
    for key, value in m_base.items():
        torch.testing.assert_close(m_pad[key], value)


# ----------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_hand_case():
    # Seq 0: log r = log 1.1, log 1.3 -> s = sqrt(1.43) in [0.8, 1.28], A = 1.
    # Seq 1: one valid token, r = 0.5, A = -1 -> clipped to 0.8 (no gradient).
    log_prob = leaf([0.0, 0.0], [0.0, 0.0])
    old = t([-math.log(1.1), -math.log(1.3)], [-math.log(0.5), 123.0])
    adv = t([1.0, 1.0], [-1.0, -1.0])
    mask = t([1.0, 1.0], [1.0, 0.0])
    s = math.sqrt(1.1 * 1.3)
    for mode in ("token-mean", "seq-mean-token-mean"):  # GSPO always aggregates per sequence
        loss, m = loss_of("gspo", log_prob, old, adv, mask, loss_agg_mode=mode)
        assert loss.item() == pytest.approx((-s + 0.8) / 2)
        torch.testing.assert_close(grad_of(loss, log_prob), t([-s / 4, -s / 4], [0.0, 0.0]))
        assert m["actor/pg_clipfrac"].item() == pytest.approx(1 / 3)


def test_gspo_on_policy_gradient_is_sequence_mean_policy_gradient():
    log_prob, _, adv, mask, _, _ = random_batch(seed=6, off_policy=False)
    loss, _ = loss_of("gspo", log_prob, log_prob.detach(), adv, mask)
    lengths = mask.sum(-1, keepdim=True)
    expected = -adv * mask / lengths / mask.shape[0]
    torch.testing.assert_close(grad_of(loss, log_prob), expected)


# ----------------------------------------------------------------------------- KL-Cov


def test_kl_cov_hand_case():
    # mean A = 0, mean lp = -1.825; cov = A (lp + 1.825) = [1.725, -1.175, -1.625, 2.175].
    log_prob = leaf([-0.1, -3.0, -0.2, -4.0])
    old = log_prob.detach() - t([0.5, 0.0, 0.0, 0.3])
    adv = t([1.0, 1.0, -1.0, -1.0])
    loss, m = loss_of("kl_cov", log_prob, old, adv, torch.ones(1, 4), kl_cov_ratio=0.25, kl_cov_coef=2.0)
    r0, r3 = math.exp(0.5), math.exp(0.3)
    # Unclipped surrogate everywhere (token 0 would be clipped at 1.28 by PPO); token 3 pays 2|log r|.
    assert loss.item() == pytest.approx((-r0 - 1 + 1 + r3 + 2 * 0.3) / 4)
    torch.testing.assert_close(grad_of(loss, log_prob), t([-r0 / 4, -1 / 4, 1 / 4, (r3 + 2) / 4]))
    assert m["kl_cov/penalised_frac"].item() == pytest.approx(0.25)
    assert m["actor/pg_clipfrac"].item() == 0.0
    # Tiny ratio still penalises one token: k = max(1, floor(ratio * N)).
    _, m = loss_of("kl_cov", log_prob, old, adv, torch.ones(1, 4), kl_cov_ratio=1e-6)
    assert m["kl_cov/penalised_frac"].item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------- Clip-Cov


def test_clip_cov_hand_case():
    # mean A = 0, mean lp = -1.5; cov = [2, 3, 0.05, 0]. Tokens 0 and 1 fall in (1, 5), but
    # token 1 (A = -2, r = e^-0.5 < 0.8) is already clipped, so only token 0 loses its gradient.
    log_prob = leaf([-0.5, -3.0, -1.0, -1.5])
    old = log_prob.detach() + t([0.0, 0.5, 0.0, 0.0])
    adv = t([2.0, -2.0, 0.1, -0.1])
    mask = torch.ones(1, 4)
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
    loss, m = loss_of("clip_cov", log_prob, old, adv, mask, clip_cov_ratio=0.5, **kw)
    ppo, _ = loss_of("ppo_clip", log_prob, old, adv, mask, **kw)
    assert loss.item() == pytest.approx(ppo.item() - (-2.0) / 4)
    g = grad_of(loss, log_prob)
    torch.testing.assert_close(g, grad_of(ppo, log_prob) * t([0.0, 1.0, 1.0, 1.0]))
    assert m["actor/pg_clipfrac"].item() == pytest.approx(0.25)


def test_clip_cov_random_choice_is_bounded_and_seeded():
    log_prob, old, adv, mask, _, _ = random_batch(seed=7, batch=8, length=50)
    adv = adv * 20  # make covariances reach (1, 5)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        _, m = loss_of("clip_cov", log_prob, old, adv, mask, clip_cov_ratio=0.01, generator=gen)
        runs.append(m["actor/pg_clipfrac"].item())
    n = mask.sum().item()
    assert runs[0] == runs[1]
    assert 0 < round(runs[0] * n) <= max(int(0.01 * n), 1)


# ----------------------------------------------------------------------------- 80/20


def test_entropy_8020_trains_only_top_entropy_tokens():
    log_prob = leaf([-1.0, -2.0, -0.5, -0.3, -0.7])
    adv = t([1.0, -1.0, 1.0, -1.0, 2.0])
    entropy = t([0.1, 0.9, 0.5, 0.3, 0.7])
    kw = {"entropy": entropy, "entropy_top_frac": 0.4}  # k = 2: tokens 1 and 4
    loss, m = loss_of("entropy_8020", log_prob, log_prob.detach(), adv, torch.ones(1, 5), **kw)
    assert loss.item() == pytest.approx((1.0 - 2.0) / 2)
    torch.testing.assert_close(grad_of(loss, log_prob), t([0.0, 0.5, 0.0, 0.0, -1.0]))
    assert m["entropy_8020/trained_frac"].item() == pytest.approx(0.4)
    loss, _ = loss_of("entropy_8020", log_prob, log_prob.detach(), adv, torch.ones(1, 5),
                          global_num_tokens=10, **kw)
    assert loss.item() == pytest.approx((1.0 - 2.0) / (0.4 * 10))
    with pytest.raises(ValueError, match="entropy"):
        loss_of("entropy_8020", log_prob, log_prob.detach(), adv, torch.ones(1, 5))


# ----------------------------------------------------------------------------- entropy bonus


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_entropy_bonus_combines_with_every_loss(name):
    log_prob, old, adv, mask, proxy, entropy = random_batch(seed=8)
    kw = {"proxy_log_prob": proxy, "entropy": entropy, "lp_reg_neg_frac": 0.2, "clip_cov_ratio": 0.0}
    plain, _ = loss_of(name, log_prob, old, adv, mask, **kw)
    bonus, m = loss_of(name, log_prob, old, adv, mask, entropy_coef=0.05, **kw)
    mean_entropy = (entropy * mask).sum() / mask.sum()
    torch.testing.assert_close(bonus, plain - 0.05 * mean_entropy)
    torch.testing.assert_close(grad_of(bonus, entropy), -0.05 * mask / mask.sum())
    assert m["actor/pg_loss"].item() == pytest.approx(plain.item())


def test_unknown_loss_rejected():
    log_prob, old, adv, mask, _, _ = random_batch()
    with pytest.raises(ValueError, match="unknown policy loss"):
        loss_of("ppo", log_prob, old, adv, mask)


def test_float32_inputs_and_bool_mask():
    log_prob, old, adv, mask, proxy, _ = random_batch(seed=9)
    ref, _ = loss_of("lp_reg", log_prob, old, adv, mask, proxy_log_prob=proxy, lp_reg_neg_frac=0.2)
    lp32 = log_prob.detach().float().requires_grad_()
    out, m = loss_of("lp_reg", lp32, old.float(), adv.float(), mask.bool(),
                         proxy_log_prob=proxy.float(), lp_reg_neg_frac=0.2)
    assert out.dtype == torch.float32
    assert m["lp_reg/regularized_frac"].item() > 0
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_strided_inputs(name):
    """Column-major (transposed) tensors, as a caller's slicing may produce, give the same loss."""
    log_prob, old, adv, mask, proxy, entropy = random_batch(seed=10)
    kw = {"lp_reg_neg_frac": 0.2, "kl_cov_ratio": 0.05, "clip_cov_ratio": 0.0}
    ref, _ = loss_of(name, log_prob, old, adv, mask, proxy_log_prob=proxy, entropy=entropy, **kw)

    def col_major(x):
        return x.detach().t().contiguous().t()

    out, _ = loss_of(
        name, col_major(log_prob), col_major(old), col_major(adv), col_major(mask),
        proxy_log_prob=col_major(proxy), entropy=col_major(entropy), **kw,
    )
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- registry


def test_registry_maps_every_name_to_a_loss_of_inputs_and_config():
    assert tuple(POLICY_LOSSES) == ("ppo_clip", "lp_reg", "gspo", "kl_cov", "clip_cov", "entropy_8020")
    log_prob, old, adv, mask, proxy, entropy = random_batch(seed=11)
    inputs = LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy, entropy=entropy)
    for name, loss_fn in POLICY_LOSSES.items():
        terms = loss_fn(inputs, AlgorithmConfig(clip_cov_ratio=0.0))
        assert terms.pg_losses.shape == log_prob.shape, name
        assert "actor/pg_clipfrac" in terms.metrics, name


def test_hyper_parameters_come_from_the_config_section():
    log_prob, old, adv, mask, _, _ = random_batch(seed=12)
    inputs = LossInputs(log_prob, old, adv, mask)
    narrow, _ = policy_loss("ppo_clip", inputs, AlgorithmConfig(clip_ratio_low=0.01, clip_ratio_high=0.01))
    wide, _ = policy_loss("ppo_clip", inputs, AlgorithmConfig(clip_ratio_low=0.9, clip_ratio_high=9.0))
    assert narrow.item() != pytest.approx(wide.item())
