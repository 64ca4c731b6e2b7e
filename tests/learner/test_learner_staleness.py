"""Asynchronous training on the learner: token staleness, the proxy from the generating
policy's top-K log-probs, stale_policy, fresh-token mismatch metrics and the reference KL."""

import copy
import math

import pytest
import torch

from conf.load import ConfigError, load_config
from conf.schema import AlgorithmConfig
from learner import min_p_proxy_log_prob
from learner.batch import build_train_batch, shard_for_learners
from learner.proxy import top_k_proxy_log_prob
from learner.step import response_token_stats, train_on_shard
from rollout.types import Sample

F64 = torch.float64


# ----------------------------------------------------------------------------- top-K proxy


def reported(logits, sampling_temperature, k):
    """What vLLM reports: the k most likely tokens, most likely first, log-probs after temperature."""
    top = torch.log_softmax(logits / sampling_temperature, -1).topk(k, dim=-1)
    return top.values, top.indices


def random_logits(seed=0, shape=(4, 9), vocab=60, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, vocab, generator=g, dtype=F64)
    ids = torch.randint(0, vocab, shape, generator=g)
    ids.view(-1)[::3] = logits.view(-1, vocab)[::3].argmax(-1)  # kept for sure
    ids.view(-1)[1::3] = logits.view(-1, vocab)[1::3].argmin(-1)  # filtered for sure
    return logits, ids


@pytest.mark.parametrize("kappa", [0.02, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("sampling_temperature", [1.0, 0.6, 1.4])
def test_with_the_whole_vocabulary_it_is_the_min_p_proxy(kappa, temperature, sampling_temperature):
    logits, ids = random_logits()
    values, indices = reported(logits, sampling_temperature, logits.shape[-1])
    got, _ = top_k_proxy_log_prob(values, indices, ids, kappa, temperature, sampling_temperature)
    ref = min_p_proxy_log_prob(logits, ids, kappa, temperature)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.isinf(ref).any() and torch.isfinite(ref).any()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-12)


def test_listed_order_does_not_matter():
    logits, ids = random_logits(seed=1)
    values, indices = reported(logits, 1.0, 20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    a = top_k_proxy_log_prob(values, indices, ids, 0.05)
    b = top_k_proxy_log_prob(values[..., perm], indices[..., perm], ids, 0.05)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)  # sums in another order
    assert torch.equal(a[1], b[1])


def test_hand_example_for_every_k():
    # p / p_max = 1, e^-4, e^-1, e^-6; kappa = 0.1 keeps tokens 0 and 2.
    logits = torch.tensor([4.0, 0.0, 3.0, -2.0], dtype=F64)
    z = math.log(math.exp(4.0) + math.exp(3.0))

    def proxy(token, k):
        values, indices = reported(logits, 1.0, k)
        out, inexact = top_k_proxy_log_prob(values, indices, torch.tensor(token), 0.1)
        return out.item(), inexact.item()

    # K = 1: only token 0 listed, and kept: the normaliser misses token 2, and says so.
    assert proxy(0, 1) == (pytest.approx(0.0), True)
    assert proxy(2, 1) == (-math.inf, True)  # kept, but unlisted: read as filtered
    # K = 2 lists both kept tokens: exact, though a full list cannot prove it.
    assert proxy(0, 2) == (pytest.approx(4.0 - z), True)
    assert proxy(2, 2) == (pytest.approx(3.0 - z), True)
    # K = 3 lists a filtered token: everything unlisted is filtered too, so exact.
    assert proxy(2, 3) == (pytest.approx(3.0 - z), False)
    assert proxy(1, 3) == (-math.inf, False)
    assert proxy(3, 3) == (-math.inf, False)


def test_the_sampled_tokens_own_log_prob_finds_a_kept_token_outside_the_list():
    # As in the hand example: kappa = 0.1 keeps tokens 0 and 2; K = 1 lists token 0 only.
    logits = torch.tensor([4.0, 0.0, 3.0, -2.0], dtype=F64)
    z = math.log(math.exp(4.0) + math.exp(3.0))
    own = torch.log_softmax(logits, -1)
    values, indices = reported(logits, 1.0, 1)

    def proxy(token):
        out, inexact = top_k_proxy_log_prob(values, indices, torch.tensor(token), 0.1,
                                            sampled_log_probs=own[token])
        return out.item(), inexact.item()

    assert proxy(2) == (pytest.approx(3.0 - z), True)  # kept: found, and in the normaliser
    assert proxy(1) == (-math.inf, True)  # unlisted and filtered: still filtered
    assert proxy(0) == (pytest.approx(0.0), True)  # listed: counted once, as before
    with pytest.raises(ValueError, match="sampled_log_probs"):
        top_k_proxy_log_prob(values, indices, torch.tensor(0), 0.1, sampled_log_probs=own)


@pytest.mark.parametrize("sampling_temperature", [1.0, 0.6])
def test_a_list_missing_only_the_sampled_kept_token_gives_the_exact_proxy(sampling_temperature):
    # Each row lists every kept token but its least likely one, which is the one sampled:
    # the low-probability kept token at an uncertain position that Lp-Reg protects.
    logits = 2.0 * torch.randn(64, 40, generator=torch.Generator().manual_seed(4), dtype=F64)
    kept = (logits - logits.amax(-1, keepdim=True)).exp() >= 0.02
    rows = kept.sum(-1) >= 2
    logits, kept = logits[rows], kept[rows]
    order = logits.argsort(-1, descending=True)
    ids = order.gather(-1, (kept.sum(-1, keepdim=True) - 1)).squeeze(-1)
    exact = min_p_proxy_log_prob(logits, ids, 0.02)
    processed = torch.log_softmax(logits / sampling_temperature, -1)
    own = processed.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    width = int(kept.sum(-1).max()) - 1
    values, indices = processed.gather(-1, order[:, :width]), order[:, :width].clone()
    for row, n in enumerate(kept.sum(-1).tolist()):  # list the n - 1 most likely only
        indices[row, n - 1:], values[row, n - 1:] = -1, -math.inf
    assert torch.isfinite(exact).all() and len(ids) > 10
    without, _ = top_k_proxy_log_prob(values, indices, ids, 0.02,
                                      sampling_temperature=sampling_temperature)
    got, _ = top_k_proxy_log_prob(values, indices, ids, 0.02,
                                  sampling_temperature=sampling_temperature, sampled_log_probs=own)
    assert torch.isinf(without).all()  # read as filtered without its own log-prob
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)


