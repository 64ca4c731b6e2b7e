"""learner.step on a plain torch model: every way of cutting a step gives the same update.

Ranks are simulated by summing each shard's gradients, as the data-parallel all-reduce
(after ``train_on_shard`` undid its average) does.
"""

import pytest
import torch

from conf.schema import AlgorithmConfig
from learner.batch import build_train_batch, shard_for_learners
from learner.step import response_token_stats, train_on_shard
from rollout.types import Sample


def tiny_model(dtype=torch.float64, vocab=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(dtype)


def make_batch(dtype=torch.float64, vocab=32, max_response=7):
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(8):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        length = int(torch.randint(1, max_response, (1,), generator=gen))
        response = torch.randint(3, vocab, (length,), generator=gen)
        samples.append(Sample(prompt_index=i // 4, prompt_token_ids=prompt.tolist(),
                              response_token_ids=response.tolist(),
                              response_logprobs=[-3.0] * len(response), finish_reason="stop",
                              weight_version=0, worker_index=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.5])
    return build_train_batch(samples, advantages, pad_token_id=0, dtype=dtype)


def run(model, batch, algo, num_ranks, *, micro_batch_size=0, max_tokens=0, chunk=0, temperature=1.0):
    """Summed loss and rank-averaged gradients of one learner step (no optimizer step)."""
    model.zero_grad()
    losses, boundaries = [], []

    def backward(loss, boundary):
        losses.append(loss.detach() / num_ranks)
        boundaries.append(boundary)
        loss.backward()

    for shard in shard_for_learners(batch, algo.mini_batches_per_step, num_ranks,
                                    micro_batch_size=micro_batch_size,
                                    max_tokens_per_micro_batch=max_tokens):
        train_on_shard(model, shard, algo, temperature=temperature, world_size=num_ranks,
                       backward=backward, optimizer_step=lambda: {}, logits_chunk_tokens=chunk)
    grads = {n: p.grad.clone() / num_ranks for n, p in model.named_parameters()}
    return torch.stack(losses).sum(), grads, boundaries


def assert_same(a, b, atol):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=atol)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_two_ranks_with_micro_batches_match_one_full_batch(agg):
    # (Lp-Reg's per-micro-batch scope, the reference's, legitimately depends on the
    # micro-batch split; the surrogate must not. Its batch scope: test_learner_lp_reg_threshold.)
    model, batch = tiny_model(), make_batch()
    algo = AlgorithmConfig(loss="ppo_clip", loss_agg_mode=agg)
    whole = run(model, batch, algo, num_ranks=1, micro_batch_size=8)
    sharded = run(model, batch, algo, num_ranks=2, micro_batch_size=2)
    assert_same(whole, sharded, atol=1e-12)


# Budgets small enough to cut each rank's share into several micro-batches.
PATHS = {
    "count": {"micro_batch_size": 3},
    "tokens": {"max_tokens": 24},
    "tokens+chunked": {"max_tokens": 24, "chunk": 5},
    "count+chunked": {"micro_batch_size": 3, "chunk": 4},
}


@pytest.mark.parametrize("num_ranks", [1, 2])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("loss", "agg", "entropy_coef"), [
    ("ppo_clip", "token-mean", 0.0),
    ("ppo_clip", "seq-mean-token-sum", 0.01),
    ("gspo", "seq-mean-token-mean", 0.0),
])
def test_float32_paths_give_the_loss_and_gradients_of_one_whole_batch(num_ranks, path, loss, agg,
                                                                      entropy_coef):
    model, batch = tiny_model(torch.float32, vocab=48), make_batch(torch.float32, vocab=48, max_response=12)
    algo = AlgorithmConfig(loss=loss, loss_agg_mode=agg, entropy_coef=entropy_coef)
    whole = run(model, batch, algo, num_ranks=1, temperature=0.7)
    cut = run(model, batch, algo, num_ranks, temperature=0.7, **PATHS[path])
    assert len(cut[2]) > num_ranks  # really several micro-batches per rank
    assert_same(whole, cut, atol=1e-6)


