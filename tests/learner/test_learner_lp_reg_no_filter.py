"""Lp-Reg without the min-p filter (algorithm.lp_reg_filter=none): the proxy is pi_old itself.

By hand in the loss; then through a learner step, where on-policy it is GRPO exactly and
off-policy it pulls tokens the policy has pushed below pi_old back towards it, on the
learner's and on the behaviour policy's path alike.
"""

import copy
import math

import pytest
import torch

from conf.load import ConfigError, load_config
from conf.schema import AlgorithmConfig
from learner import LossInputs, policy_loss
from learner.batch import build_train_batch, shard_for_learners
from learner.losses import lp_reg_ratio_metrics
from learner.proxy import min_p_proxy_log_prob, top_k_proxy_log_prob
from learner.step import proxy_min_p, train_on_shard
from learner.token_stats import token_stats

F64 = torch.float64
# pi_theta has moved below pi_old on tokens 0 and 1, the two lowest pi_old log-probs of the
# four negative tokens (rho = 0.5: k = 2).
LP = [-3.0, -2.0, -0.5, -0.1, -5.0]
OLD = [-1.0, -1.5, -0.5, -0.1, -5.0]
ADV = [-1.0, -1.0, -1.0, -1.0, 1.0]


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def k3(proxy, lp):
    return math.exp(proxy - lp) - (proxy - lp) - 1


def unfiltered(lp=LP, old=OLD, proxy=OLD, **algo):
    log_prob = t(lp).requires_grad_()
    inputs = LossInputs(log_prob, t(old), t(ADV), torch.ones(1, len(lp)), proxy_log_prob=t(proxy))
    return policy_loss("lp_reg", inputs, AlgorithmConfig(lp_reg_filter="none", lp_reg_neg_frac=0.5, **algo))


def test_every_selected_token_below_the_proxy_is_regularised_with_nothing_filtered():
    loss, m = unfiltered()
    assert m["lp_reg/selected_tokens"].item() == 2
    assert m["lp_reg/selected_kept_tokens"].item() == 2
    assert m["lp_reg/regularized_tokens"].item() == 2
    assert m["lp_reg/filtered_frac"].item() == 0.0
    means = lp_reg_ratio_metrics({k: float(v) for k, v in m.items()})
    assert means == {"lp_reg/selected_kept_frac": 1.0, "lp_reg/filtered_mass": 0.0,
                     "lp_reg/protection_ratio": 0.0}
    kl = [k3(OLD[0], LP[0]), k3(OLD[1], LP[1])]
    assert min(kl) > 0
    assert m["lp_reg/proxy_kl"].item() == pytest.approx(sum(kl) / 2)
    # Regularised: -A r unclipped + beta KL; the rest PPO-clip at r = 1.
    ratio = [math.exp(lp - old) for lp, old in zip(LP, OLD, strict=True)]
    expected = ratio[0] + kl[0] + ratio[1] + kl[1] + 1.0 + 1.0 - 1.0
    assert loss.item() == pytest.approx(expected / 5)


def test_a_selected_token_above_the_proxy_is_not_regularised():
    # As the reference does, with or without the filter: the KL only pulls tokens up.
    _, m = unfiltered(lp=[-3.0, -1.0, -0.5, -0.1, -5.0])
    assert m["lp_reg/selected_tokens"].item() == 2
    assert m["lp_reg/regularized_tokens"].item() == 1


def test_z_is_one_whatever_the_proxys_temperature():
    # A proxy at a temperature of its own is not pi_old's log-prob; nothing is filtered still.
    _, m = unfiltered(proxy=[-0.8, -1.2, -0.4, -0.1, -6.0])
    assert m["lp_reg/regularized_tokens"].item() == 2
    assert m["lp_reg/filtered_mass_sum"].item() == 0.0
    assert m["lp_reg/protection_ratio_sum"].item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_kappa_zero_keeps_every_token(temperature):
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = (logits / temperature).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    proxy = min_p_proxy_log_prob(logits, ids, kappa=0.0, temperature=temperature)
    torch.testing.assert_close(proxy, expected, rtol=0, atol=1e-12)
    stats = token_stats(logits, ids, temperature=1.0, proxy_min_p=0.0, proxy_temperature=temperature)
    torch.testing.assert_close(stats.proxy_log_prob, expected, rtol=0, atol=1e-12)


def test_the_top_k_proxy_without_filter_is_the_sampled_log_prob():
    top = torch.tensor([[-0.1, -2.5]], dtype=F64)
    ids = torch.tensor([[4, 7]])
    sampled = torch.tensor([-6.0], dtype=F64)  # token 9, not listed
    proxy, inexact = top_k_proxy_log_prob(top, ids, torch.tensor([9]), 0.0, 1.0, 1.0,
                                          sampled_log_probs=sampled)
    assert proxy.tolist() == [-6.0] and inexact.tolist() == [False]
    # Its normaliser needs the whole vocabulary at any other temperature.
    with pytest.raises(ValueError, match="unfiltered"):
        top_k_proxy_log_prob(top, ids, torch.tensor([9]), 0.0, 0.5, 1.0, sampled_log_probs=sampled)
    with pytest.raises(ValueError, match="unfiltered"):
        top_k_proxy_log_prob(top, ids, torch.tensor([9]), 0.0)


def test_no_proxy_pass_where_the_proxy_is_pi_old():
    assert proxy_min_p(AlgorithmConfig(lp_reg_filter="none"), temperature=1.0) is None
    assert proxy_min_p(AlgorithmConfig(lp_reg_filter="none", lp_reg_temperature=0.5), temperature=1.0) == 0.0
    assert proxy_min_p(AlgorithmConfig(), temperature=1.0) == 0.02
    assert proxy_min_p(AlgorithmConfig(loss="ppo_clip"), temperature=1.0) is None


