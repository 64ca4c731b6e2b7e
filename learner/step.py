"""One learner step over a shard, on a plain ``nn.Module``: no Ray, no DeepSpeed.

The Learner actor supplies ``backward`` and ``optimizer_step`` callables that route
through DeepSpeed; tests pass plain torch ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from conf.schema import AlgorithmConfig
from learner.batch import LearnerShard, TrainBatch
from learner.token_stats import TokenStats, head_token_stats, token_stats


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
                         compute_entropy: bool, logits_chunk_tokens: int = 0) -> TokenStats:
    """Per-token statistics of the response tokens, ``(B, R)`` each.

    ``logits_chunk_tokens == 0``: from the full ``(B, R, V)`` logits. Otherwise the output
    projection runs on at most that many positions at a time (``head_token_stats``), and only
    on real response tokens; padded positions read 0.
    """
    kwargs = dict(temperature=temperature, proxy_min_p=proxy_min_p,
                  proxy_temperature=proxy_temperature, compute_entropy=compute_entropy)
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


def needs_proxy(algo: AlgorithmConfig) -> bool:
    return algo.loss == "lp_reg"


@torch.no_grad()
def fill_old_log_probs(model: torch.nn.Module, micro: TrainBatch, algo: AlgorithmConfig,
                       temperature: float, logits_chunk_tokens: int = 0) -> None:
    """Off-policy path: one no-grad pass for log pi_old and the Lp-Reg proxy."""
    stats = response_token_stats(
        model, micro, temperature=temperature,
        proxy_min_p=algo.lp_reg_min_p if needs_proxy(algo) else None,
        proxy_temperature=algo.lp_reg_temperature, compute_entropy=False,
        logits_chunk_tokens=logits_chunk_tokens)
    micro.old_log_probs = stats.log_prob
    micro.proxy_log_probs = stats.proxy_log_prob


def mismatch_metrics(learner_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the learner's for the same tokens."""
    valid = mask > 0
    if not valid.any():
        return {}
    diff = (rollout_log_prob - learner_log_prob)[valid]
    k3 = torch.exp(diff) - diff - 1  # KL(learner || rollout), k3 estimator
    return {"rollout/logprob_mismatch_k3": float(k3.mean()),
            "rollout/logprob_max_abs_diff": float(diff.abs().max())}


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
) -> dict[str, float]:
    """Every optimizer step of one learner step on this rank's shard.

    ``backward(loss, boundary)`` runs once per micro-batch; ``boundary`` is True on the
    last micro-batch of a mini-batch, after which ``optimizer_step()`` runs. Micro-batches
    come planned in the shard (``shard_for_learners``) and are padded here, one at a time.

    Returns metrics averaged over micro-batches (and, for ``optimizer_step``'s
    metrics, over optimizer steps).
    """
    from learner import LossInputs, policy_loss

    device = next(model.parameters()).device
    # Token ids only: small next to the activations, and padded once for every epoch.
    padded = [[micro.pad().to(device) for micro in mini] for mini in shard.mini_batches]
    on_policy = is_on_policy(algo)
    if not on_policy:
        for mini in padded:
            for micro in mini:
                fill_old_log_probs(model, micro, algo, temperature, logits_chunk_tokens)

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def record(metrics: dict) -> None:
        for key, value in metrics.items():
            sums[key] += float(value)
            counts[key] += 1

    for _ in range(algo.epochs_per_step):
        for mini, num_tokens, num_seqs in zip(padded, shard.global_num_tokens,
                                              shard.global_num_seqs, strict=True):
            for index, micro in enumerate(mini):
                stats = response_token_stats(
                    model, micro, temperature=temperature,
                    proxy_min_p=algo.lp_reg_min_p if on_policy and needs_proxy(algo) else None,
                    proxy_temperature=algo.lp_reg_temperature, compute_entropy=True,
                    logits_chunk_tokens=logits_chunk_tokens)
                # On-policy fast path: pi_old is the policy of this very forward pass.
                old_log_prob = stats.log_prob.detach() if on_policy else micro.old_log_probs
                proxy = stats.proxy_log_prob if on_policy else micro.proxy_log_probs
                advantages = micro.advantages[:, None].expand_as(micro.response_mask)
                inputs = LossInputs(stats.log_prob, old_log_prob, advantages, micro.response_mask,
                                    proxy_log_prob=proxy, entropy=stats.entropy)
                loss, metrics = policy_loss(algo.loss, inputs, algo, global_num_tokens=num_tokens,
                                            global_num_seqs=num_seqs)
                # DeepSpeed averages gradients over ranks; the loss is already a share of
                # the global mean, so undo the average.
                backward(loss * world_size, index == len(mini) - 1)
                record(metrics)
                record(mismatch_metrics(old_log_prob.detach(), micro.rollout_log_probs,
                                        micro.response_mask))
            record(optimizer_step())
    return {key: sums[key] / counts[key] for key in sums}
