"""learner.step on a plain torch model: sharding over ranks and micro-batches is exact."""

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner.batch import build_train_batch, shard_for_learners
from learner.step import train_on_shard
from rollout.types import Sample


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).double()


def make_batch():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(8):
        prompt = torch.randint(3, 32, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        response = torch.randint(3, 32, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
        samples.append(Sample(prompt_index=i // 4, prompt_token_ids=prompt.tolist(),
                              response_token_ids=response.tolist(),
                              response_logprobs=[-3.0] * len(response), finish_reason="stop",
                              weight_version=0, worker_index=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.5])
    return build_train_batch(samples, advantages, pad_token_id=0, dtype=torch.float64)


def gradients(model, batch, algo, num_ranks, micro_batch_size):
    model.zero_grad()
    for shard in shard_for_learners(batch, algo.mini_batches_per_step, num_ranks):
        train_on_shard(model, shard, algo, micro_batch_size=micro_batch_size, temperature=1.0,
                       world_size=num_ranks, backward=lambda loss: loss.backward(),
                       optimizer_step=lambda: {})
    # A data-parallel all-reduce averages the ranks' gradients.
    return {n: p.grad.clone() / num_ranks for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_two_ranks_with_micro_batches_match_one_full_batch(agg):
    # (Lp-Reg selects its tokens per micro-batch, as the reference does, so its
    # gradient legitimately depends on the micro-batch split; the surrogate must not.)
    model, batch = tiny_model(), make_batch()
    algo = AlgorithmConfig(loss="ppo_clip", loss_agg_mode=agg)
    whole = gradients(model, batch, algo, num_ranks=1, micro_batch_size=8)
    sharded = gradients(model, batch, algo, num_ranks=2, micro_batch_size=2)
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name, grad in whole.items():
        torch.testing.assert_close(sharded[name], grad, rtol=1e-9, atol=1e-12)


def test_on_policy_reports_zero_ratio_drift_and_the_rollout_mismatch():
    model, batch = tiny_model(), make_batch()
    metrics = train_on_shard(model, shard_for_learners(batch, 1, 1)[0], AlgorithmConfig(),
                             micro_batch_size=4, temperature=1.0, world_size=1,
                             backward=lambda loss: loss.backward(), optimizer_step=lambda: {})
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-12)
    # The batch claims log-prob -3 for every token; the model disagrees, and it shows.
    assert metrics["rollout/logprob_max_abs_diff"] > 0.01


def test_off_policy_fills_old_log_probs_from_a_no_grad_pass():
    model, batch = tiny_model(), make_batch()
    algo = AlgorithmConfig(loss="lp_reg", mini_batches_per_step=2)
    shard = shard_for_learners(batch, 2, 1)[0]
    train_on_shard(model, shard, algo, micro_batch_size=4, temperature=1.0, world_size=1,
                   backward=lambda loss: loss.backward(), optimizer_step=lambda: {})
    for mini in shard.mini_batches:
        assert mini.old_log_probs is not None and mini.old_log_probs.shape == mini.response_mask.shape
        assert mini.proxy_log_probs is not None
