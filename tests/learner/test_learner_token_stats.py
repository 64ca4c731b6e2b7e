"""token_stats and the min-p proxy against naive full-vocabulary references."""

import math

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner import LossInputs, min_p_proxy_log_prob, policy_loss, token_stats

F64 = torch.float64


def naive_proxy(logits, ids, kappa, temperature=1.0):
    probs = torch.softmax(logits, -1)
    keep = probs >= kappa * probs.amax(-1, keepdim=True)
    filtered = torch.where(keep, logits, torch.tensor(-math.inf, dtype=logits.dtype))
    return torch.log_softmax(filtered / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)


def naive_stats(logits, ids, temperature):
    log_probs = torch.log_softmax(logits / temperature, -1)
    log_prob = log_probs.gather(-1, ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_prob, entropy


def make(seed=0, shape=(3, 7), vocab=50, scale=3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, vocab, generator=g, dtype=F64)).to(dtype)
    ids = torch.randint(0, vocab, shape, generator=g)
    # Make sure some sampled tokens are the argmax (always kept) and some are rare (filtered).
    ids.view(-1)[::3] = logits.view(-1, vocab)[::3].argmax(-1)
    ids.view(-1)[1::3] = logits.view(-1, vocab)[1::3].argmin(-1)
    return logits, ids


# ----------------------------------------------------------------------------- proxy


@pytest.mark.parametrize("kappa", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.5])
def test_min_p_proxy_matches_naive(kappa, temperature):
    logits, ids = make(seed=1)
    got = min_p_proxy_log_prob(logits, ids, kappa, temperature)
    ref = naive_proxy(logits, ids, kappa, temperature)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-12)
    if kappa == 0.0:
        assert finite.all()
    if kappa == 0.3:
        assert (~finite).any() and finite.any()


def test_min_p_proxy_filtered_means_minus_inf_and_argmax_kept():
    logits = torch.tensor([[4.0, 0.0, 3.0, -2.0]], dtype=F64)
    # p / p_max = 1, e^-4, e^-1, e^-6; kappa = 0.1 keeps tokens 0 and 2.
    ids = torch.tensor([[0]]).expand(1, 1)
    out = [min_p_proxy_log_prob(logits[:, None], torch.tensor([[i]]), 0.1).item() for i in range(4)]
    z = math.log(math.exp(4.0) + math.exp(3.0))
    assert out[0] == pytest.approx(4.0 - z)
    assert out[2] == pytest.approx(3.0 - z)
    assert out[1] == -math.inf and out[3] == -math.inf
    assert ids.shape == (1, 1)


def test_min_p_proxy_shapes_chunks_and_dtypes():
    logits, ids = make(seed=2, shape=(2, 3, 5), vocab=40)
    ref = min_p_proxy_log_prob(logits, ids, 0.05)
    assert ref.shape == ids.shape and ref.dtype == F64
    for chunk in (1, 4, 1000):
        torch.testing.assert_close(min_p_proxy_log_prob(logits, ids, 0.05, chunk_size=chunk), ref)
    flat = min_p_proxy_log_prob(logits.reshape(-1, 40), ids.reshape(-1), 0.05)
    torch.testing.assert_close(flat, ref.reshape(-1))
    low = min_p_proxy_log_prob(logits.to(torch.bfloat16), ids, 0.05)
    assert low.dtype == torch.float32
    with pytest.raises(ValueError):
        min_p_proxy_log_prob(logits, ids, 1.5)