def test_small_k_is_exact_where_the_list_ends_below_the_cut():
    logits, ids = random_logits(seed=2, scale=4.0)
    exact = min_p_proxy_log_prob(logits, ids, 0.02)
    values, indices = reported(logits, 1.0, 8)
    got, inexact = top_k_proxy_log_prob(values, indices, ids, 0.02)
    assert inexact.any() and (~inexact).any()
    sure = ~inexact
    assert torch.equal(torch.isinf(got[sure]), torch.isinf(exact[sure]))
    finite = sure & torch.isfinite(exact)
    torch.testing.assert_close(got[finite], exact[finite], rtol=0, atol=1e-12)
    # Where the list may have missed kept tokens, the normaliser is too small: never lower.
    both = inexact & torch.isfinite(got) & torch.isfinite(exact)
    assert both.any() and (got[both] >= exact[both] - 1e-12).all()


def test_fifty_listed_tokens_are_not_enough_for_a_flat_distribution():
    # 200 equally likely tokens all pass kappa = 0.02: up to 1 / (kappa p_max) tokens are kept.
    logits = torch.zeros(1, 200, dtype=F64)
    ids = torch.tensor([7])
    exact = min_p_proxy_log_prob(logits, ids, 0.02)
    values, indices = reported(logits, 1.0, 50)
    got, inexact = top_k_proxy_log_prob(values, indices, ids, 0.02)
    assert exact.item() == pytest.approx(-math.log(200))
    assert inexact.item()
    if 7 in indices[0].tolist():
        assert got.item() == pytest.approx(-math.log(50))
    else:
        assert got.item() == -math.inf


