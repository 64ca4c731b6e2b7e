"""The driver -> learner messages and the micro-batch plan.

The driver sends one ``RaggedBatch`` per step: every sequence's tokens back to back, with
no padding, so a step with a few very long responses does not pay for them in every row.
``shard_for_learners`` cuts it into mini-batches, each mini-batch across the learner ranks,
and each rank's share into micro-batches; it sees every rank at once, so it can give every
rank the same number of micro-batches per mini-batch (under ZeRO-3 every forward is a
collective). Each micro-batch pads itself (``RaggedBatch.pad``) into a ``TrainBatch`` on
the learner, only as wide as its own longest prompt and response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from rollout.types import Sample

if TYPE_CHECKING:
    from conf.schema import AlgorithmConfig


@dataclass
class TrainBatch:
    """One micro-batch laid out as [left-padded prompt | right-padded response].

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
    # (B, R) long: learner version - the version that produced the token; 0 = fresh.
    staleness: torch.Tensor | None = None
    # (B, R): the generating policy's min-p proxy (stale_policy=behaviour), and where its
    # top-K list may have missed kept tokens (bool).
    behaviour_proxy_log_probs: torch.Tensor | None = None
    behaviour_proxy_inexact: torch.Tensor | None = None
    # Filled by the learner's no-grad passes: pi_old and the proxy when a batch is reused
    # (off-policy), the reference policy's log-probs when there is a KL loss.
    old_log_probs: torch.Tensor | None = None
    proxy_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

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

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(**{f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                             for f in fields(self) for v in (getattr(self, f.name),)})