# ----------------------------------------------------------------------------- token_stats


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("proxy_temperature", [1.0, 1.3])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_token_stats_values_and_gradients_match_naive(temperature, proxy_temperature, chunk_size):
    logits, ids = make(seed=3)
    logits.requires_grad_()
    stats = token_stats(logits, ids, temperature=temperature, proxy_min_p=0.05,
                        proxy_temperature=proxy_temperature, chunk_size=chunk_size)
    log_prob, entropy = naive_stats(logits, ids, temperature)
    torch.testing.assert_close(stats.log_prob, log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.entropy, entropy, rtol=0, atol=1e-12)
    ref_proxy = naive_proxy(logits.detach(), ids, 0.05, proxy_temperature)
    assert torch.equal(torch.isinf(stats.proxy_log_prob), torch.isinf(ref_proxy))
    finite = torch.isfinite(ref_proxy)
    torch.testing.assert_close(stats.proxy_log_prob[finite], ref_proxy[finite], rtol=0, atol=1e-12)
    assert not stats.proxy_log_prob.requires_grad

    g = torch.Generator().manual_seed(4)
    w_lp, w_h = torch.randn(ids.shape, generator=g, dtype=F64), torch.randn(ids.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((stats.log_prob * w_lp + stats.entropy * w_h).sum(), logits)[0]
    want = torch.autograd.grad((log_prob * w_lp + entropy * w_h).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_token_stats_gradcheck():
    logits, ids = make(seed=5, shape=(2, 3), vocab=6, scale=1.0)
    logits.requires_grad_()

    def fn(x):
        s = token_stats(x, ids, temperature=0.8, chunk_size=2)
        return s.log_prob, s.entropy

    assert torch.autograd.gradcheck(fn, (logits,))


def test_chunked_equals_unchunked_on_a_strided_view():
    """The model's response logits are usually a slice: no copy, same answers."""
    logits, _ = make(seed=6, shape=(3, 9), vocab=30)
    logits.requires_grad_()
    view = logits[:, 2:7]
    assert not view.is_contiguous()
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(0))
    outs = []
    for chunk in (1, 2, 100):
        s = token_stats(view, ids, proxy_min_p=0.1, chunk_size=chunk)
        g = torch.autograd.grad((s.log_prob + 0.5 * s.entropy).sum(), logits)[0]
        outs.append((s.log_prob, s.entropy, s.proxy_log_prob, g))
    for out in outs[1:]:
        for a, b in zip(out, outs[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(outs[0][3][:, :2], torch.zeros(3, 2, 30, dtype=F64))


def test_entropy_used_only_as_metric_adds_no_gradient():
    logits, ids = make(seed=7)
    logits.requires_grad_()
    with_entropy = token_stats(logits, ids, compute_entropy=True)
    without = token_stats(logits, ids, compute_entropy=False)
    assert without.entropy is None and without.proxy_log_prob is None
    g1 = torch.autograd.grad(with_entropy.log_prob.sum(), logits)[0]
    g2 = torch.autograd.grad(without.log_prob.sum(), logits)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_no_grad_path_and_low_precision():
    logits, ids = make(seed=8, dtype=torch.float32)
    with torch.no_grad():
        s = token_stats(logits, ids, proxy_min_p=0.02)
    assert not s.log_prob.requires_grad
    ref_lp, ref_h = naive_stats(logits.double(), ids, 1.0)
    torch.testing.assert_close(s.log_prob.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.entropy.double(), ref_h, rtol=0, atol=1e-5)

    bf16 = logits.to(torch.bfloat16).requires_grad_()
    for temperature in (1.0, 0.7):
        s = token_stats(bf16, ids, temperature=temperature, proxy_min_p=0.05)
        assert s.log_prob.dtype == torch.float32
        # Same as computing in float32 from the bf16 values.
        exact = bf16.detach().float().requires_grad_()
        ref_lp, ref_h = naive_stats(exact, ids, temperature)
        torch.testing.assert_close(s.log_prob, ref_lp, rtol=0, atol=1e-5)
        torch.testing.assert_close(s.entropy, ref_h, rtol=0, atol=1e-5)
        ref_proxy = naive_proxy(exact.detach(), ids, 0.05)
        finite = torch.isfinite(ref_proxy)
        assert torch.equal(torch.isfinite(s.proxy_log_prob), finite)
        torch.testing.assert_close(s.proxy_log_prob[finite], ref_proxy[finite], rtol=0, atol=1e-5)
        (g,) = torch.autograd.grad((s.log_prob + s.entropy).sum(), bf16)
        (g_ref,) = torch.autograd.grad((ref_lp + ref_h).sum(), exact)
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), g_ref.to(torch.bfloat16).float())


def test_masked_positions_may_hold_negative_ids():
    logits, ids = make(seed=9)
    ids[:, -2:] = -100
    s = token_stats(logits, ids, proxy_min_p=0.02)
    assert torch.isfinite(s.log_prob).all()


def test_on_policy_fast_path_end_to_end():
    """token_stats -> lp_reg with old = log_prob.detach(): gradient equals the naive pipeline's."""
    logits, _ = make(seed=10, shape=(4, 25), vocab=20, scale=1.5)
    # Sampled from the policy itself, as on-policy tokens are.
    probs = torch.softmax(logits.view(-1, 20), -1)
    ids = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).view(4, 25)
    logits.requires_grad_()
    mask = torch.ones(4, 25, dtype=F64)
    mask[1, 20:] = 0
    adv = torch.tensor([[1.0], [-1.0], [-0.5], [0.3]], dtype=F64).expand(4, 25)
    algo = AlgorithmConfig(lp_reg_neg_frac=0.3, entropy_coef=0.01)

    s = token_stats(logits, ids, proxy_min_p=0.1)
    loss, m = policy_loss("lp_reg", LossInputs(s.log_prob, s.log_prob.detach(), adv, mask,
                                               proxy_log_prob=s.proxy_log_prob, entropy=s.entropy), algo)
    g = torch.autograd.grad(loss, logits)[0]

    log_prob, entropy = naive_stats(logits, ids, 1.0)
    proxy = naive_proxy(logits.detach(), ids, 0.1)
    ref, m_ref = policy_loss("lp_reg", LossInputs(log_prob, log_prob.detach(), adv, mask,
                                                  proxy_log_prob=proxy, entropy=entropy), algo)
    g_ref = torch.autograd.grad(ref, logits)[0]
    assert m["lp_reg/regularized_frac"].item() > 0
    assert m["lp_reg/regularized_frac"].item() < m["lp_reg/selected_frac"].item()  # some filtered
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    for key in m_ref:
        torch.testing.assert_close(m[key], m_ref[key])