def test_empty_slots_and_empty_lists():
    values = torch.tensor([[-0.1, -2.5, -math.inf]], dtype=F64)
    indices = torch.tensor([[4, 9, -1]])
    got, inexact = top_k_proxy_log_prob(values, indices, torch.tensor([4]), 0.02)
    assert got.item() == pytest.approx(-0.1 - math.log(math.exp(-0.1) + math.exp(-2.5)))
    assert inexact.item()
    none, flag = top_k_proxy_log_prob(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.long),
                                      torch.tensor([1, 2]), 0.02)
    assert torch.isinf(none).all() and not flag.any()


# ----------------------------------------------------------------------------- the batch


def sample(response, versions=(), weight_version=0, top=None, prompt=(1, 2)):
    top_ids, top_log_probs = top if top is not None else ([], [])
    return Sample(prompt_index=0, prompt_token_ids=list(prompt), response_token_ids=list(response),
                  response_logprobs=[-0.5] * len(response), finish_reason="stop",
                  weight_version=weight_version, worker_index=0, token_versions=list(versions),
                  response_top_token_ids=top_ids, response_top_logprobs=top_log_probs)


def test_staleness_per_token_travels_and_pads():
    samples = [sample([5, 6, 7], versions=[3, 4, 4]), sample([8], weight_version=2),
               sample([9, 10], versions=[5, 5])]
    batch = build_train_batch(samples, torch.zeros(3), pad_token_id=0, learner_version=5)
    assert batch.staleness.tolist() == [2, 1, 1, 3, 0, 0]
    assert batch.staleness.dtype == torch.long
    picked = batch.select([2, 0])
    assert picked.staleness.tolist() == [0, 0, 2, 1, 1]
    padded = picked.pad()
    assert padded.staleness.tolist() == [[0, 0, 0], [2, 1, 1]]
    assert build_train_batch(samples, torch.zeros(3), pad_token_id=0).staleness is None


def test_staleness_refuses_versions_newer_than_the_learner():
    with pytest.raises(ValueError, match="newer than the learner"):
        build_train_batch([sample([5], versions=[4])], torch.zeros(1), pad_token_id=0, learner_version=3)
    with pytest.raises(ValueError, match="token versions"):
        build_train_batch([sample([5, 6], versions=[4])], torch.zeros(1), pad_token_id=0, learner_version=4)


BEHAVIOUR = AlgorithmConfig(loss="lp_reg", stale_policy="behaviour", lp_reg_min_p=0.1)


def top_lists(logits_rows, k, sampling_temperature=1.0):
    values, indices = reported(torch.as_tensor(logits_rows, dtype=F64), sampling_temperature, k)
    return indices.tolist(), values.tolist()


def test_behaviour_proxy_is_computed_once_on_the_driver():
    rows = [[4.0, 0.0, 3.0, -2.0], [0.0, 1.0, 0.0, 0.0], [2.0, 2.0, -5.0, 0.0]]
    samples = [sample([0, 1], top=top_lists(rows[:2], 4)), sample([3], top=top_lists(rows[2:], 4))]
    batch = build_train_batch(samples, torch.zeros(2), pad_token_id=0, algo=BEHAVIOUR)
    expected = min_p_proxy_log_prob(torch.tensor(rows, dtype=F64), torch.tensor([0, 1, 3]), 0.1)
    assert torch.equal(torch.isinf(batch.behaviour_proxy_log_probs), torch.isinf(expected))
    torch.testing.assert_close(batch.behaviour_proxy_log_probs[:2], expected[:2].float())
    # With 3 of the 4 tokens listed, row 1 (all 4 kept) is the documented approximation.
    short = [sample([0, 1], top=top_lists(rows[:2], 3))]
    approx = build_train_batch(short, torch.zeros(1), pad_token_id=0, algo=BEHAVIOUR)
    assert approx.behaviour_proxy_inexact.tolist() == [False, True]
    assert approx.behaviour_proxy_log_probs[1] > expected[1]
    padded = batch.pad()
    assert padded.behaviour_proxy_log_probs.shape == padded.behaviour_proxy_inexact.shape == (2, 2)
    assert padded.behaviour_proxy_inexact.dtype == torch.bool
    # Only when the proxy comes from the generating policy.
    learner = build_train_batch(samples, torch.zeros(2), pad_token_id=0, algo=AlgorithmConfig())
    assert learner.behaviour_proxy_log_probs is None


