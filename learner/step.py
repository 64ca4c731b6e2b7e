"""One learner step over a shard, on a plain ``nn.Module``: no Ray, no DeepSpeed.

The Learner actor supplies ``backward`` and ``optimizer_step`` callables that route
through DeepSpeed; tests pass plain torch ones.

Which policy is pi_old (``algorithm.stale_policy``), for samples that older weights may
have generated (asynchronous training):

- ``learner``: the learner's weights at the start of the step, detached. On-policy (one
  mini-batch, one epoch) that is the training pass itself, log-probs and Lp-Reg proxy
  alike, at no extra cost; off-policy, one no-grad pass per micro-batch before training.
  The gap to the weights that generated a stale sample is left to the rollout correction.
- ``behaviour``: the generating policy itself: vLLM's log-probs, and Lp-Reg's proxy from
  its top-K log-probs (computed in ``build_train_batch``). Never an extra pass, on- or
  off-policy; the ratio ``pi_theta / pi_behaviour`` then carries the whole staleness, and a
  rollout correction (``pi_old / pi_behaviour = 1``) does nothing.

Lp-Reg's unfiltered proxy (``algorithm.lp_reg_filter=none``) at the sampling temperature is
pi_old itself, on every path: its log-prob is pi_old's, taken as is (``proxy_is_old``), with
no pass and no top-K list. On-policy that makes the loss GRPO's exactly: pi_theta equals
pi_old there, so no token lies below the proxy. At a proxy temperature of its own it is
pi_old's logits at that temperature, from the pass that gives pi_old (min-p at kappa = 0).

Lp-Reg's batch-scope threshold (``algorithm.lp_reg_threshold_scope=batch``) is fixed once
per mini-batch, before its first micro-batch trains (``mini_batch_lp_reg_threshold``), from
the log-probs of pi_old known by then (``select_log_probs``):

- off-policy with the learner's policy: the no-grad pass's, which runs for every
  micro-batch before any training;
- the behaviour policy: vLLM's, which are pi_old;
- on-policy with the learner's policy: vLLM's too. pi_old is then the training pass's own
  detached log-prob, known only micro-batch by micro-batch, after the threshold is needed;
  the other ways to get it are an extra no-grad pass over the mini-batch (the cost the
  fast path exists to avoid) or holding every micro-batch's graph until the last forward
  (the memory micro-batches exist to bound). vLLM sampled with those very weights
  (lock-step), so its log-probs are pi_old's up to the engines' numerical gap, which
  ``rollout/logprob_mismatch_k3`` shows; with stale samples they are the generating policy's.

Ranks agree on it through two small collectives (``torch.distributed``, the group DeepSpeed
opened): the candidate counts are summed, then every rank's k lowest candidates are
gathered, whose k-th lowest is the mini-batch's. The token-mean denominators need none:
the driver plans them (``LearnerShard.global_num_tokens``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from conf.schema import AlgorithmConfig
from learner.batch import LearnerShard, TrainBatch, uses_behaviour_proxy
from learner.losses import LpRegThreshold, is_count_metric, lp_reg_k
from learner.token_stats import TokenStats, head_token_stats, token_stats

STALE_POLICIES = ("learner", "behaviour")


def response_logits(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Logits that predict each response token: (B, R, V).

    ``logits_to_keep`` stops the model from projecting prompt positions onto the
    vocabulary, which at long prompts and large vocabularies is most of the memory.
    """
    length = batch.response_length
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=length + 1, use_cache=False)
    return out.logits[:, :-1, :]


def response_hidden_states(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Final (normalised) hidden states at the positions that predict each response token: (B, R, H).

    Through the model's own forward, so that hooks on the whole model (ZeRO-3's parameter
    gathering) see an ordinary call; ``logits_to_keep=1`` leaves one position of logits.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=1, use_cache=False,
                output_hidden_states=True)
    start = batch.prompt_length - 1
    return out.hidden_states[-1][:, start:start + batch.response_length, :]


