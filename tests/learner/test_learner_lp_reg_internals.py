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


def test_watched_strings_share_of_the_regularised_tokens():
    # Token 0 alone is regularised; token 1 was selected, but filtered.
    log_prob = leaf(LP)
    watched = {"W": torch.tensor([[True, False, False, True, False]]),
               "#": torch.tensor([[False, True, False, False, True]])}
    _, m = policy_loss("lp_reg", LossInputs(log_prob, log_prob.detach(), t(ADV), torch.ones(1, 5),
                                            proxy_log_prob=t(PROXY), watched=watched),
                       AlgorithmConfig(lp_reg_neg_frac=0.5))
    assert m["watch/W/regularized_tokens"].item() == 1
    assert m["watch/#/regularized_tokens"].item() == 0
    means = lp_reg_ratio_metrics({k: float(v) for k, v in m.items()})
    assert (means["watch/W/regularized_frac"], means["watch/#/regularized_frac"]) == (1.0, 0.0)
    # Counts add up over ranks, and the share is of all their regularised tokens.
    other = {"lp_reg/regularized_tokens": 3.0, "watch/W/regularized_tokens": 0.0,
             "watch/#/regularized_tokens": 2.0}
    ranks = [SimpleNamespace(metrics={k: float(v) for k, v in m.items()}), SimpleNamespace(metrics=other)]
    combined = average_learner_metrics(ranks)
    assert combined["watch/W/regularized_tokens"] == 1 and combined["watch/#/regularized_tokens"] == 2
    assert combined["watch/W/regularized_frac"] == pytest.approx(1 / 4)
    assert combined["watch/#/regularized_frac"] == pytest.approx(2 / 4)
    # A step that regularises nothing has no share.
    assert "watch/W/regularized_frac" not in lp_reg_ratio_metrics({"watch/W/regularized_tokens": 0.0,
                                                                  "lp_reg/regularized_tokens": 0.0})


def _model_and_batch(vocab=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.batch import build_train_batch
    from rollout.types import Sample

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(8):
        prompt, response = (torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (4, 6))
        samples.append(Sample(prompt_index=i // 4, prompt_token_ids=prompt, response_token_ids=response,
                              response_logprobs=[-3.0] * len(response), finish_reason="stop",
                              weight_version=0, worker_index=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, -1.0, 1.5])
    return model, build_train_batch(samples, advantages, pad_token_id=0, dtype=torch.float64)


def test_a_learner_step_counts_the_watched_tokens_it_regularises():
    from learner.batch import shard_for_learners
    from learner.step import train_on_shard

    model, batch = _model_and_batch()
    # rho = 1 and kappa = 0.5: many regularised tokens, of both halves of the vocabulary.
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_neg_frac=1.0, lp_reg_min_p=0.5)
    watched = {"low": frozenset(range(0, 18)), "high": frozenset(range(18, 32))}
    results = []
    for micro_batch_size in (8, 2):
        shard = shard_for_learners(batch, 1, 1, micro_batch_size=micro_batch_size)[0]
        results.append(train_on_shard(model, shard, algo, temperature=1.0, world_size=1, watched=watched,
                                      backward=lambda loss, boundary: None, optimizer_step=lambda: {}))
    whole, cut = results
    assert whole["watch/low/regularized_tokens"] > 0 and whole["watch/high/regularized_tokens"] > 0
    assert (whole["watch/low/regularized_tokens"] + whole["watch/high/regularized_tokens"]
            == whole["lp_reg/regularized_tokens"])
    assert cut["watch/low/regularized_tokens"] == whole["watch/low/regularized_tokens"]
    # Other losses regularise nothing, and say nothing.
    shard = shard_for_learners(batch, 1, 1, micro_batch_size=8)[0]
    grpo = train_on_shard(model, shard, AlgorithmConfig(loss="ppo_clip"), temperature=1.0, world_size=1,
                          watched=watched, backward=lambda loss, boundary: None, optimizer_step=lambda: {})
    assert not any(key.startswith("watch/") for key in grpo)
