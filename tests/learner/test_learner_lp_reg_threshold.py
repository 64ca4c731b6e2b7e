"""Lp-Reg's threshold scope: ``batch`` regularises the same tokens however a mini-batch is cut
into micro-batches and shared out over learner ranks; ``micro_batch`` is the authors' rule,
bit for bit what lpreg computed before the scope existed.

Two ranks run as two processes on a gloo group: this file, run as a script, is one rank.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import learner.losses as losses
import learner.step as step
from conf.schema import AlgorithmConfig
from learner import LossInputs, policy_loss
from learner.batch import build_train_batch, shard_for_learners
from learner.losses import LpRegThreshold, lp_reg_threshold
from learner.step import mini_batch_lp_reg_threshold, response_token_stats, train_on_shard
from rollout.types import Sample

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 48
SHARPNESS = 4.0
# rho = 20%: k is 2-6 on a micro-batch of two or three answers, about 14 on a mini-batch.
COMMON = dict(loss="lp_reg", lp_reg_neg_frac=0.2, lp_reg_min_p=0.05)
POLICIES = {
    "on_policy": AlgorithmConfig(**COMMON),  # tau from the rollout log-probs
    "off_policy": AlgorithmConfig(**COMMON, mini_batches_per_step=2),  # from the no-grad pass
}
WHOLE = {"micro_batch_size": 0}
ONE_RANK_LAYOUTS = {
    "count2": {"micro_batch_size": 2},
    "count5": {"micro_batch_size": 5},
    "tokens": {"max_tokens": 40},
    "tokens+chunked": {"max_tokens": 40, "chunk": 7},
}
TWO_RANK_LAYOUTS = {
    "count3": {"micro_batch_size": 3},
    "tokens": {"max_tokens": 30},
}
# Layouts compute the same log-probs with other shapes (padding, chunks), so float32 values
# can differ in the last bits: a token this close to a boundary may flip.
AT_BOUNDARY = 1e-4
MAX_FLIPS = 2


def tiny_model(dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # peaked next-token distributions, so that min-p filters some tokens
        model.get_input_embeddings().weight.mul_(SHARPNESS)
    return model


def make_batch(model, dtype=torch.float32, count=32):
    """Answers of 3-14 tokens (so token budgets group them differently) sampled from the
    model, with the engine's log-probs those of the model itself, as in lock-step."""
    gen = torch.Generator().manual_seed(3)
    prompts, responses = [], []
    for _ in range(count):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen)
        ids = prompt.tolist()
        with torch.no_grad():
            for _ in range(int(torch.randint(3, 15, (1,), generator=gen))):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
                ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
        prompts.append(prompt.tolist())
        responses.append(ids[len(prompt):])
    advantages = torch.randn(count, generator=gen, dtype=dtype)

    def samples(log_probs):
        return [Sample(prompt_index=i // 4, prompt_token_ids=p, response_token_ids=r, response_logprobs=lp,
                       finish_reason="stop", weight_version=0, worker_index=0)
                for i, (p, r, lp) in enumerate(zip(prompts, responses, log_probs, strict=True))]

    draft = build_train_batch(samples([[0.0] * len(r) for r in responses]), advantages, 0, dtype)
    with torch.no_grad():
        engine = response_token_stats(model, draft.pad(), temperature=1.0, proxy_min_p=None,
                                      proxy_temperature=1.0, compute_entropy=False).log_prob
    log_probs = [engine[i, :len(r)].tolist() for i, r in enumerate(responses)]
    return build_train_batch(samples(log_probs), advantages, 0, dtype)