@pytest.mark.parametrize("loss", ["lp_reg", "kl_cov", "clip_cov", "entropy_8020", "ppo_clip"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logits_match_full_logits_for_every_loss(loss, temperature):
    """Same micro-batches, so even the per-micro-batch selections must agree. (Two ranks
    simulated in one process: Lp-Reg's batch scope would need a real process group.)"""
    model, batch = tiny_model(torch.float32, vocab=48), make_batch(torch.float32, vocab=48, max_response=12)
    algo = AlgorithmConfig(loss=loss, lp_reg_neg_frac=0.3, lp_reg_min_p=0.05, kl_cov_ratio=0.1,
                           clip_cov_ratio=0.0, entropy_coef=0.01, lp_reg_threshold_scope="micro_batch")
    full = run(model, batch, algo, 2, max_tokens=40, temperature=temperature)
    chunked = run(model, batch, algo, 2, max_tokens=40, chunk=3, temperature=temperature)
    assert_same(full, chunked, atol=1e-6)


def test_chunked_statistics_match_on_real_tokens():
    model, batch = tiny_model(torch.float32, vocab=48), make_batch(torch.float32, vocab=48)
    micro = batch.pad()
    kw = {"temperature": 0.8, "proxy_min_p": 0.05, "proxy_temperature": 1.0, "compute_entropy": True}
    full = response_token_stats(model, micro, **kw)
    chunked = response_token_stats(model, micro, logits_chunk_tokens=4, **kw)
    mask = micro.response_mask.bool()
    for a, b in ((full.log_prob, chunked.log_prob), (full.entropy, chunked.entropy),
                 (full.proxy_log_prob, chunked.proxy_log_prob)):
        torch.testing.assert_close(b[mask], a[mask], rtol=0, atol=1e-6)
        assert torch.equal(b[~mask], torch.zeros_like(b[~mask]))


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch(torch.float32)
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_neg_frac=0.3)
    plain = tiny_model(torch.float32)
    plain.train()
    reference = run(plain, batch, algo, 1, max_tokens=30)
    checkpointed = tiny_model(torch.float32)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    assert checkpointed.is_gradient_checkpointing
    assert_same(reference, run(checkpointed, batch, algo, 1, max_tokens=30), atol=1e-6)


def test_one_boundary_per_mini_batch_on_every_rank():
    model, batch = tiny_model(), make_batch()
    algo = AlgorithmConfig(loss="ppo_clip", mini_batches_per_step=2, epochs_per_step=2)
    for shard in shard_for_learners(batch, 2, 2, max_tokens_per_micro_batch=12):
        boundaries, steps = [], []
        train_on_shard(model, shard, algo, temperature=1.0, world_size=2,
                       backward=lambda loss, boundary, seen=boundaries: seen.append(boundary),
                       optimizer_step=lambda taken=steps: taken.append(1) or {})
        assert sum(boundaries) == len(steps) == 4  # 2 mini-batches x 2 epochs
        per_epoch = sum(len(mini) for mini in shard.mini_batches)
        assert boundaries[per_epoch - 1] and boundaries[-1]


def test_on_policy_reports_zero_ratio_drift_and_the_rollout_mismatch():
    model, batch = tiny_model(), make_batch()
    metrics = train_on_shard(model, shard_for_learners(batch, 1, 1, micro_batch_size=4)[0],
                             AlgorithmConfig(), temperature=1.0, world_size=1,
                             backward=lambda loss, boundary: loss.backward(),
                             optimizer_step=lambda: {})
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-12)
    # The batch claims log-prob -3 for every token; the model disagrees, and it shows.
    assert metrics["rollout/logprob_max_abs_diff"] > 0.01


def test_off_policy_fills_old_log_probs_from_a_no_grad_pass(monkeypatch):
    import learner.step as step

    filled = []
    fill = step.fill_old_log_probs

    def spy(model, micro, *args, **kwargs):
        fill(model, micro, *args, **kwargs)
        filled.append(micro)

    monkeypatch.setattr(step, "fill_old_log_probs", spy)
    model, batch = tiny_model(), make_batch()
    algo = AlgorithmConfig(loss="lp_reg", mini_batches_per_step=2)
    shard = shard_for_learners(batch, 2, 1, micro_batch_size=2)[0]
    train_on_shard(model, shard, algo, temperature=1.0, world_size=1,
                   backward=lambda loss, boundary: loss.backward(), optimizer_step=lambda: {})
    assert len(filled) == sum(len(mini) for mini in shard.mini_batches)
    for micro in filled:
        assert micro.old_log_probs is not None and micro.old_log_probs.shape == micro.response_mask.shape
        assert not micro.old_log_probs.requires_grad
        assert micro.proxy_log_probs is not None


def test_token_counts_add_up_over_micro_batches_while_fractions_average():
    model, batch = tiny_model(), make_batch()
    # rho = 1: every negative token is selected, and with the proxy of the pass itself the
    # ones below it are regularised, however the batch is cut.
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_neg_frac=1.0, lp_reg_min_p=0.5)
    results = []
    for micro_batch_size in (8, 2):
        shard = shard_for_learners(batch, 1, 1, micro_batch_size=micro_batch_size)[0]
        results.append(train_on_shard(model, shard, algo, temperature=1.0, world_size=1,
                                      backward=lambda loss, boundary: None, optimizer_step=lambda: {}))
    whole, cut = results
    assert whole["lp_reg/regularized_tokens"] > 0
    assert cut["lp_reg/regularized_tokens"] == whole["lp_reg/regularized_tokens"]
    assert 0 < cut["lp_reg/regularized_frac"] < 1  # a mean of fractions, not a sum