@dataclass
class RaggedBatch:
    """Sequences without padding: the driver -> learner message of one step.

    Prompts (and responses) lie back to back in one flat tensor each, cut by their
    lengths: a few flat tensors pickle far faster than thousands of small ones.
    """

    prompt_tokens: torch.Tensor  # (sum of prompt lengths,) long
    prompt_lengths: torch.Tensor  # (B,) long
    response_tokens: torch.Tensor  # (sum of response lengths,) long
    response_lengths: torch.Tensor  # (B,) long
    rollout_log_probs: torch.Tensor  # (sum of response lengths,) aligned with response_tokens
    advantages: torch.Tensor  # (B,) one value per response
    pad_token_id: int
    # Optional per-token fields, aligned with response_tokens (see TrainBatch).
    staleness: torch.Tensor | None = None  # long
    behaviour_proxy_log_probs: torch.Tensor | None = None
    behaviour_proxy_inexact: torch.Tensor | None = None  # bool
    # Multi-turn responses: True on the policy's tokens, False on tool observations, which
    # the padded response_mask then hides like padding. None: every token is the policy's.
    policy_mask: torch.Tensor | None = None  # bool

    def __len__(self) -> int:
        return self.prompt_lengths.shape[0]

    def num_tokens(self) -> float:
        """Response tokens the policy produced: what the token-mean losses divide by."""
        if self.policy_mask is not None:
            return float(self.policy_mask.sum())
        return float(self.response_lengths.sum())

    def policy_tokens_per_row(self) -> list[int]:
        if self.policy_mask is None:
            return self.response_lengths.tolist()
        starts = _starts(self.response_lengths)
        return [int(self.policy_mask[a:b].sum()) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def sequence_lengths(self) -> list[int]:
        """Prompt + response tokens of each sequence."""
        return (self.prompt_lengths + self.response_lengths).tolist()

    def select(self, rows: list[int] | range) -> RaggedBatch:
        """The sequences ``rows``, in that order."""
        rows = list(rows)
        prompt_starts = _starts(self.prompt_lengths)
        response_starts = _starts(self.response_lengths)
        per_token = {name: getattr(self, name) for name in PER_TOKEN_FIELDS}
        per_token = {name: value for name, value in per_token.items() if value is not None}
        prompt_parts = []
        token_parts: dict[str, list[torch.Tensor]] = {name: [] for name in per_token}
        for row in rows:
            p0, p1 = prompt_starts[row], prompt_starts[row + 1]
            r0, r1 = response_starts[row], response_starts[row + 1]
            prompt_parts.append(self.prompt_tokens[p0:p1])
            for name, value in per_token.items():
                token_parts[name].append(value[r0:r1])
        index = torch.tensor(rows, dtype=torch.long)
        return RaggedBatch(
            prompt_tokens=_cat(prompt_parts, self.prompt_tokens),
            prompt_lengths=self.prompt_lengths[index],
            response_lengths=self.response_lengths[index],
            advantages=self.advantages[index],
            pad_token_id=self.pad_token_id,
            **{name: _cat(token_parts[name], value) for name, value in per_token.items()},
        )

    def pad(self) -> TrainBatch:
        """These sequences as a ``TrainBatch``, padded to their own longest prompt and response."""
        if len(self) == 0:
            raise ValueError("cannot pad an empty batch")
        prompt_lengths = self.prompt_lengths.tolist()
        response_lengths = self.response_lengths.tolist()
        prompt_length = max(prompt_lengths)
        response_length = max(1, max(response_lengths))
        batch, total = len(self), prompt_length + response_length
        dtype = self.advantages.dtype

        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, total), dtype=torch.long)
        response_mask = torch.zeros((batch, response_length), dtype=dtype)
        # Every other per-token field pads with zeros (False); the response mask hides them.
        flat = {name: getattr(self, name) for name in PER_TOKEN_FIELDS
                if name not in ("response_tokens", "policy_mask")}
        flat = {name: value for name, value in flat.items() if value is not None}
        padded = {name: value.new_zeros((batch, response_length)) for name, value in flat.items()}
        p_start, r_start = 0, 0
        for row, (p_len, r_len) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
            left = prompt_length - p_len
            input_ids[row, left:prompt_length] = self.prompt_tokens[p_start:p_start + p_len]
            attention_mask[row, left:prompt_length + r_len] = 1
            response = self.response_tokens[r_start:r_start + r_len]
            input_ids[row, prompt_length:prompt_length + r_len] = response
            response_mask[row, :r_len] = 1
            if self.policy_mask is not None:
                response_mask[row, :r_len] = self.policy_mask[r_start:r_start + r_len].to(dtype)
            for name, value in flat.items():
                padded[name][row, :r_len] = value[r_start:r_start + r_len]
            p_start, r_start = p_start + p_len, r_start + r_len
        # Positions count real tokens only, so left padding does not shift the prompt.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return TrainBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            response_ids=input_ids[:, prompt_length:].clone(),
            response_mask=response_mask,
            advantages=self.advantages,
            prompt_length=prompt_length,
            **padded,
        )


# RaggedBatch fields with one entry per response token, in the order of response_tokens.
PER_TOKEN_FIELDS = ("response_tokens", "rollout_log_probs", "staleness", "behaviour_proxy_log_probs",
                    "behaviour_proxy_inexact", "policy_mask")


def _starts(lengths: torch.Tensor) -> list[int]:
    return [0, *lengths.cumsum(0).tolist()]


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_empty(0)