def response_token_stats(model: torch.nn.Module, batch: TrainBatch, *, temperature: float,
                         proxy_min_p: float | None, proxy_temperature: float,
                         compute_entropy: bool, logits_chunk_tokens: int = 0,
                         top_p: float = 1.0) -> TokenStats:
    """Per-token statistics of the response tokens, ``(B, R)`` each, under the sampling
    transform vLLM used (``temperature``, then ``top_p``; see ``token_stats``).

    ``logits_chunk_tokens == 0``: from the full ``(B, R, V)`` logits. Otherwise the output
    projection runs on at most that many positions at a time (``head_token_stats``), and only
    on real response tokens; padded positions read 0.
    """
    kwargs = dict(temperature=temperature, proxy_min_p=proxy_min_p,
                  proxy_temperature=proxy_temperature, compute_entropy=compute_entropy, top_p=top_p)
    if logits_chunk_tokens <= 0:
        return token_stats(response_logits(model, batch), batch.response_ids, **kwargs)
    hidden = response_hidden_states(model, batch)
    valid = batch.response_mask.reshape(-1) > 0
    rows = valid.nonzero().squeeze(-1)
    if rows.numel() == 0:
        # Keep the loss connected to the weights, or a ZeRO backward would wait forever
        # for this rank's gradients; position 0 is masked out by the loss anyway.
        rows = rows.new_zeros(1)
    stats = head_token_stats(hidden.reshape(-1, hidden.shape[-1])[rows], model.get_output_embeddings(),
                             batch.response_ids.reshape(-1)[rows], chunk_tokens=logits_chunk_tokens,
                             **kwargs)

    def unflatten(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        full = values.new_zeros(valid.shape[0]).index_copy(0, rows, values)
        return full.view(batch.response_ids.shape)

    return TokenStats(log_prob=unflatten(stats.log_prob), entropy=unflatten(stats.entropy),
                      proxy_log_prob=unflatten(stats.proxy_log_prob))


def is_on_policy(algo: AlgorithmConfig) -> bool:
    """Each rollout batch is used for exactly one optimizer step."""
    return algo.mini_batches_per_step == 1 and algo.epochs_per_step == 1


def proxy_is_old(algo: AlgorithmConfig, temperature: float) -> bool:
    """Lp-Reg's proxy is pi_old's own log-prob: no filter, at the sampling temperature."""
    return algo.loss == "lp_reg" and algo.lp_reg_filter == "none" and algo.lp_reg_temperature == temperature


def proxy_min_p(algo: AlgorithmConfig, temperature: float) -> float | None:
    """kappa of the pass that computes Lp-Reg's proxy from pi_old's logits: the min-p
    threshold, or 0 (every token kept) for the unfiltered proxy at a temperature of its own;
    None where no such pass is needed (another loss, or ``proxy_is_old``)."""
    if algo.loss != "lp_reg" or proxy_is_old(algo, temperature):
        return None
    return 0.0 if algo.lp_reg_filter == "none" else algo.lp_reg_min_p


def behaviour_is_old(algo: AlgorithmConfig) -> bool:
    """pi_old is the generating policy (vLLM's log-probs), not the learner's.

    The driver resolves ``auto`` before the config reaches a learner
    (``conf.validate.resolve_auto``); left unresolved, it is the lock-step choice, the
    learner's policy, which is then the generating policy too.
    """
    if algo.stale_policy not in (*STALE_POLICIES, "auto"):
        raise ValueError(f"unknown stale_policy {algo.stale_policy!r}; choose from {STALE_POLICIES}")
    return algo.stale_policy == "behaviour"


@torch.no_grad()
def fill_old_log_probs(model: torch.nn.Module, micro: TrainBatch, algo: AlgorithmConfig,
                       temperature: float, logits_chunk_tokens: int = 0, top_p: float = 1.0) -> None:
    """Off-policy path: one no-grad pass for log pi_old and the Lp-Reg proxy."""
    stats = response_token_stats(
        model, micro, temperature=temperature,
        proxy_min_p=proxy_min_p(algo, temperature),
        proxy_temperature=algo.lp_reg_temperature, compute_entropy=False,
        logits_chunk_tokens=logits_chunk_tokens, top_p=top_p)
    micro.old_log_probs = stats.log_prob
    micro.proxy_log_probs = stats.proxy_log_prob


@torch.no_grad()
def fill_reference_log_probs(reference: torch.nn.Module, micro: TrainBatch, temperature: float,
                             logits_chunk_tokens: int = 0, top_p: float = 1.0) -> None:
    """The reference policy's log-probs of the response tokens, under the sampling transform
    (temperature, top-p) the policy's own are taken under, so that their KL compares like
    with like."""
    micro.ref_log_probs = response_token_stats(
        reference, micro, temperature=temperature, proxy_min_p=None, proxy_temperature=1.0,
        compute_entropy=False, logits_chunk_tokens=logits_chunk_tokens, top_p=top_p).log_prob


def select_log_probs(micro: TrainBatch, on_policy: bool, behaviour: bool) -> torch.Tensor:
    """The log-probs Lp-Reg's batch-scope threshold ranks this micro-batch's tokens by: pi_old's,
    as known before the mini-batch trains (see the module's docstring)."""
    if on_policy or behaviour:
        return micro.rollout_log_probs
    return micro.old_log_probs


def _distributed(world_size: int) -> bool:
    if world_size == 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"world_size={world_size}, but no torch.distributed process group: Lp-Reg's "
                           "batch-scope threshold is agreed between the ranks")
    return True