@contextmanager
def recording():
    """Every trained token of a step, keyed by (its sequence's tokens, position): the value
    it was ranked by, its log-prob, proxy and side's tau, and whether it was selected and
    regularised (the last epoch's record, where there are several)."""
    tokens: dict = {}
    last: dict = {}
    stats_fn, selection_fn = step.response_token_stats, losses.lp_reg_selection

    def stats_spy(model, micro, **kwargs):
        if kwargs["compute_entropy"]:  # the training pass, not a no-grad one
            last["micro"] = micro
        return stats_fn(model, micro, **kwargs)

    def selection_spy(x, algo):
        selected, thresholds = selection_fn(x, algo)
        micro = last["micro"]
        values = x.old_log_prob if x.select_log_prob is None else x.select_log_prob
        for row in range(len(micro)):
            sequence = tuple(micro.input_ids[row][micro.attention_mask[row] > 0].tolist())
            for j in range(int(micro.response_mask[row].sum())):
                advantage = float(x.advantages[row, j])
                tau = thresholds.get("threshold" if advantage < 0 else "threshold_pos")
                log_prob, proxy = float(x.log_prob[row, j].detach()), float(x.proxy_log_prob[row, j])
                tokens[(sequence, j)] = {
                    "value": float(values[row, j]), "log_prob": log_prob, "proxy": proxy,
                    "tau": None if tau is None or advantage == 0 else float(tau),
                    "selected": bool(selected[row, j]),
                    "regularized": bool(selected[row, j]) and log_prob < proxy}
        return selected, thresholds

    step.response_token_stats, losses.lp_reg_selection = stats_spy, selection_spy
    try:
        yield tokens
    finally:
        step.response_token_stats, losses.lp_reg_selection = stats_fn, selection_fn


def run_layout(model, batch, algo, layout, num_ranks=1, rank=0):
    shard = shard_for_learners(batch, algo.mini_batches_per_step, num_ranks,
                               micro_batch_size=layout.get("micro_batch_size", 0),
                               max_tokens_per_micro_batch=layout.get("max_tokens", 0))[rank]
    with recording() as tokens:
        metrics = train_on_shard(model, shard, algo, temperature=1.0, world_size=num_ranks,
                                 backward=lambda loss, boundary: None, optimizer_step=lambda: {},
                                 logits_chunk_tokens=layout.get("chunk", 0))
    return tokens, metrics, sum(len(mini) for mini in shard.mini_batches)


def flips(base: dict, other: dict, flag: str) -> list:
    """Tokens whose ``flag`` differs; each must sit at a boundary (its tau or its proxy)."""
    assert other.keys() == base.keys()
    differ = [key for key in base if base[key][flag] != other[key][flag]]
    for key in differ:
        b, o = base[key], other[key]
        at_tau = b["tau"] is not None and abs(b["value"] - b["tau"]) < AT_BOUNDARY
        at_proxy = flag == "regularized" and abs(b["log_prob"] - b["proxy"]) < AT_BOUNDARY
        assert at_tau or at_proxy, f"{flag} flipped away from any boundary: {b} -> {o}"
    return differ


def regularized(tokens: dict) -> set:
    return {key for key, token in tokens.items() if token["regularized"]}


# ----------------------------------------------------------------------------- two ranks


