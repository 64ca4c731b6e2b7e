"""The messages that cross the rollout hop, defined once.

Driver -> RolloutWorker: ``GroupRequest`` (one GRPO group: a prompt and its n samples).
RolloutWorker -> driver: ``WorkerReport`` (heartbeat and finished ``GroupResult`` records).
Driver -> learners: the ``Sample`` records inside those results.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_response_tokens: int
    # Sample j of a group samples with seed + j, as vLLM's own n > 1 fan-out does, so a
    # group's samples do not depend on which worker generates them or what runs beside it.
    # Each group has its own seed: groups sharing one would share their random numbers.
    seed: int


@dataclass(frozen=True)
class GroupRequest:
    """One GRPO group for whichever worker has room: a prompt, sampled n times."""

    group_id: str  # unique within a run; results come back under it
    prompt_token_ids: list[int]
    sampling: SamplingSettings


@dataclass(frozen=True)
class ToolCall:
    """One tool call inside a multi-turn response (rollout.max_turns > 0)."""

    status: str  # rollout.tools.ToolStatus's value: ok, error, timeout, killed, failed
    exec_s: float  # the call's wall-clock seconds in the tool
    observation_tokens: int  # what its observation added to the response (after truncation)


@dataclass
class Sample:
    """One sampled response, with what the learner needs to train on it."""

    prompt_index: int  # the group's position in the step's batch; set by the driver
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    # log pi_behaviour(token) that vLLM computed while sampling, one per response token.
    response_logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    weight_version: int  # the version the response started under (its oldest token)
    worker_index: int
    response_text: str = ""
    # The weight version that produced each response token. With partial rollouts a
    # response that was generating during a weight update continues under the new
    # version, so its tokens can come from several versions.
    token_versions: list[int] = field(default_factory=list)
    # With rollout.top_logprobs = K > 0: the K most likely tokens at each response position
    # under the generating policy, and their log-probs (after temperature), most likely
    # first. The generating policy's own distribution, without keeping its weights.
    response_top_token_ids: list[list[int]] = field(default_factory=list)
    response_top_logprobs: list[list[float]] = field(default_factory=list)
    # Multi-turn responses (rollout.max_turns > 0): 1 on the policy's tokens, 0 on the tool
    # observations between them, which have 0.0 log-probs, empty top-K lists and no part in
    # training. Empty: every token is the policy's (single turn).
    response_mask: list[int] = field(default_factory=list)
    # The response's tool calls, in order; None when multi-turn rollouts are off.
    tool_calls: list[ToolCall] | None = None

    def policy_mask(self) -> list[int]:
        return self.response_mask or [1] * len(self.response_token_ids)

    def versions(self) -> list[int]:
        return self.token_versions or [self.weight_version] * len(self.response_token_ids)


@dataclass
class GroupResult:
    group_id: str
    samples: list[Sample]
    worker_index: int
    generate_s: float  # from the group's arrival on the worker to its last sample


@dataclass
class WorkerReport:
    """What a worker answers to every poll: a heartbeat, even when nothing finished."""

    worker_index: int
    weight_version: int
    finished: list[GroupResult] = field(default_factory=list)
    in_flight_samples: int = 0
    # Seconds the engine has spent generating since the worker started: the driver
    # turns differences of it into the workers' idle time.
    busy_s: float = 0.0
    interrupted_samples: int = 0  # partial rollouts continued under new weights, in total
    # Tool calls finished, in total: progress while every sample waits on a tool.
    tool_calls: int = 0
    # Seconds since the worker started with at least one sample waiting on its tool, and
    # the part of them with no request on the engine (rollout.multi_turn.ToolWaitClock).
    tool_wait_s: float = 0.0
    tool_idle_s: float = 0.0
