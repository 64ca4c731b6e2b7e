"""The learner's top-p log-probs against vLLM's own sampler rule.

vLLM's CPU sampler masks the top-p set with ``apply_top_k_top_p`` (on the CPU build it runs
``apply_top_k_top_p_pytorch``) and, in ``logprobs_mode="processed_logprobs"``, reports
``log_softmax`` of the masked logits. Here that very function, imported from the installed
vLLM, masks the same logits the learner sees.

Tolerances. The kept sets must be equal, token for token. The log-probs are compared at
1e-6 (float64): the two sides sum the normaliser in different orders, which moves a float64
log-prob by ~1e-15, while one token more or less in the set moves it by ``log(1 + q)`` with
``q`` that token's share of the kept mass; the tests check that every ``q`` here is above
1e-5, so a set that differed by even one token would fail the comparison.
"""

import importlib
import math

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner import LossInputs, policy_loss, token_stats
from learner.batch import build_train_batch, shard_for_learners
from learner.step import response_token_stats, train_on_shard
from learner.token_stats import head_token_stats
from learner.top_p import top_p_cut, top_p_floor
from rollout.types import Sample

F64 = torch.float64
vllm_sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")


def vllm_processed(logits, temperature, top_p):
    """vLLM's sampler on these logits: temperature, top-p mask, processed log-probs."""
    x = logits.reshape(-1, logits.shape[-1]) / temperature
    p = torch.full((x.shape[0],), top_p, dtype=torch.float32)  # vLLM holds top_p in float32
    masked = vllm_sampler.apply_top_k_top_p(x.clone(), None, p)
    return masked.log_softmax(-1).view(logits.shape)


def sample(log_probs, seed):
    """Tokens drawn from a (processed) distribution, as vLLM draws them: all in its kept set."""
    probs = log_probs.exp().reshape(-1, log_probs.shape[-1])
    ids = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
    return ids.view(log_probs.shape[:-1])


def make(seed=0, shape=(4, 9), vocab=64, scale=2.5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, vocab, generator=g, dtype=F64)).to(dtype)


