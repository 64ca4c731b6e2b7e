"""The messages that cross the rollout hop, defined once.

Driver -> RolloutWorker: a ``GenerationRequest``.
RolloutWorker -> driver -> learners: a ``GenerationResult`` holding ``Sample`` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_response_tokens: int
    seed: int


@dataclass(frozen=True)
class GenerationRequest:
    """A shard of one step's prompts for one rollout worker."""

    prompt_indices: list[int]  # positions in the step's prompt batch; they name the GRPO groups
    prompt_token_ids: list[list[int]]
    sampling: SamplingSettings


@dataclass
class Sample:
    """One sampled response, with what the learner needs to train on it."""

    prompt_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    # log pi_old(token) that vLLM computed while sampling, one per response token.
    response_logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    weight_version: int
    worker_index: int
    response_text: str = ""


@dataclass
class GenerationResult:
    worker_index: int
    weight_version: int
    samples: list[Sample] = field(default_factory=list)
    generate_s: float = 0.0

    @property
    def num_response_tokens(self) -> int:
        return sum(len(s.response_token_ids) for s in self.samples)