def test_behaviour_proxy_without_top_logprobs_names_the_key():
    with pytest.raises(ValueError, match="rollout.top_logprobs"):
        build_train_batch([sample([5, 6])], torch.zeros(1), pad_token_id=0, algo=BEHAVIOUR)


def test_config_refuses_behaviour_lp_reg_without_top_logprobs():
    with pytest.raises(ConfigError, match="'rollout.top_logprobs' is 0.*algorithm.stale_policy"):
        load_config(overrides=["algorithm.stale_policy=behaviour", "rollout.top_logprobs=0"])
    load_config(overrides=["algorithm.stale_policy=behaviour", "rollout.top_logprobs=50"])
    load_config(overrides=["algorithm.stale_policy=behaviour", "algorithm.loss=ppo_clip"])


# ----------------------------------------------------------------------------- the step


def tiny_model(vocab=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(F64)
    with torch.no_grad():  # peaked next-token distributions, so that min-p filters some tokens
        model.get_output_embeddings().weight.mul_(5.0)
    return model


def engine_samples(model, *, temperature=1.0, stale_rows=(), top_k=0, vocab=32, n=8):
    """Samples as an engine that agrees with ``model`` exactly would report them; the rows in
    ``stale_rows`` claim version 0 with log-probs -6 (another policy), the rest version 1."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        ids = prompt.tolist()
        with torch.no_grad():
            for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)))
        samples.append(sample(ids[len(prompt):], prompt=prompt.tolist(),
                              weight_version=0 if i in stale_rows else 1))
    padded = build_train_batch(samples, torch.zeros(n), pad_token_id=0).pad()
    with torch.no_grad():
        from learner.step import response_logits

        logits = response_logits(model, padded)
        log_prob = response_token_stats(model, padded, temperature=temperature, proxy_min_p=None,
                                        proxy_temperature=1.0, compute_entropy=False).log_prob
    for row, s in enumerate(samples):
        r = len(s.response_token_ids)
        s.response_logprobs = [-6.0] * r if row in stale_rows else log_prob[row, :r].tolist()
        if top_k:
            s.response_top_token_ids, s.response_top_logprobs = top_lists(logits[row, :r], top_k, temperature)
    return samples


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, 1.5])


def run(model, batch, algo, *, temperature=1.0, reference=None, micro_batch_size=3, step=None):
    model.zero_grad()
    losses = []

    def backward(loss, boundary):
        losses.append(loss.detach())
        loss.backward()

    (shard,) = shard_for_learners(batch, algo.mini_batches_per_step, 1, micro_batch_size=micro_batch_size)
    metrics = train_on_shard(model, shard, algo, temperature=temperature, world_size=1, backward=backward,
                             optimizer_step=step or (lambda: {}), reference=reference)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses).sum(), grads, metrics


def test_mismatch_metrics_cover_fresh_tokens_only():
    model = tiny_model()
    samples = engine_samples(model, stale_rows=(1, 4))
    batch = build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64, learner_version=1)
    _, _, metrics = run(model, batch, AlgorithmConfig(loss="ppo_clip"))
    assert metrics["rollout/logprob_max_abs_diff"] < 1e-10
    assert metrics["rollout/logprob_mismatch_k3"] < 1e-12
    assert metrics["rollout/logprob_mismatch_k3_stale"] > 0.1
    # Without staleness every token counts: the stale rows show.
    _, _, everything = run(model, build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64),
                           AlgorithmConfig(loss="ppo_clip"))
    assert everything["rollout/logprob_max_abs_diff"] > 0.1
    assert "rollout/logprob_mismatch_k3_stale" not in everything


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_policy_equals_learner_policy_when_they_are_the_same_weights(temperature):
    """Fresh samples, an engine that agrees exactly, the whole vocabulary listed: pi_old and
    the proxy are the same whichever policy supplies them."""
    model = tiny_model()
    samples = engine_samples(model, temperature=temperature, top_k=32)
    common = dict(loss="lp_reg", lp_reg_neg_frac=0.3, lp_reg_min_p=0.05, entropy_coef=0.01)
    learner_algo = AlgorithmConfig(**common)
    behaviour_algo = AlgorithmConfig(stale_policy="behaviour", **common)
    learner_batch = build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64, learner_version=1)
    behaviour_batch = build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64, learner_version=1,
                                        algo=behaviour_algo, temperature=temperature)
    loss_a, grads_a, metrics_a = run(model, learner_batch, learner_algo, temperature=temperature)
    loss_b, grads_b, metrics_b = run(model, behaviour_batch, behaviour_algo, temperature=temperature)
    assert metrics_a["lp_reg/regularized_frac"] > 0
    assert metrics_b["lp_reg/regularized_frac"] == pytest.approx(metrics_a["lp_reg/regularized_frac"])
    assert metrics_b["lp_reg/filtered_frac"] == pytest.approx(metrics_a["lp_reg/filtered_frac"])
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-10)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-10, msg=name)
    assert metrics_b["rollout/logprob_max_abs_diff"] < 1e-10


def test_behaviour_policy_needs_no_pass_off_policy(monkeypatch):
    import learner.step as step

    calls = []
    monkeypatch.setattr(step, "fill_old_log_probs", lambda *a, **k: calls.append(1))
    model = tiny_model()
    algo = AlgorithmConfig(loss="lp_reg", stale_policy="behaviour", mini_batches_per_step=2,
                           epochs_per_step=2, lp_reg_neg_frac=0.3)
    batch = build_train_batch(engine_samples(model, top_k=10, stale_rows=(0,)), ADVANTAGES, pad_token_id=0,
                              dtype=F64, learner_version=1, algo=algo)
    _, grads, metrics = run(model, batch, algo)
    assert calls == []
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert 0.0 <= metrics["lp_reg/behaviour_proxy_inexact_frac"] <= 1.0
    # The engine's gap is measured against the starting weights only (first mini-batch).
    assert "rollout/logprob_max_abs_diff" in metrics


def test_behaviour_policy_without_top_logprobs_names_the_key():
    model = tiny_model()
    batch = build_train_batch(engine_samples(model), ADVANTAGES, pad_token_id=0, dtype=F64)
    with pytest.raises(ValueError, match="rollout.top_logprobs"):
        run(model, batch, AlgorithmConfig(loss="lp_reg", stale_policy="behaviour"))
    # Losses without a proxy need no lists.
    run(model, batch, AlgorithmConfig(loss="ppo_clip", stale_policy="behaviour"))


def test_tis_in_a_step_weights_stale_tokens():
    model = tiny_model()
    samples = engine_samples(model, stale_rows=(1, 4))
    batch = build_train_batch(samples, ADVANTAGES, pad_token_id=0, dtype=F64, learner_version=1)
    _, _, metrics = run(model, batch, AlgorithmConfig(loss="ppo_clip", rollout_correction="tis"))
    # Fresh tokens have ratio 1; the stale rows claim log-prob -6, far below the model's.
    assert 0 < metrics["rollout_correction/truncated_frac"] < 1
    _, _, masked = run(model, batch, AlgorithmConfig(loss="ppo_clip", rollout_correction="mis"))
    assert 0 < masked["rollout_correction/masked_frac"] < 1


def test_reference_kl_is_zero_at_first_and_positive_once_the_policy_moved():
    model = tiny_model()
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    batch = build_train_batch(engine_samples(model), ADVANTAGES, pad_token_id=0, dtype=F64)
    algo = AlgorithmConfig(loss="ppo_clip", kl_loss_coef=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def step():
        optimizer.step()
        return {}

    _, _, first = run(model, batch, algo, reference=reference, step=step)
    # The policy and its frozen copy run different code paths (train and eval modes, with
    # and without grad), so "equal" is up to float64 rounding, not bit for bit.
    assert abs(first["actor/kl_loss"]) < 1e-12
    _, _, second = run(model, batch, algo, reference=reference, step=step)
    assert second["actor/kl_loss"] > 1e-6
    assert all(p.grad is None for p in reference.parameters())
    with pytest.raises(ValueError, match="reference"):
        run(model, batch, algo)