def mini_batch_lp_reg_threshold(mini: list[TrainBatch], values: list[torch.Tensor],
                                algo: AlgorithmConfig, world_size: int) -> LpRegThreshold:
    """Lp-Reg's thresholds over a whole mini-batch: ``mini`` is this rank's micro-batches,
    ``values`` their ``select_log_probs``. For each advantage sign, N counts the valid
    tokens of that sign over every micro-batch and rank, ``k = floor(frac * N)``, and tau is
    the k-th lowest of their values. Every rank must call it, with the same ``algo``.

    Exact across ranks: the k lowest of the mini-batch are among the union of every rank's
    k lowest, so each rank sends k values (+inf where it has fewer), not its candidates.
    """
    sides = [(algo.lp_reg_neg_frac, -1.0), (algo.lp_reg_pos_frac, 1.0)]
    if all(frac <= 0 for frac, _ in sides):
        return LpRegThreshold()
    # Sorting in at least float32 is exact, and bf16 has no sort on every device.
    device, dtype = values[0].device, torch.promote_types(values[0].dtype, torch.float32)
    candidates = []
    for _, sign in sides:
        candidates.append(torch.cat([
            v[(m.response_mask > 0) & (sign * m.advantages[:, None] > 0)].to(dtype)
            for m, v in zip(mini, values, strict=True)]))
    distributed = _distributed(world_size)
    counts = torch.tensor([c.numel() for c in candidates], dtype=torch.long, device=device)
    if distributed:
        torch.distributed.all_reduce(counts)
    ks = [lp_reg_k(int(n), frac) for n, (frac, _) in zip(counts.tolist(), sides, strict=True)]
    if not any(ks):
        return LpRegThreshold()
    lowest = torch.full((sum(ks),), torch.inf, dtype=dtype, device=device)
    start = 0
    for c, k in zip(candidates, ks, strict=True):
        mine = c.sort().values[:k]
        lowest[start:start + mine.numel()] = mine
        start += k
    if distributed:
        gathered = [torch.empty_like(lowest) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, lowest)
    else:
        gathered = [lowest]
    lowest = torch.stack(gathered)  # (ranks, sum of k)
    taus, start = [], 0
    for k in ks:
        taus.append(float(lowest[:, start:start + k].reshape(-1).kthvalue(k).values) if k else None)
        start += k
    return LpRegThreshold(neg=taus[0], pos=taus[1])