def build_train_batch(samples: list[Sample], advantages: torch.Tensor, pad_token_id: int,
                      dtype: torch.dtype = torch.float32, *, learner_version: int | None = None,
                      algo: AlgorithmConfig | None = None, temperature: float = 1.0) -> RaggedBatch:
    """The samples of one step as a ``RaggedBatch``; ``dtype`` is that of the float fields.

    ``learner_version``: the weight version the learners hold when they train on this
    batch; the batch then carries each response token's staleness, ``learner_version -
    token version`` (0: produced by those very weights).

    ``algo`` (the run's algorithm section) and ``temperature`` (rollout.temperature): when
    the algorithm takes Lp-Reg's proxy from the generating policy (``stale_policy=
    behaviour`` with ``lp_reg``), the proxy of every sampled token is computed here from the
    samples' top-K log-probs (``learner.proxy.top_k_proxy_log_prob``): one number per token
    travels to the learners instead of K ids and K log-probs.
    """
    if not samples:
        raise ValueError("cannot build a training batch from zero samples")
    for row, sample in enumerate(samples):
        if len(sample.response_logprobs) != len(sample.response_token_ids):
            raise ValueError(f"sample {row}: {len(sample.response_token_ids)} response tokens but "
                             f"{len(sample.response_logprobs)} log-probs")

    def flat(lists, tensor_dtype):
        return torch.tensor([x for values in lists for x in values], dtype=tensor_dtype)

    def lengths(lists):
        return torch.tensor([len(values) for values in lists], dtype=torch.long)

    prompts = [s.prompt_token_ids for s in samples]
    responses = [s.response_token_ids for s in samples]
    batch = RaggedBatch(
        prompt_tokens=flat(prompts, torch.long),
        prompt_lengths=lengths(prompts),
        response_tokens=flat(responses, torch.long),
        response_lengths=lengths(responses),
        rollout_log_probs=flat([s.response_logprobs for s in samples], dtype),
        advantages=advantages.reshape(-1).to(dtype),
        pad_token_id=pad_token_id,
    )
    if any(s.response_mask for s in samples):
        for row, sample in enumerate(samples):
            if sample.response_mask and len(sample.response_mask) != len(sample.response_token_ids):
                raise ValueError(f"sample {row}: {len(sample.response_token_ids)} response tokens but "
                                 f"a mask of {len(sample.response_mask)}")
        batch.policy_mask = flat([s.policy_mask() for s in samples], torch.bool)
    if learner_version is not None:
        batch.staleness = token_staleness(samples, learner_version)
    if algo is not None and uses_behaviour_proxy(algo):
        proxy, inexact = behaviour_proxy(samples, batch.response_tokens, kappa=algo.lp_reg_min_p,
                                         proxy_temperature=algo.lp_reg_temperature,
                                         sampling_temperature=temperature)
        batch.behaviour_proxy_log_probs = proxy.to(dtype)
        batch.behaviour_proxy_inexact = inexact
    return batch


def uses_behaviour_proxy(algo: AlgorithmConfig) -> bool:
    """Lp-Reg's proxy comes from the generating policy's top-K log-probs. Not the unfiltered
    proxy (``lp_reg_filter=none``): that is the sampled token's own log-prob, which every
    sample carries (``learner.step.proxy_is_old``)."""
    return algo.stale_policy == "behaviour" and algo.loss == "lp_reg" and algo.lp_reg_filter == "min_p"


def token_staleness(samples: list[Sample], learner_version: int) -> torch.Tensor:
    """``learner_version`` minus the version of every response token, flat, long."""
    parts = []
    for row, sample in enumerate(samples):
        versions = sample.versions()
        if len(versions) != len(sample.response_token_ids):
            raise ValueError(f"sample {row}: {len(sample.response_token_ids)} response tokens but "
                             f"{len(versions)} token versions")
        parts.append(torch.tensor(versions, dtype=torch.long))
    staleness = learner_version - torch.cat(parts)
    if staleness.numel() and int(staleness.min()) < 0:
        raise ValueError(f"a sample carries weight version {learner_version - int(staleness.min())}, "
                         f"newer than the learner's {learner_version}")
    return staleness