def two_rank_main(rank: int, port: int, out: str) -> None:
    """One rank of the two-process runs: every policy and two-rank layout, plus the merge."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2, timeout=timedelta(seconds=120))
    try:
        model = tiny_model()
        batch = make_batch(model)
        results = {}
        for policy, algo in POLICIES.items():
            for name, layout in TWO_RANK_LAYOUTS.items():
                tokens, metrics, _ = run_layout(model, batch, algo, layout, num_ranks=2, rank=rank)
                results[(policy, name)] = (tokens, metrics)
        results["merge"] = merged_thresholds(rank)
    finally:
        torch.distributed.destroy_process_group()
    with open(out, "wb") as f:
        pickle.dump(results, f)


def merged_thresholds(rank: int) -> list:
    """Thresholds over two ranks whose candidates are lopsided: rank 1 has a single token,
    negative, fewer than k, and the lowest of all. Returns [(two-rank tau, one-process tau)]."""
    from learner.batch import TrainBatch

    def micro(values, advantages):
        mask = torch.ones_like(values)
        ids = torch.zeros(values.shape, dtype=torch.long)
        return TrainBatch(input_ids=ids, attention_mask=ids, position_ids=ids, response_ids=ids,
                          response_mask=mask, advantages=advantages, rollout_log_probs=values,
                          prompt_length=0)

    gen = torch.Generator().manual_seed(11)
    ranks = [(-5 * torch.rand(4, 30, generator=gen, dtype=torch.float64),
              torch.tensor([-1.0, 1.0, -1.0, 1.0])),
             (torch.tensor([[-9.0]], dtype=torch.float64), torch.tensor([-1.0]))]
    out = []
    for neg, pos in ((0.2, 0.0), (0.05, 0.3), (0.01, 0.0)):
        algo = AlgorithmConfig(**{**COMMON, "lp_reg_neg_frac": neg, "lp_reg_pos_frac": pos})
        mine = micro(*ranks[rank])
        both = mini_batch_lp_reg_threshold([mine], [mine.rollout_log_probs], algo, world_size=2)
        whole = [micro(*r) for r in ranks]
        alone = mini_batch_lp_reg_threshold(whole, [m.rollout_log_probs for m in whole], algo, world_size=1)
        out.append((both, alone))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from learner.actor import free_port

    directory, port = tmp_path_factory.mktemp("ranks"), free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__]
    procs = [subprocess.Popen([*command, str(rank), str(port), str(directory / f"{rank}.pkl")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:  # a rank left waiting for a dead peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    return [pickle.loads((directory / f"{rank}.pkl").read_bytes()) for rank in (0, 1)]


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def scenario():
    model = tiny_model()
    return model, make_batch(model)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_batch_scope_regularises_the_same_tokens_in_every_layout(scenario, two_ranks, policy):
    model, batch = scenario
    algo = POLICIES[policy]
    base, base_metrics, _ = run_layout(model, batch, algo, WHOLE)
    reference = regularized(base)
    assert len(reference) >= 5
    assert base_metrics["lp_reg/regularized_tokens"] == len(reference)
    assert "lp_reg/threshold" in base_metrics
    if policy == "on_policy":
        # tau ranks tokens by the engine's log-probs, which no layout changes: the selected
        # set is exact, and only the proxy test of a token at its own boundary could flip.
        rollout = {(tuple(s.prompt_token_ids + s.response_token_ids), j): lp
                   for s in _samples(batch) for j, lp in enumerate(s.response_logprobs)}
        assert all(token["value"] == rollout[key] for key, token in base.items())
    layouts = [(f"1 rank {name}", *run_layout(model, batch, algo, layout)[:2])
               for name, layout in ONE_RANK_LAYOUTS.items()]
    for name in TWO_RANK_LAYOUTS:
        (tokens_0, metrics_0), (tokens_1, metrics_1) = (ranks[(policy, name)] for ranks in two_ranks)
        assert not tokens_0.keys() & tokens_1.keys()
        count = metrics_0["lp_reg/regularized_tokens"] + metrics_1["lp_reg/regularized_tokens"]
        assert metrics_0["lp_reg/threshold"] == metrics_1["lp_reg/threshold"]
        layouts.append((f"2 ranks {name}", {**tokens_0, **tokens_1},
                        {**metrics_0, "lp_reg/regularized_tokens": count}))
    total_flips = 0
    for name, tokens, metrics in layouts:
        selection_flips = flips(base, tokens, "selected")
        if policy == "on_policy":
            assert selection_flips == [], name
        differ = flips(base, tokens, "regularized")
        assert len(differ) <= MAX_FLIPS, name
        assert regularized(tokens) ^ reference == set(differ), name
        total_flips += len(differ)
        assert metrics["lp_reg/regularized_tokens"] == len(regularized(tokens)), name
        assert metrics["lp_reg/threshold"] == pytest.approx(base_metrics["lp_reg/threshold"], abs=AT_BOUNDARY)
    assert total_flips <= MAX_FLIPS


def test_micro_batch_scope_depends_on_the_layout(scenario):
    """What the batch scope fixes: under the authors' rule the same step regularises other
    tokens at other micro-batch sizes, far from any boundary."""
    model, batch = scenario
    algo = AlgorithmConfig(**COMMON, lp_reg_threshold_scope="micro_batch")
    whole = regularized(run_layout(model, batch, algo, WHOLE)[0])
    cut = regularized(run_layout(model, batch, algo, ONE_RANK_LAYOUTS["count2"])[0])
    assert len(whole ^ cut) > 2 * MAX_FLIPS


def test_threshold_over_two_ranks_is_the_threshold_over_their_union(two_ranks):
    for rank in (0, 1):
        results = two_ranks[rank]["merge"]
        assert [both for both, _ in results] == [alone for _, alone in results]
    (first, _), (second, _), (third, _) = two_ranks[0]["merge"]
    assert first.neg is not None and first.pos is None  # pos_frac 0: off
    assert first.neg > -9.0  # the 12th lowest of 61: rank 1's lone -9 is the 1st
    assert second.neg is not None and second.pos is not None  # rank 1 has no positive token
    assert third == LpRegThreshold()  # k = floor(0.01 * 61) = 0


def test_more_than_one_rank_needs_a_process_group(scenario):
    model, batch = scenario
    shard = shard_for_learners(batch, 1, 2, micro_batch_size=4)[0]
    with pytest.raises(RuntimeError, match="process group"):
        train_on_shard(model, shard, POLICIES["on_policy"], temperature=1.0, world_size=2,
                       backward=lambda loss, boundary: None, optimizer_step=lambda: {})


# Per-call losses and regularised counts that golden_run gave with the code before the
# scope existed (commit e08990a, the per-micro-batch selection), float64, on the locked
# torch and transformers (requirements/cpu.lock).
GOLDEN = {
    "on_policy": (
        [0.01821727989994058, 0.08554351257061098, 0.07664165830849885, -0.03263659009950018,
         0.05333534266354583, -0.039736112999575385, -0.04014805326035715, 0.05800636856422516,
         0.050513687582437614, 0.035755385689497085, -0.09832662246980717],
        [1, 2, 1, 0, 1, 1, 0, 2, 2, 0, 0]),
    "off_policy": (
        [0.038912109866273074, 0.18272094285082505, 0.16370658214695355, -0.06971175645253239,
         0.11392429192933388, -0.05577867265466725, -0.09439579282597403, 0.0878127182739417,
         0.008225118932370514, 0.1613822787602601, -0.054347359662595025, -0.11493134738250577,
         0.029093564328117372, 0.15300203614360944, 0.09103963489885514, -0.07972429046152817,
         0.09462544257362515, -0.06691103399857386, -0.11164169858783113, 0.04490783913390437,
         0.006916279582620384, 0.14437859895484614, -0.0645570146997735, -0.13841297105735512],
        [1, 2, 1, 0, 1, 0, 1, 2, 0, 3, 0, 0, 1, 2, 3, 0, 2, 0, 1, 2, 0, 3, 0, 0]),
}


def golden_run(policy: str):
    """float64 model and batch, micro-batches of three, a real optimizer between the
    off-policy mini-batches and epochs (so the ratio moves off 1)."""
    model = tiny_model(torch.float64)
    batch = make_batch(model, torch.float64)
    extra = {} if policy == "on_policy" else {"mini_batches_per_step": 2, "epochs_per_step": 2}
    algo = AlgorithmConfig(**COMMON, **extra, lp_reg_threshold_scope="micro_batch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses_seen, counts = [], []
    select = losses.lp_reg_loss

    def spy(x, algo):
        terms = select(x, algo)
        counts.append(int(terms.metrics["lp_reg/regularized_tokens"]))
        return terms

    def backward(loss, boundary):
        losses_seen.append(float(loss.detach()))
        loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad()
        return {}

    losses.POLICY_LOSSES["lp_reg"] = spy
    try:
        shard = shard_for_learners(batch, algo.mini_batches_per_step, 1, micro_batch_size=3)[0]
        train_on_shard(model, shard, algo, temperature=1.0, world_size=1, backward=backward,
                       optimizer_step=optimizer_step)
    finally:
        losses.POLICY_LOSSES["lp_reg"] = select
    return losses_seen, counts


@pytest.mark.parametrize("policy", list(GOLDEN))
def test_micro_batch_scope_reproduces_the_previous_code(policy):
    expected_losses, expected_counts = GOLDEN[policy]
    seen_losses, counts = golden_run(policy)
    assert counts == expected_counts
    assert sum(counts) > 0
    assert seen_losses == pytest.approx(expected_losses, rel=1e-9, abs=1e-12)


def _samples(batch):
    """The batch's sequences back as (prompt, response, log-probs) rows."""
    from types import SimpleNamespace

    rows = []
    p0 = r0 = 0
    for p_len, r_len in zip(batch.prompt_lengths.tolist(), batch.response_lengths.tolist(), strict=True):
        rows.append(SimpleNamespace(prompt_token_ids=batch.prompt_tokens[p0:p0 + p_len].tolist(),
                                    response_token_ids=batch.response_tokens[r0:r0 + r_len].tolist(),
                                    response_logprobs=batch.rollout_log_probs[r0:r0 + r_len].tolist()))
        p0, r0 = p0 + p_len, r0 + r_len
    return rows