def naive(logits, ids, temperature, kept, kappa=None, proxy_temperature=1.0):
    """Log-prob, entropy and min-p proxy of the top-p distribution, by autograd-able torch ops."""
    minus_inf = torch.tensor(-math.inf, dtype=logits.dtype)
    log_probs = torch.log_softmax(torch.where(kept, logits / temperature, minus_inf), -1)
    log_prob = log_probs.gather(-1, ids[..., None]).squeeze(-1)
    p = log_probs.exp()
    entropy = -(p * torch.where(kept, log_probs, torch.zeros_like(log_probs))).sum(-1)
    proxy = None
    if kappa is not None:
        z = logits.detach()
        keep = kept & (torch.softmax(z, -1) >= kappa * torch.softmax(z, -1).amax(-1, keepdim=True))
        proxy = torch.log_softmax(torch.where(keep, z, minus_inf) / proxy_temperature, -1)
        proxy = proxy.gather(-1, ids[..., None]).squeeze(-1)
    return log_prob, entropy, proxy


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.3])
def test_kept_sets_and_log_probs_equal_vllms(top_p, temperature):
    logits = make(seed=1)
    vllm_log_probs = vllm_processed(logits, temperature, top_p)
    vllm_kept = torch.isfinite(vllm_log_probs)
    ids = sample(vllm_log_probs, seed=2)

    x = (logits / temperature).reshape(-1, logits.shape[-1])
    floor = top_p_floor(x, top_p_cut(top_p))
    assert torch.equal(x >= floor[:, None], vllm_kept.reshape(x.shape))
    assert (vllm_kept.sum(-1) < logits.shape[-1]).all()  # top-p really dropped tokens
    # Every kept token's share is large enough for a one-token difference to show (docstring).
    assert vllm_log_probs[vllm_kept].exp().min() > 1e-5

    stats = token_stats(logits, ids, temperature=temperature, top_p=top_p)
    want = vllm_log_probs.gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(stats.log_prob, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_float32_learner_matches_vllms_float32_sampler(top_p):
    """The engine's own precision: float32 logits, temperature, float32 top-p."""
    logits = make(seed=3, shape=(16, 8), vocab=500, dtype=torch.float32)
    vllm_log_probs = vllm_processed(logits, 0.8, top_p)
    ids = sample(vllm_log_probs.double(), seed=4)
    x = (logits / 0.8).reshape(-1, 500)
    floor = top_p_floor(x, top_p_cut(top_p))
    assert torch.equal(x >= floor[:, None], torch.isfinite(vllm_log_probs).reshape(x.shape))
    stats = token_stats(logits, ids, temperature=0.8, top_p=top_p)
    want = vllm_log_probs.gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(stats.log_prob, want, rtol=0, atol=2e-6)
    # Without the transform, the learner is off by the log of the kept mass on every token.
    plain = token_stats(logits, ids, temperature=0.8)
    assert (want - plain.log_prob).abs().min() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("proxy_temperature", [1.0, 1.4])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_entropy_proxy_and_gradients_are_of_the_top_p_distribution(temperature, proxy_temperature,
                                                                   chunk_size):
    top_p = 0.85
    logits = make(seed=5, shape=(3, 7), vocab=40)
    processed = vllm_processed(logits, temperature, top_p)
    kept = torch.isfinite(processed)
    ids = sample(processed, seed=6)
    # Every other position: the least likely kept token, which min-p may still filter.
    ids.view(-1)[::2] = processed.masked_fill(~kept, math.inf).view(-1, 40)[::2].argmin(-1)
    logits.requires_grad_()
    stats = token_stats(logits, ids, temperature=temperature, top_p=top_p, proxy_min_p=0.3,
                        proxy_temperature=proxy_temperature, chunk_size=chunk_size)
    log_prob, entropy, proxy = naive(logits, ids, temperature, kept, 0.3, proxy_temperature)
    torch.testing.assert_close(stats.log_prob, log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.entropy, entropy, rtol=0, atol=1e-12)
    assert torch.equal(torch.isinf(stats.proxy_log_prob), torch.isinf(proxy))
    finite = torch.isfinite(proxy)
    assert finite.any() and (~finite).any()
    torch.testing.assert_close(stats.proxy_log_prob[finite], proxy[finite], rtol=0, atol=1e-12)

    g = torch.Generator().manual_seed(7)
    w_lp, w_h = torch.randn(ids.shape, generator=g, dtype=F64), torch.randn(ids.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((stats.log_prob * w_lp + stats.entropy * w_h).sum(), logits)[0]
    want = torch.autograd.grad((log_prob * w_lp + entropy * w_h).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # The dropped tokens take no gradient: the kept set is chosen without one.
    assert torch.equal(got[~kept], torch.zeros_like(got[~kept]))


def test_top_p_gradcheck():
    logits = make(seed=8, shape=(2, 3), vocab=8, scale=1.5)
    ids = logits.argmax(-1)  # always kept
    logits.requires_grad_()

    def fn(x):
        s = token_stats(x, ids, temperature=0.8, top_p=0.7, chunk_size=2)
        return s.log_prob, s.entropy

    assert torch.autograd.gradcheck(fn, (logits,))


def test_a_token_outside_the_kept_set_is_scored_over_the_set_plus_itself():
    """Once the policy moved, a sampled token may fall outside its current set: finite, with
    gradient, never -inf or NaN in the loss."""
    logits = make(seed=9, shape=(2, 6), vocab=30)
    ids = logits.argmin(-1)  # the least likely token: outside any top-p < 1 set
    kept = torch.isfinite(vllm_processed(logits, 1.0, 0.8))
    assert not kept.gather(-1, ids[..., None]).any()
    logits.requires_grad_()
    stats = token_stats(logits, ids, top_p=0.8, proxy_min_p=0.02)
    with_token = kept.scatter(-1, ids[..., None], True)
    log_prob, entropy, _ = naive(logits, ids, 1.0, with_token)
    torch.testing.assert_close(stats.log_prob, log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.entropy, entropy, rtol=0, atol=1e-12)
    assert torch.isinf(stats.proxy_log_prob).all()  # min-p filters the least likely token

    old = stats.log_prob.detach() - 0.5  # moved policy
    adv = torch.tensor([[-1.0], [1.0]], dtype=F64).expand(2, 6)
    loss, metrics = policy_loss("lp_reg", LossInputs(stats.log_prob, old, adv, torch.ones(2, 6, dtype=F64),
                                                     proxy_log_prob=stats.proxy_log_prob,
                                                     entropy=stats.entropy),
                                AlgorithmConfig(lp_reg_neg_frac=0.5, entropy_coef=0.01))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_top_p_one_is_the_default_path_and_forms_no_set(monkeypatch):
    # The module, not the function of the same name that ``learner`` exports.
    module = importlib.import_module("learner.token_stats")

    logits = make(seed=10)
    ids = logits.argmax(-1)
    logits.requires_grad_()
    default = token_stats(logits, ids, temperature=0.9, proxy_min_p=0.05)
    (g_default,) = torch.autograd.grad((default.log_prob + default.entropy).sum(), logits)

    def refuse(*args, **kwargs):
        raise AssertionError("top_p=1 formed a top-p set")

    monkeypatch.setattr(module, "top_p_floor", refuse)
    monkeypatch.setattr(module, "top_p_keep", refuse)
    same = token_stats(logits, ids, temperature=0.9, proxy_min_p=0.05, top_p=1.0)
    (g_same,) = torch.autograd.grad((same.log_prob + same.entropy).sum(), logits)
    for a, b in ((default.log_prob, same.log_prob), (default.entropy, same.entropy),
                 (default.proxy_log_prob, same.proxy_log_prob), (g_default, g_same)):
        assert torch.equal(a, b)


def test_head_chunks_equal_the_full_logits_under_top_p():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(13, 16, generator=g, dtype=F64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).to(F64)
    torch.nn.init.normal_(head.weight, std=1.0, generator=g)
    ids = sample(vllm_processed(head(hidden).detach(), 0.7, 0.8), seed=12)
    kw = {"temperature": 0.7, "top_p": 0.8, "proxy_min_p": 0.05}
    full = token_stats(head(hidden), ids, **kw)
    outs = [full]
    for chunk in (1, 4, 100):
        outs.append(head_token_stats(hidden, head, ids, chunk_tokens=chunk, **kw))
    grads = [torch.autograd.grad((s.log_prob + 0.3 * s.entropy).sum(), [hidden, head.weight])
             for s in outs]
    for s, grad in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(s.log_prob, full.log_prob, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.entropy, full.entropy, rtol=0, atol=1e-12)
        assert torch.equal(torch.isinf(s.proxy_log_prob), torch.isinf(full.proxy_log_prob))
        for a, b in zip(grad, grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- a learner step


def tiny_model(vocab=48):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(F64)
    with torch.no_grad():  # a peakier distribution than the initialisation's, as trained models have
        model.lm_head.weight.mul_(5.0)
    return model


@torch.no_grad()
def vllm_rollouts(model, temperature, top_p, vocab=48, num=8, length=6):
    """Responses sampled token by token under vLLM's rule, with vLLM's processed log-probs."""
    gen = torch.Generator().manual_seed(13)
    samples = []
    for i in range(num):
        tokens = torch.randint(3, vocab, (3 + i % 3,), generator=gen).tolist()
        prompt_len, log_probs = len(tokens), []
        for _ in range(length):
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1]
            processed = vllm_processed(logits[None], temperature, top_p)[0]
            token = int(torch.multinomial(processed.exp(), 1, generator=gen))
            tokens.append(token)
            log_probs.append(float(processed[token]))
        samples.append(Sample(prompt_index=i // 4, prompt_token_ids=tokens[:prompt_len],
                              response_token_ids=tokens[prompt_len:], response_logprobs=log_probs,
                              finish_reason="length", weight_version=0, worker_index=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -1.5])
    return build_train_batch(samples, advantages, pad_token_id=0, dtype=F64)


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_learner_step_sees_vllms_log_probs_only_with_the_same_top_p(chunk):
    model = tiny_model()
    batch = vllm_rollouts(model, temperature=0.9, top_p=0.8)
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_neg_frac=0.3, rollout_correction="tis")
    results = {}
    for top_p in (0.8, 1.0):
        model.zero_grad()
        shard = shard_for_learners(batch, 1, 1, micro_batch_size=4)[0]
        results[top_p] = train_on_shard(model, shard, algo, temperature=0.9, top_p=top_p, world_size=1,
                                        backward=lambda loss, boundary: loss.backward(),
                                        optimizer_step=lambda: {}, logits_chunk_tokens=chunk)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert results[0.8]["rollout/logprob_max_abs_diff"] < 1e-6
    assert results[1.0]["rollout/logprob_max_abs_diff"] > 1e-2


def test_chunked_statistics_match_full_logits_under_top_p():
    model = tiny_model()
    micro = vllm_rollouts(model, temperature=0.9, top_p=0.8).pad()
    kw = {"temperature": 0.9, "top_p": 0.8, "proxy_min_p": 0.05, "proxy_temperature": 1.0,
          "compute_entropy": True}
    full = response_token_stats(model, micro, **kw)
    chunked = response_token_stats(model, micro, logits_chunk_tokens=4, **kw)
    mask = micro.response_mask.bool()
    torch.testing.assert_close(full.log_prob[mask], micro.rollout_log_probs[mask], rtol=0, atol=1e-6)
    for a, b in ((full.log_prob, chunked.log_prob), (full.entropy, chunked.entropy)):
        torch.testing.assert_close(b[mask], a[mask], rtol=0, atol=1e-12)
    assert torch.equal(torch.isinf(full.proxy_log_prob[mask]), torch.isinf(chunked.proxy_log_prob[mask]))
