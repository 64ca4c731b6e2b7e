"""The driver -> learner message: padded tensors for one shard of a rollout batch."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rollout.types import Sample


@dataclass
class TrainBatch:
    """Sequences laid out as [left-padded prompt | right-padded response].

    With every prompt ending at the same column ``prompt_length``, the logits that
    predict the response are one contiguous slice for the whole batch.
    """

    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long
    position_ids: torch.Tensor  # (B, P + R) long
    response_ids: torch.Tensor  # (B, R) long
    response_mask: torch.Tensor  # (B, R) float: 1 on real response tokens
    advantages: torch.Tensor  # (B,) one value per response
    rollout_log_probs: torch.Tensor  # (B, R) log-probs vLLM reported while sampling
    prompt_length: int
    # Filled by the learner's no-grad pass when a batch is reused (off-policy).
    old_log_probs: torch.Tensor | None = None
    proxy_log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    def select(self, index: torch.Tensor | slice | list[int]) -> TrainBatch:
        """Rows ``index`` of every per-sequence tensor."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return TrainBatch(**values)

    def num_tokens(self) -> float:
        return float(self.response_mask.sum())


def build_train_batch(samples: list[Sample], advantages: torch.Tensor, pad_token_id: int,
                      dtype: torch.dtype = torch.float32) -> TrainBatch:
    """Pad the samples of one step into a ``TrainBatch``."""
    if not samples:
        raise ValueError("cannot build a training batch from zero samples")
    prompt_length = max(len(s.prompt_token_ids) for s in samples)
    response_length = max(1, max(len(s.response_token_ids) for s in samples))
    batch = len(samples)
    total = prompt_length + response_length

    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, total), dtype=torch.long)
    response_mask = torch.zeros((batch, response_length), dtype=dtype)
    rollout_log_probs = torch.zeros((batch, response_length), dtype=dtype)
    for row, sample in enumerate(samples):
        prompt, response = sample.prompt_token_ids, sample.response_token_ids
        if len(sample.response_logprobs) != len(response):
            raise ValueError(f"sample {row}: {len(response)} response tokens but "
                             f"{len(sample.response_logprobs)} log-probs")
        p_start = prompt_length - len(prompt)
        input_ids[row, p_start:prompt_length] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, p_start:prompt_length] = 1
        if response:
            end = prompt_length + len(response)
            input_ids[row, prompt_length:end] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, prompt_length:end] = 1
            response_mask[row, : len(response)] = 1
            rollout_log_probs[row, : len(response)] = torch.tensor(
                sample.response_logprobs, dtype=dtype)
    # Positions count real tokens only, so left padding does not shift the prompt.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_ids=input_ids[:, prompt_length:].clone(),
        response_mask=response_mask,
        advantages=advantages.to(dtype),
        rollout_log_probs=rollout_log_probs,
        prompt_length=prompt_length,
    )


@dataclass
class LearnerShard:
    """What one learner rank trains on in one step: its part of every mini-batch."""

    mini_batches: list[TrainBatch]
    # Response tokens and sequences of each mini-batch summed over all ranks, so the
    # per-rank losses add up to the mean over the whole mini-batch.
    global_num_tokens: list[float]
    global_num_seqs: list[float]


def shard_for_learners(batch: TrainBatch, num_mini_batches: int,
                       num_ranks: int) -> list[LearnerShard]:
    """Split a step's batch into mini-batches, then each mini-batch across ranks.

    Rank r takes rows r, r + num_ranks, ... of each mini-batch, so every rank sees
    the same number of sequences and takes the same number of optimizer steps.
    """
    size = len(batch)
    if size % (num_mini_batches * num_ranks):
        raise ValueError(
            f"{size} sequences per step cannot be split into {num_mini_batches} "
            f"mini-batches over {num_ranks} learner ranks")
    mini_size = size // num_mini_batches
    shards = [LearnerShard([], [], []) for _ in range(num_ranks)]
    for k in range(num_mini_batches):
        mini = batch.select(slice(k * mini_size, (k + 1) * mini_size))
        tokens, seqs = mini.num_tokens(), float(len(mini))
        for rank in range(num_ranks):
            shards[rank].mini_batches.append(mini.select(slice(rank, None, num_ranks)))
            shards[rank].global_num_tokens.append(tokens)
            shards[rank].global_num_seqs.append(seqs)
    return shards