def behaviour_proxy(samples: list[Sample], response_tokens: torch.Tensor, *, kappa: float,
                    proxy_temperature: float, sampling_temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The generating policy's min-p proxy of every response token (flat), and where it may
    be inexact; from the samples' top-K lists (see ``top_k_proxy_log_prob``)."""
    from learner.proxy import top_k_proxy_log_prob

    ids_rows: list[list[int]] = []
    log_prob_rows: list[list[float]] = []
    for row, sample in enumerate(samples):
        n = len(sample.response_token_ids)
        ids, log_probs = sample.response_top_token_ids, sample.response_top_logprobs
        if n and not ids:
            raise ValueError(
                f"sample {row} has no top-K log-probs, but algorithm.stale_policy=behaviour with "
                "lp_reg takes the min-p proxy from them: set rollout.top_logprobs >= 1")
        if len(ids) != n or len(log_probs) != n or any(
                len(a) != len(b) for a, b in zip(ids, log_probs, strict=True)):
            raise ValueError(f"sample {row}: its top-K token ids and log-probs do not match its "
                             f"{n} response tokens")
        ids_rows.extend(ids)
        log_prob_rows.extend(log_probs)
    width = max((len(r) for r in ids_rows), default=0)
    top_ids = torch.full((len(ids_rows), width), -1, dtype=torch.long)
    top_log_probs = torch.full((len(ids_rows), width), -math.inf, dtype=torch.float64)
    if all(len(r) == width for r in ids_rows):
        if ids_rows:
            top_ids[:] = torch.tensor(ids_rows, dtype=torch.long)
            top_log_probs[:] = torch.tensor(log_prob_rows, dtype=torch.float64)
    else:
        for position, (ids, log_probs) in enumerate(zip(ids_rows, log_prob_rows, strict=True)):
            top_ids[position, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            top_log_probs[position, :len(log_probs)] = torch.tensor(log_probs, dtype=torch.float64)
    sampled = torch.tensor([lp for sample in samples for lp in sample.response_logprobs],
                           dtype=torch.float64)
    proxy, inexact = top_k_proxy_log_prob(top_log_probs, top_ids, response_tokens, kappa,
                                          proxy_temperature, sampling_temperature,
                                          sampled_log_probs=sampled)
    observation = ~torch.tensor([m for sample in samples for m in sample.policy_mask()], dtype=torch.bool)
    if observation.any():
        # Tool observations have no top-K list (the policy did not sample them) and are
        # masked out of every loss: a finite placeholder keeps NaN out of the masked sums.
        proxy = proxy.masked_fill(observation, 0.0)
        inexact = inexact.masked_fill(observation, False)
    return proxy, inexact


@dataclass
class LearnerShard:
    """What one learner rank trains on in one step: its part of every mini-batch.

    ``mini_batches[k]`` is this rank's share of mini-batch k, already cut into
    micro-batches; every rank has the same number of micro-batches in mini-batch k.
    """

    mini_batches: list[list[RaggedBatch]]
    # Response tokens and sequences of each mini-batch summed over all ranks, so the
    # per-rank losses add up to the mean over the whole mini-batch.
    global_num_tokens: list[float]
    global_num_seqs: list[float]


def padded_cost(lengths: list[tuple[int, int]]) -> int:
    """Tokens of a micro-batch once padded: rows x (longest prompt + longest response)."""
    if not lengths:
        return 0
    return len(lengths) * (max(p for p, _ in lengths) + max(r for _, r in lengths))


def _fill(order: list[int], lengths: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Greedy: take sequences in ``order`` into a micro-batch while its padded cost fits.

    A sequence that alone exceeds the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_response = 0
    for index in order:
        prompt, response = lengths[index]
        wider_prompt, wider_response = max(longest_prompt, prompt), max(longest_response, response)
        if current and (len(current) + 1) * (wider_prompt + wider_response) > budget:
            groups.append(current)
            current, wider_prompt, wider_response = [], prompt, response
        current.append(index)
        longest_prompt, longest_response = wider_prompt, wider_response
    if current:
        groups.append(current)
    return groups


def micro_batches_needed(lengths: list[tuple[int, int]], max_tokens: int) -> int:
    """How many micro-batches of at most ``max_tokens`` padded tokens these sequences need."""
    return len(_fill(_longest_first(lengths), lengths, max_tokens))


def _longest_first(lengths: list[tuple[int, int]]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))


def split_by_tokens(lengths: list[tuple[int, int]], count: int) -> list[list[int]]:
    """Exactly ``count`` non-empty micro-batches of sequences grouped by length.

    Sequences sorted longest first are cut into ``count`` contiguous runs, so each
    micro-batch holds sequences of similar length and pads little; the cut minimises
    the largest padded cost (binary search on that cost, then greedy filling). Needs
    ``1 <= count <= len(lengths)``.
    """
    if not 1 <= count <= len(lengths):
        raise ValueError(f"cannot split {len(lengths)} sequences into {count} micro-batches")
    order = _longest_first(lengths)
    low, high = 1, padded_cost(lengths)
    while low < high:
        cap = (low + high) // 2
        if len(_fill(order, lengths, cap)) <= count:
            high = cap
        else:
            low = cap + 1
    groups = _fill(order, lengths, low)
    # The cheapest cap may need fewer runs than asked: split the costliest until it fits.
    while len(groups) < count:
        widest = max((g for g in groups if len(g) > 1),
                     key=lambda g: padded_cost([lengths[i] for i in g]))
        at = groups.index(widest)
        half = len(widest) // 2
        groups[at:at + 1] = [widest[:half], widest[half:]]
    return groups


def shard_for_learners(batch: RaggedBatch, num_mini_batches: int, num_ranks: int, *,
                       micro_batch_size: int = 0,
                       max_tokens_per_micro_batch: int = 0) -> list[LearnerShard]:
    """Split a step's batch into mini-batches, each across ranks, each rank's share into micro-batches.

    Mini-batch k is rows ``k * size : (k + 1) * size`` of the batch; every rank gets the
    same number of its sequences, so every rank takes the same number of optimizer steps.

    Micro-batches, the same number on every rank in each mini-batch:
    - ``max_tokens_per_micro_batch == 0`` (count-based): rank r takes rows r, r + num_ranks,
      ... of the mini-batch, cut into runs of ``micro_batch_size`` sequences (0: one
      micro-batch per rank and mini-batch).
    - ``max_tokens_per_micro_batch > 0`` (token budget): the mini-batch's sequences, longest
      first, are dealt to the ranks in a snake order (0, 1, ..., R-1, R-1, ..., 0, ...), which
      balances the ranks' tokens. The micro-batch count is the largest number any rank needs
      to keep each micro-batch's padded size (rows x (longest prompt + longest response))
      within the budget; each rank then cuts its sequences, grouped by length, into that many
      micro-batches. A sequence longer than the budget on its own is a micro-batch of its own:
      it is never truncated, so the budget bounds memory only up to the longest sequence.
    """
    size = len(batch)
    if size % (num_mini_batches * num_ranks):
        raise ValueError(
            f"{size} sequences per step cannot be split into {num_mini_batches} "
            f"mini-batches over {num_ranks} learner ranks")
    mini_size = size // num_mini_batches
    lengths = list(zip(batch.prompt_lengths.tolist(), batch.response_lengths.tolist(), strict=True))
    policy_tokens = batch.policy_tokens_per_row()
    shards = [LearnerShard([], [], []) for _ in range(num_ranks)]
    for k in range(num_mini_batches):
        rows = list(range(k * mini_size, (k + 1) * mini_size))
        tokens = float(sum(policy_tokens[i] for i in rows))
        if max_tokens_per_micro_batch > 0:
            plan = _token_budget_plan(rows, lengths, num_ranks, max_tokens_per_micro_batch)
        else:
            plan = _count_plan(rows, num_ranks, micro_batch_size)
        for rank in range(num_ranks):
            shards[rank].mini_batches.append([batch.select(micro) for micro in plan[rank]])
            shards[rank].global_num_tokens.append(tokens)
            shards[rank].global_num_seqs.append(float(mini_size))
    return shards


def _count_plan(rows: list[int], num_ranks: int, micro_batch_size: int) -> list[list[list[int]]]:
    plan = []
    for rank in range(num_ranks):
        mine = rows[rank::num_ranks]
        step = micro_batch_size or len(mine)
        plan.append([mine[i:i + step] for i in range(0, len(mine), step)])
    return plan


def _token_budget_plan(rows: list[int], lengths: list[tuple[int, int]], num_ranks: int,
                       max_tokens: int) -> list[list[list[int]]]:
    longest_first = sorted(rows, key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for position, row in enumerate(longest_first):
        lap, offset = divmod(position, num_ranks)
        per_rank[offset if lap % 2 == 0 else num_ranks - 1 - offset].append(row)
    count = max(micro_batches_needed([lengths[i] for i in mine], max_tokens) for mine in per_rank)
    plan = []
    for mine in per_rank:
        groups = split_by_tokens([lengths[i] for i in mine], count)
        plan.append([[mine[i] for i in group] for group in groups])
    return plan
