"""Bookkeeping of a worker's groups while they generate: pure Python, no vLLM.

Every sample of a group is its own engine request (``n = 1``, seed ``seed + j``: the seed
vLLM's own ``n > 1`` fan-out gives child j), so a sample can be interrupted and continued
on its own. A sample is made of segments: normally one; with partial rollouts, a weight
update ends the running segment, and the sample continues in a new request whose prompt
is the original prompt plus every token so far. Each token keeps the weight version of the
segment that produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rollout.types import GroupRequest, GroupResult, Sample

# Seed offset between the segments of one sample: a continuation draws fresh random numbers.
SEGMENT_SEED_STRIDE = 7919


@dataclass(frozen=True)
class EngineRequest:
    """What the engine thread hands to vLLM for one segment of one sample."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    seed: int
    temperature: float
    top_p: float


@dataclass
class SampleProgress:
    group_id: str
    index: int  # j within the group
    prompt_token_ids: list[int]
    max_tokens: int
    seed: int
    tokens: list[int] = field(default_factory=list)  # of finished segments
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    segment: int = 0
    segment_version: int = 0
    segment_tokens: list[int] = field(default_factory=list)  # of the running segment
    segment_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)  # per token, when asked for
    top_logprobs: list[list[float]] = field(default_factory=list)
    segment_top_ids: list[list[int]] = field(default_factory=list)
    segment_top_logprobs: list[list[float]] = field(default_factory=list)
    segment_text: list[str] = field(default_factory=list)  # the engine's text, piece by piece
    text: str = ""
    finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return f"{self.group_id}/{self.index}/{self.segment}"

    def close_segment(self) -> None:
        self.tokens += self.segment_tokens
        self.logprobs += self.segment_logprobs
        self.versions += [self.segment_version] * len(self.segment_tokens)
        self.top_ids += self.segment_top_ids
        self.top_logprobs += self.segment_top_logprobs
        self.segment_tokens, self.segment_logprobs = [], []
        self.segment_top_ids, self.segment_top_logprobs = [], []
        self.segment_text = []


@dataclass
class GroupProgress:
    request: GroupRequest
    samples: list[SampleProgress]
    arrived: float


class SampleBook:
    """The groups a worker holds, and the engine requests that produce them."""

    def __init__(self, worker_index: int, decode=None):
        """``decode(token_ids) -> str`` spells out a response that ran in several segments
        (the engine's own text covers only the last one)."""
        self.worker_index = worker_index
        self.decode = decode or (lambda ids: "")
        self.groups: dict[str, GroupProgress] = {}
        self.running: dict[str, SampleProgress] = {}  # request id -> sample
        self.finished: list[GroupResult] = []
        self.interrupted = 0

    def add_group(self, request: GroupRequest) -> list[SampleProgress]:
        if request.group_id in self.groups:
            raise ValueError(f"group {request.group_id!r} is already on worker {self.worker_index}")
        s = request.sampling
        samples = [SampleProgress(request.group_id, j, list(request.prompt_token_ids),
                                  s.max_response_tokens, s.seed + j)
                   for j in range(s.samples_per_prompt)]
        self.groups[request.group_id] = GroupProgress(request, samples, time.perf_counter())
        return samples

    def start(self, sample: SampleProgress, version: int) -> EngineRequest:
        """The engine request for the sample's next segment, generated under ``version``."""
        sample.segment_version = version
        self.running[sample.request_id] = sample
        sampling = self.groups[sample.group_id].request.sampling
        return EngineRequest(
            request_id=sample.request_id,
            prompt_token_ids=sample.prompt_token_ids + sample.tokens,
            max_tokens=sample.max_tokens - len(sample.tokens),
            seed=sample.seed + SEGMENT_SEED_STRIDE * sample.segment,
            temperature=sampling.temperature, top_p=sampling.top_p)

    def on_output(self, request_id: str, new_token_ids: list[int], new_logprobs: list[float],
                  finish_reason: str | None, new_text: str | None,
                  new_top: tuple[list[list[int]], list[list[float]]] = ([], [])) -> GroupResult | None:
        """Record what a running segment generated since its last output (vLLM's DELTA
        outputs); returns the group if it is done.

        Appending only the increment keeps the cost of an engine step proportional to the
        tokens it produced, not to the length of the answers so far.
        ``new_top``: the most likely tokens and their log-probs at each new position, when
        asked for. ``new_text`` is None when the engine does not detokenize.
        """
        sample = self.running.get(request_id)
        if sample is None:  # an aborted request's last words
            return None
        sample.segment_tokens += new_token_ids
        sample.segment_logprobs += new_logprobs
        new_top_ids, new_top_logprobs = new_top
        sample.segment_top_ids += new_top_ids
        sample.segment_top_logprobs += new_top_logprobs
        if new_text:
            sample.segment_text.append(new_text)
        if finish_reason is None:
            return None
        del self.running[request_id]
        # The engine's text covers only this segment, and there is none when it did not
        # detokenize: spell the whole response out then.
        whole_from_engine = sample.segment == 0 and new_text is not None
        engine_text = "".join(sample.segment_text)
        sample.close_segment()
        sample.finish_reason = finish_reason
        sample.text = engine_text if whole_from_engine else self.decode(sample.tokens)
        return self._maybe_finish(sample.group_id)

    def interrupt_all(self) -> tuple[list[SampleProgress], list[str]]:
        """End every running segment (a weight update is coming).

        Returns the samples to continue and the engine requests to abort. A sample whose
        token budget is already spent finishes instead of continuing.
        """
        to_continue, to_abort = [], []
        for request_id, sample in list(self.running.items()):
            del self.running[request_id]
            to_abort.append(request_id)
            sample.close_segment()
            sample.segment += 1
            self.interrupted += 1
            if len(sample.tokens) >= sample.max_tokens:
                sample.finish_reason = "length"
                sample.text = self.decode(sample.tokens)
                done = self._maybe_finish(sample.group_id)
                if done is not None:
                    self.finished.append(done)
            else:
                to_continue.append(sample)
        return to_continue, to_abort

    def _maybe_finish(self, group_id: str) -> GroupResult | None:
        group = self.groups[group_id]
        if any(s.finish_reason is None for s in group.samples):
            return None
        del self.groups[group_id]
        samples = [Sample(prompt_index=0, prompt_token_ids=s.prompt_token_ids,
                          response_token_ids=s.tokens, response_logprobs=s.logprobs,
                          finish_reason=s.finish_reason or "length",
                          weight_version=min(s.versions, default=s.segment_version),
                          worker_index=self.worker_index, response_text=s.text,
                          token_versions=s.versions, response_top_token_ids=s.top_ids,
                          response_top_logprobs=s.top_logprobs)
                   for s in group.samples]
        return GroupResult(group_id, samples, self.worker_index,
                           generate_s=time.perf_counter() - group.arrived)

    def drop_all(self) -> list[str]:
        """Forget every group; returns the engine requests still running, to abort."""
        running = list(self.running)
        self.groups.clear()
        self.running.clear()
        self.finished.clear()
        return running

    @property
    def in_flight_samples(self) -> int:
        return sum(len(g.samples) for g in self.groups.values())
