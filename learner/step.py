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


def response_logits(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """Logits that predict each response token: (B, R, V).

    ``logits_to_keep`` stops the model from projecting prompt positions onto the
    vocabulary, which at long prompts and large vocabularies is most of the memory.
    """
    length = batch.response_length
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=length + 1, use_cache=False)
    return out.logits[:, :-1, :]


def is_on_policy(algo: AlgorithmConfig) -> bool:
    """Each rollout batch is used for exactly one optimizer step."""
    return algo.mini_batches_per_step == 1 and algo.epochs_per_step == 1


def needs_proxy(algo: AlgorithmConfig) -> bool:
    return algo.loss == "lp_reg"


def micro_batches(batch: TrainBatch, micro_batch_size: int) -> list[TrainBatch]:
    return [batch.select(slice(i, i + micro_batch_size))
            for i in range(0, len(batch), micro_batch_size)]


@torch.no_grad()
def fill_old_log_probs(model: torch.nn.Module, batch: TrainBatch, algo: AlgorithmConfig,
                       micro_batch_size: int, temperature: float) -> None:
    """Off-policy path: one no-grad pass for log pi_old and the Lp-Reg proxy."""
    from learner import token_stats

    old, proxy = [], []
    for micro in micro_batches(batch, micro_batch_size):
        stats = token_stats(
            response_logits(model, micro), micro.response_ids, temperature=temperature,
            proxy_min_p=algo.lp_reg_min_p if needs_proxy(algo) else None,
            proxy_temperature=algo.lp_reg_temperature, compute_entropy=False)
        old.append(stats.log_prob)
        if stats.proxy_log_prob is not None:
            proxy.append(stats.proxy_log_prob)
    batch.old_log_probs = torch.cat(old)
    batch.proxy_log_probs = torch.cat(proxy) if proxy else None


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
    micro_batch_size: int,
    temperature: float,
    world_size: int,
    backward: Callable[[torch.Tensor], None],
    optimizer_step: Callable[[], dict[str, float]],
) -> dict[str, float]:
    """Every optimizer step of one learner step on this rank's shard.

    Returns metrics averaged over micro-batches (and, for ``optimizer_step``'s
    metrics, over optimizer steps).
    """
    from learner import LossInputs, policy_loss, token_stats

    on_policy = is_on_policy(algo)
    if not on_policy:
        for mini in shard.mini_batches:
            fill_old_log_probs(model, mini, algo, micro_batch_size, temperature)

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def record(metrics: dict) -> None:
        for key, value in metrics.items():
            sums[key] += float(value)
            counts[key] += 1

    for _ in range(algo.epochs_per_step):
        for mini, num_tokens, num_seqs in zip(shard.mini_batches, shard.global_num_tokens,
                                              shard.global_num_seqs, strict=True):
            for micro in micro_batches(mini, micro_batch_size):
                stats = token_stats(
                    response_logits(model, micro), micro.response_ids,
                    temperature=temperature,
                    proxy_min_p=algo.lp_reg_min_p if on_policy and needs_proxy(algo) else None,
                    proxy_temperature=algo.lp_reg_temperature, compute_entropy=True)
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
                backward(loss * world_size)
                record(metrics)
                record(mismatch_metrics(old_log_prob.detach(), micro.rollout_log_probs,
                                        micro.response_mask))
            record(optimizer_step())
    return {key: sums[key] / counts[key] for key in sums}