def mismatch_metrics(learner_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                     mask: torch.Tensor, staleness: torch.Tensor | None = None) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the learner's for the same tokens.

    ``learner_log_prob`` must come from the weights the learner held at the start of the
    step. ``logprob_mismatch_k3`` and ``logprob_max_abs_diff`` cover the fresh tokens only
    (staleness 0: generated by those very weights), so they measure the engines' numerical
    gap; ``logprob_mismatch_k3_stale`` covers the stale ones, where the weights differ too.
    Without ``staleness`` every token counts as fresh.
    """
    valid = mask > 0
    diff = rollout_log_prob - learner_log_prob
    k3 = torch.exp(diff) - diff - 1  # KL(learner || rollout), k3 estimator
    fresh = valid if staleness is None else valid & (staleness == 0)
    metrics = {}
    if fresh.any():
        metrics["rollout/logprob_mismatch_k3"] = float(k3[fresh].mean())
        metrics["rollout/logprob_max_abs_diff"] = float(diff[fresh].abs().max())
    if staleness is not None:
        stale = valid & (staleness > 0)
        if stale.any():
            metrics["rollout/logprob_mismatch_k3_stale"] = float(k3[stale].mean())
    return metrics


def train_on_shard(
    model: torch.nn.Module,
    shard: LearnerShard,
    algo: AlgorithmConfig,
    *,
    temperature: float,
    world_size: int,
    backward: Callable[[torch.Tensor, bool], None],
    optimizer_step: Callable[[], dict[str, float]],
    logits_chunk_tokens: int = 0,
    reference: torch.nn.Module | None = None,
    top_p: float = 1.0,
    watched: dict[str, frozenset[int]] | None = None,
) -> dict[str, float]:
    """Every optimizer step of one learner step on this rank's shard.

    ``backward(loss, boundary)`` runs once per micro-batch; ``boundary`` is True on the
    last micro-batch of a mini-batch, after which ``optimizer_step()`` runs. Micro-batches
    come planned in the shard (``shard_for_learners``) and are padded here, one at a time.
    ``reference``: the frozen reference policy, needed when ``algo.kl_loss_coef > 0``; one
    no-grad pass of it per micro-batch and step. ``temperature`` and ``top_p`` are the
    rollout's: every log-prob (pi_theta, pi_old, the reference's) is of the distribution vLLM
    sampled from, as vLLM's own are, so the mismatch metrics and the rollout correction
    compare like with like. ``watched``: the token ids of each watched string
    (``trainer.watch_tokens``, as the driver resolved them), whose share of Lp-Reg's
    regularised tokens is counted.

    Returns metrics averaged over micro-batches (and, for ``optimizer_step``'s
    metrics, over optimizer steps), except token counts (``is_count_metric``), which add up.
    """
    from learner import LossInputs, policy_loss

    device = next(model.parameters()).device
    # Token ids only: small next to the activations, and padded once for every epoch.
    padded = [[micro.pad().to(device) for micro in mini] for mini in shard.mini_batches]
    on_policy = is_on_policy(algo)
    behaviour = behaviour_is_old(algo)
    if behaviour and uses_behaviour_proxy(algo) and any(
            micro.behaviour_proxy_log_probs is None for mini in padded for micro in mini):
        raise ValueError(
            "algorithm.stale_policy=behaviour with lp_reg takes the min-p proxy from the generating "
            "policy's top-K log-probs, and this batch has none: set rollout.top_logprobs >= 1 and "
            "build the batch with build_train_batch(..., algo=cfg.algorithm, "
            "temperature=cfg.rollout.temperature)")
    if behaviour and algo.loss == "lp_reg" and algo.lp_reg_filter == "none" and not proxy_is_old(
            algo, temperature):
        raise ValueError(
            f"algorithm.lp_reg_filter=none with stale_policy=behaviour takes the proxy from the sampled "
            f"tokens' own log-probs, at the sampling temperature ({temperature}); algorithm."
            f"lp_reg_temperature={algo.lp_reg_temperature} would need the whole distribution")
    if algo.kl_loss_coef > 0 and reference is None:
        raise ValueError("algorithm.kl_loss_coef > 0 needs the reference model")
    for mini in padded:
        for micro in mini:
            if not on_policy and not behaviour:
                fill_old_log_probs(model, micro, algo, temperature, logits_chunk_tokens, top_p)
            if algo.kl_loss_coef > 0:
                fill_reference_log_probs(reference, micro, temperature, logits_chunk_tokens, top_p)
    # The proxy from the training pass itself: the on-policy fast path with the learner's policy.
    kappa_in_pass = proxy_min_p(algo, temperature) if on_policy and not behaviour else None
    old_is_proxy = proxy_is_old(algo, temperature)
    watched_ids = {string: torch.tensor(sorted(ids), dtype=torch.long, device=device)
                   for string, ids in (watched or {}).items()} if algo.loss == "lp_reg" else {}
    # Lp-Reg's batch-scope thresholds, one per mini-batch, now that pi_old is known for all
    # of them; fixed for every epoch.
    select = [[select_log_probs(micro, on_policy, behaviour) for micro in mini] for mini in padded]
    thresholds = [mini_batch_lp_reg_threshold(mini, values, algo, world_size)
                  if algo.loss == "lp_reg" and algo.lp_reg_threshold_scope == "batch" else None
                  for mini, values in zip(padded, select, strict=True)]

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def record(metrics: dict) -> None:
        for key, value in metrics.items():
            sums[key] += float(value)
            counts[key] += 1

    for epoch in range(algo.epochs_per_step):
        for mini_index, (mini, num_tokens, num_seqs) in enumerate(zip(
                padded, shard.global_num_tokens, shard.global_num_seqs, strict=True)):
            if thresholds[mini_index] is not None:
                record(thresholds[mini_index].metrics())
            for index, micro in enumerate(mini):
                stats = response_token_stats(
                    model, micro, temperature=temperature,
                    proxy_min_p=kappa_in_pass,
                    proxy_temperature=algo.lp_reg_temperature, compute_entropy=True,
                    logits_chunk_tokens=logits_chunk_tokens, top_p=top_p)
                if behaviour:
                    old_log_prob, proxy = micro.rollout_log_probs, micro.behaviour_proxy_log_probs
                elif on_policy:
                    # On-policy fast path: pi_old is the policy of this very forward pass.
                    old_log_prob, proxy = stats.log_prob.detach(), stats.proxy_log_prob
                else:
                    old_log_prob, proxy = micro.old_log_probs, micro.proxy_log_probs
                if old_is_proxy:
                    proxy = old_log_prob
                advantages = micro.advantages[:, None].expand_as(micro.response_mask)
                inputs = LossInputs(stats.log_prob, old_log_prob, advantages, micro.response_mask,
                                    proxy_log_prob=proxy, entropy=stats.entropy,
                                    rollout_log_prob=micro.rollout_log_probs,
                                    ref_log_prob=micro.ref_log_probs,
                                    select_log_prob=select[mini_index][index],
                                    lp_reg_threshold=thresholds[mini_index],
                                    watched={string: torch.isin(micro.response_ids, ids)
                                             for string, ids in watched_ids.items()} or None)
                loss, metrics = policy_loss(algo.loss, inputs, algo, global_num_tokens=num_tokens,
                                            global_num_seqs=num_seqs)
                # DeepSpeed averages gradients over ranks; the loss is already a share of
                # the global mean, so undo the average.
                backward(loss * world_size, index == len(mini) - 1)
                record(metrics)
                valid = micro.response_mask > 0
                if behaviour and micro.behaviour_proxy_inexact is not None and valid.any():
                    record({"lp_reg/behaviour_proxy_inexact_frac": float(
                        micro.behaviour_proxy_inexact[valid].float().mean())})
                # The engines' gap, against the weights the step started from: pi_old under
                # the learner's policy; under the behaviour's, the passes before the first
                # optimizer step.
                start_log_prob = None
                if not behaviour:
                    start_log_prob = old_log_prob
                elif epoch == 0 and mini_index == 0:
                    start_log_prob = stats.log_prob
                if start_log_prob is not None:
                    record(mismatch_metrics(start_log_prob.detach(), micro.rollout_log_probs,
                                            micro.response_mask, micro.staleness))
            record(optimizer_step())
    return {key: sums[key] if is_count_metric(key) else sums[key] / counts[key] for key in sums}