# ----------------------------------------------------------------------------- a learner step


def tiny_model(vocab=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(F64)


def samples_of(model, vocab=32, n=8):
    """Samples with the log-probs an engine that agrees with ``model`` exactly reports."""
    from rollout.types import Sample

    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        ids = prompt.tolist()
        with torch.no_grad():
            for _ in range(int(torch.randint(2, 7, (1,), generator=gen))):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            log_probs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        response = ids[len(prompt):]
        logprobs = [float(log_probs[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response)]
        samples.append(Sample(prompt_index=i // 4, prompt_token_ids=prompt.tolist(),
                              response_token_ids=response, response_logprobs=logprobs, finish_reason="stop",
                              weight_version=0, worker_index=0))
    return samples


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, -0.3, -1.5])


def step(model, algo, samples, *, lr=0.0):
    """One learner step; with ``lr`` an SGD step after every mini-batch, so that later
    mini-batches train a policy that has moved away from pi_old."""
    batch = build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64, algo=algo)
    (shard,) = shard_for_learners(batch, algo.mini_batches_per_step, 1, micro_batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []

    def backward(loss, boundary):
        losses.append(loss.detach())
        loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad()
        return {}

    metrics = train_on_shard(model, shard, algo, temperature=1.0, world_size=1, backward=backward,
                             optimizer_step=optimizer_step)
    return torch.stack(losses), metrics


def test_on_policy_it_is_grpo_exactly():
    model = tiny_model()
    samples = samples_of(model)
    grpo = AlgorithmConfig(loss="ppo_clip")
    no_filter = AlgorithmConfig(loss="lp_reg", lp_reg_filter="none", lp_reg_neg_frac=1.0)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    loss_a, _ = step(a, grpo, samples, lr=0.5)
    loss_b, metrics = step(b, no_filter, samples, lr=0.5)
    assert metrics["lp_reg/selected_tokens"] > 0
    assert metrics["lp_reg/regularized_tokens"] == 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("stale_policy", ["learner", "behaviour"])
def test_off_policy_it_pulls_tokens_back_towards_pi_old(stale_policy, monkeypatch):
    import learner.step as learner_step

    proxies = []
    fill = learner_step.fill_old_log_probs

    def spy(model, micro, *args, **kwargs):
        fill(model, micro, *args, **kwargs)
        proxies.append(micro.proxy_log_probs)

    monkeypatch.setattr(learner_step, "fill_old_log_probs", spy)
    model = tiny_model()
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_filter="none", lp_reg_neg_frac=1.0, mini_batches_per_step=2,
                           stale_policy=stale_policy)
    # The engine's log-probs are the model's, and no top-K list is needed.
    _, metrics = step(model, algo, samples_of(model), lr=0.5)
    assert metrics["lp_reg/regularized_tokens"] > 0
    assert metrics["lp_reg/proxy_kl"] > 0
    assert metrics["lp_reg/selected_kept_tokens"] == metrics["lp_reg/selected_tokens"]
    assert metrics["lp_reg/filtered_mass_sum"] == 0.0
    assert metrics["lp_reg/filtered_frac"] == 0.0
    # pi_old's own log-probs are the proxy: the no-grad pass computes none.
    assert proxies == ([None] * 4 if stale_policy == "learner" else [])


def test_the_behaviour_and_learner_paths_agree_on_the_same_weights():
    model = tiny_model()
    samples = samples_of(model)
    results = []
    for stale_policy in ("learner", "behaviour"):
        algo = AlgorithmConfig(loss="lp_reg", lp_reg_filter="none", lp_reg_neg_frac=1.0,
                               mini_batches_per_step=2, stale_policy=stale_policy)
        copied = copy.deepcopy(model)
        results.append((step(copied, algo, samples, lr=0.5), copied))
    ((loss_a, metrics_a), a), ((loss_b, metrics_b), b) = results
    # (The counts may differ by tokens that vLLM's log-probs put a rounding error above
    # the learner's, where the KL is as small.)
    assert metrics_a["lp_reg/regularized_tokens"] > 0 and metrics_b["lp_reg/regularized_tokens"] > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-10)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10, msg=name)


# ----------------------------------------------------------------------------- the config


def test_kappa_zero_is_refused_naming_the_filter_key():
    with pytest.raises(ConfigError, match="set algorithm.lp_reg_filter=none"):
        load_config(overrides=["algorithm.lp_reg_min_p=0"])


def test_the_unfiltered_behaviour_proxy_needs_no_top_k_but_the_sampling_temperature():
    from conf.validate import resolve_auto

    cfg = resolve_auto(load_config(overrides=["rollout.max_staleness=1", "algorithm.lp_reg_filter=none"]))
    assert (cfg.algorithm.stale_policy, cfg.rollout.top_logprobs) == ("behaviour", 0)
    load_config(overrides=["rollout.max_staleness=1", "algorithm.lp_reg_filter=none",
                           "rollout.top_logprobs=0"])
    with pytest.raises(ConfigError, match="'algorithm.lp_reg_filter' and 'algorithm.lp_reg_temperature'"):
        load_config(overrides=["rollout.max_staleness=1", "algorithm.lp_reg_filter=none",
                               "algorithm.lp_reg_temperature=0.5"])
    # The learner's policy computes it at any temperature.
    load_config(overrides=["rollout.max_staleness=1", "algorithm.lp_reg_filter=none",
                           "algorithm.lp_reg_temperature=0.5", "algorithm.stale_policy=learner"])