# ----------------------------------------------------------------------------- the loss alone

F64 = torch.float64


def loss_inputs(seed=4, batch=8, length=50):
    g = torch.Generator().manual_seed(seed)
    log_prob = (-3.0 * torch.rand(batch, length, generator=g, dtype=F64) ** 2).requires_grad_()
    old = log_prob.detach() + 0.5 * torch.randn(batch, length, generator=g, dtype=F64)
    adv = torch.randn(batch, 1, generator=g, dtype=F64).expand(batch, length)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    proxy = log_prob.detach() + torch.randn(batch, length, generator=g, dtype=F64)
    proxy[torch.rand(batch, length, generator=g) < 0.2] = -math.inf
    return log_prob, old, adv, mask, proxy


def test_batch_scope_ranks_by_pi_old_and_selects_ties():
    """A call without a given threshold is its own mini-batch: the k lowest pi_old
    log-probs of each sign (not the current ones), then the proxy test on the current one."""
    log_prob, old, adv, mask, proxy = loss_inputs()
    algo = AlgorithmConfig(lp_reg_neg_frac=0.1, lp_reg_pos_frac=0.2)
    _, m = policy_loss("lp_reg", LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy), algo)
    lp = log_prob.detach()
    expected = set()
    for sign, frac, name in ((-1, 0.1, "lp_reg/threshold"), (1, 0.2, "lp_reg/threshold_pos")):
        candidates = sorted((old[i, j].item(), i, j) for i in range(8) for j in range(50)
                            if mask[i, j] and sign * adv[i, j] > 0)
        k = int(len(candidates) * frac)
        assert k >= 2
        assert m[name].item() == candidates[k - 1][0]
        expected |= {(i, j) for _, i, j in candidates[:k] if lp[i, j] < proxy[i, j]}
    assert len(expected) > 0
    assert m["lp_reg/regularized_tokens"].item() == len(expected)
    # By the current log-prob (the authors' rule) the set differs on this off-policy batch.
    _, m_micro = policy_loss("lp_reg", LossInputs(log_prob, old, adv, mask, proxy_log_prob=proxy),
                             AlgorithmConfig(lp_reg_neg_frac=0.1, lp_reg_pos_frac=0.2,
                                             lp_reg_threshold_scope="micro_batch"))
    assert m_micro["lp_reg/threshold"].item() != m["lp_reg/threshold"].item()
    # Ties at tau are all selected: k = floor(0.5 * 6) = 3, and four tokens share the 3rd value.
    flat = torch.tensor([[-3.0, -2.0, -1.0, -1.0, -1.0, -1.0]], dtype=F64)
    x = LossInputs(flat.clone().requires_grad_(), flat, -torch.ones_like(flat), torch.ones_like(flat),
                   proxy_log_prob=torch.zeros_like(flat))
    _, m = policy_loss("lp_reg", x, AlgorithmConfig(lp_reg_neg_frac=0.5))
    assert m["lp_reg/regularized_tokens"].item() == 6 and m["lp_reg/threshold"].item() == -1.0


