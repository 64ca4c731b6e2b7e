"""Tool observations inside a response are not the policy's: masked like padding, they
change nothing in the loss, Lp-Reg's percentile and proxy, staleness or the token counts."""

from dataclasses import replace

import pytest
import torch

from conf.schema import AlgorithmConfig
from launch.training.step_metrics import probability_buckets, tool_metrics
from learner.batch import build_train_batch, shard_for_learners
from learner.losses import LossInputs, policy_loss
from learner.step import train_on_shard
from rollout.types import Sample, ToolCall

VOCAB = 32
K = 4


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(torch.float64)


def samples(observation_logprob=0.0, observation_top=False, observation_version=None):
    """Eight responses; odd ones hold an observation of 3 tokens after their second token."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        prompt = torch.randint(3, VOCAB, (3,), generator=gen).tolist()
        response = torch.randint(3, VOCAB, (7,), generator=gen).tolist()
        mask = [1] * 7 if i % 2 == 0 else [1, 1, 0, 0, 0, 1, 1]
        top_ids, top_lps, lps, versions = [], [], [], []
        for position, token in enumerate(response):
            model = mask[position] == 1
            ids = [token] + [t for t in range(3, 3 + K) if t != token][:K - 1]
            values = torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), -1).tolist()
            top_ids.append(ids if model or observation_top else [])
            top_lps.append(values if model or observation_top else [])
            lps.append(values[0] if model else observation_logprob)
            versions.append(1 if model or observation_version is None else observation_version)
        out.append(Sample(prompt_index=i // 4, prompt_token_ids=prompt, response_token_ids=response,
                          response_logprobs=lps, finish_reason="stop", weight_version=1, worker_index=0,
                          token_versions=versions, response_top_token_ids=top_ids,
                          response_top_logprobs=top_lps, response_mask=mask,
                          tool_calls=[] if i % 2 == 0 else [ToolCall("ok", 0.2, 3)]))
    return out


ALGO = AlgorithmConfig(loss="lp_reg", stale_policy="behaviour", entropy_coef=0.01,
                       rollout_correction="tis")
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, 1.5])


def batch_of(sample_list):
    return build_train_batch(sample_list, ADVANTAGES, pad_token_id=0, dtype=torch.float64,
                             learner_version=2, algo=ALGO)


def step(batch):
    model = tiny_model()
    losses, metrics = [], {}

    def backward(loss, boundary):
        losses.append(loss.detach())
        loss.backward()

    for shard in shard_for_learners(batch, 1, 1, micro_batch_size=4):
        metrics = train_on_shard(model, shard, ALGO, temperature=1.0, world_size=1,
                                 backward=backward, optimizer_step=lambda: {})
    return torch.stack(losses).sum(), {n: p.grad.clone() for n, p in model.named_parameters()}, metrics


def test_observations_are_masked_out_like_padding():
    batch = batch_of(samples())
    assert batch.num_tokens() == 8 * 7 - 4 * 3
    shard = shard_for_learners(batch, 1, 1)[0]
    assert shard.global_num_tokens == [44.0]
    padded = batch.pad()
    assert padded.response_mask[1].tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert padded.response_mask[0].tolist() == [1] * 7
    assert torch.isfinite(batch.behaviour_proxy_log_probs).all()
    assert not batch.behaviour_proxy_inexact[batch.policy_mask.logical_not()].any()


def test_what_lies_on_observation_positions_changes_nothing_in_the_update():
    base = step(batch_of(samples()))
    other = step(batch_of(samples(observation_logprob=-9.0, observation_top=True, observation_version=0)))
    torch.testing.assert_close(other[0], base[0], rtol=0, atol=0)
    for name, grad in base[1].items():
        torch.testing.assert_close(other[1][name], grad, rtol=0, atol=0, msg=name)
    assert base[2] == other[2]


def test_lp_reg_percentile_and_proxy_ignore_observation_positions():
    padded = batch_of(samples()).pad()
    mask = padded.response_mask
    gen = torch.Generator().manual_seed(3)
    log_prob = torch.log(torch.rand(mask.shape, generator=gen, dtype=torch.float64))
    proxy = log_prob + 0.1

    def loss_with(filler):
        observation = mask == 0
        lp = log_prob.masked_fill(observation, filler).requires_grad_()
        inputs = LossInputs(lp, lp.detach(), ADVANTAGES[:, None].expand_as(mask).to(torch.float64),
                            mask, proxy_log_prob=proxy.masked_fill(observation, filler),
                            entropy=torch.ones_like(lp))
        return policy_loss("lp_reg", inputs, replace(ALGO, rollout_correction="none"))

    # -50: the least likely tokens of the batch, first in line for the percentile if counted.
    (loss_a, metrics_a), (loss_b, metrics_b) = loss_with(-50.0), loss_with(0.0)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=0)
    assert {k: v.item() for k, v in metrics_a.items()} == {k: v.item() for k, v in metrics_b.items()}


def test_driver_metrics_count_model_tokens_and_tool_calls():
    batch = batch_of(samples(observation_logprob=-9.0))
    buckets = probability_buckets(batch.rollout_log_probs, batch.policy_mask)
    assert buckets == probability_buckets(batch.rollout_log_probs[batch.policy_mask])
    m = tool_metrics(samples())
    assert m["tool/calls_per_sample"] == 0.5 and m["rollout/turns_mean"] == 1.5
    assert m["rollout/observation_token_frac"] == pytest.approx(12 / 56)
    assert m["tool/error_frac"] == 0.0 and m["tool/exec_s"] == pytest.approx(0.2)
    assert tool_metrics([replace(s, tool_calls=None) for s in samples()]) == {}