def test_a_given_threshold_and_select_log_prob_are_used_as_they_are():
    log_prob, old, adv, mask, proxy = loss_inputs(seed=5)
    algo = AlgorithmConfig(lp_reg_neg_frac=0.1)
    # float32 values against a float64 loss: the token exactly at tau must stay selected,
    # which a cast of the values to the loss's dtype and back would not guarantee.
    select = (old - 0.3).float()
    candidates = (mask > 0) & (adv < 0)
    tau = float(select[candidates].sort().values[4])
    given = LpRegThreshold(neg=tau)
    inputs = LossInputs(log_prob, old, adv, mask, proxy_log_prob=torch.zeros_like(proxy),
                        select_log_prob=select, lp_reg_threshold=given)
    _, m = policy_loss("lp_reg", inputs, algo)
    assert m["lp_reg/regularized_tokens"].item() == 5  # proxy 0 is above every log-prob
    assert "lp_reg/threshold" not in m  # the caller logs a given one, once per mini-batch
    # No threshold on a side: nothing selected there, whatever rho says.
    inputs.lp_reg_threshold = LpRegThreshold()
    _, m = policy_loss("lp_reg", inputs, algo)
    assert m["lp_reg/regularized_tokens"].item() == 0 and "lp_reg/threshold" not in m


def test_lp_reg_threshold_needs_two_tokens():
    values = torch.tensor([-5.0, -1.0, -0.5, -0.2])
    candidates = torch.ones(4, dtype=torch.bool)
    assert lp_reg_threshold(values, candidates, 0.4) is None  # k = 1
    assert lp_reg_threshold(values, candidates, 0.5) == -1.0  # k = 2
    assert lp_reg_threshold(values, candidates, 0.0) is None
    assert lp_reg_threshold(values, ~candidates, 1.0) is None


if __name__ == "__main__":
    two_rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
