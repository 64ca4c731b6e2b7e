"""Bookkeeping of a worker's groups while they generate: pure Python, no vLLM.

Every sample of a group is its own engine request (``n = 1``, seed ``seed + j``: the seed
vLLM's own ``n > 1`` fan-out gives child j), so a sample can be interrupted and continued
on its own. A sample is made of segments: normally one; with partial rollouts, a weight
update ends the running segment, and the sample continues in a new request whose prompt
is the original prompt plus every token so far. Each token keeps the weight version of the
segment that produced it.

With tools (``MultiTurn``), a segment also ends where the model closes a code block: the
book hands the code out (``take_calls``), and ``add_observation`` appends the tool's output,
masked, before the sample continues in a new segment. A turn may span several segments
(a weight update inside it), and a segment never spans two turns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rollout.multi_turn import MultiTurn, code_open_at_end, cut_at_code_block, observation_tokens
from rollout.types import GroupRequest, GroupResult, Sample, ToolCall

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
    # Multi-turn state: 1/0 per finished token (policy/observation), the tool calls so far,
    # where the running turn began in tokens, whether it began inside a code block, and
    # how many of its tokens are known to close none.
    mask: list[int] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    turn_start: int = 0
    code_open: bool = False
    turn_checked: int = 0

    @property
    def request_id(self) -> str:
        return f"{self.group_id}/{self.index}/{self.segment}"

    def close_segment(self) -> None:
        self.tokens += self.segment_tokens
        self.logprobs += self.segment_logprobs
        self.versions += [self.segment_version] * len(self.segment_tokens)
        self.mask += [1] * len(self.segment_tokens)
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


@dataclass(frozen=True)
class PendingCall:
    """A code block the model closed: abort ``request_id``, run ``code``, then
    ``add_observation(sample, ...)``."""

    sample: SampleProgress
    request_id: str
    code: str


class SampleBook:
    """The groups a worker holds, and the engine requests that produce them."""

    def __init__(self, worker_index: int, decode=None, multi_turn: MultiTurn | None = None):
        """``decode(token_ids) -> str`` spells out a response that ran in several segments
        (the engine's own text covers only the last one). ``multi_turn``: cut responses at
        code blocks for a tool (rollout.max_turns > 0)."""
        self.worker_index = worker_index
        self.decode = decode or (lambda ids: "")
        self.multi_turn = multi_turn
        self.calls: list[PendingCall] = []
        self.tool_calls_done = 0
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
        if self.multi_turn is not None:
            # A prompt that ends inside a code block makes the first tokens code.
            code_open = code_open_at_end(self.decode(list(request.prompt_token_ids)),
                                         self.multi_turn.markers)
            for sample in samples:
                sample.code_open = code_open
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
        code = self._cut_at_code_block(sample)
        if code is not None:
            del self.running[request_id]
            self.calls.append(PendingCall(sample, request_id, code))
            return None
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

    def _cut_at_code_block(self, sample: SampleProgress) -> str | None:
        """The code, if the running turn just closed a code block with calls left; its
        segment then ends with the closing marker."""
        mt = self.multi_turn
        if mt is None or len(sample.calls) >= mt.max_turns:
            return None
        done = sample.tokens[sample.turn_start:]
        turn = done + sample.segment_tokens
        found = cut_at_code_block(turn, sample.turn_checked, sample.code_open, mt.markers, self.decode)
        sample.turn_checked = len(turn)
        if found is None:
            return None
        code, keep = found
        keep_segment = keep - len(done)  # > 0: the finished segments closed no block
        sample.segment_tokens = sample.segment_tokens[:keep_segment]
        sample.segment_logprobs = sample.segment_logprobs[:keep_segment]
        sample.segment_top_ids = sample.segment_top_ids[:keep_segment]
        sample.segment_top_logprobs = sample.segment_top_logprobs[:keep_segment]
        sample.close_segment()
        sample.segment += 1
        return code

    def take_calls(self) -> list[PendingCall]:
        calls, self.calls = self.calls, []
        return calls

    def add_observation(self, sample: SampleProgress, observation: str, status: str,
                        exec_s: float) -> SampleProgress | GroupResult | None:
        """Append a tool's output to a sample that waits for it, masked. Returns the sample to
        continue; or its group, if the output filled the response and that finished the
        group; or None (the group was dropped meanwhile, or is not done yet)."""
        mt = self.multi_turn
        self.tool_calls_done += 1
        group = self.groups.get(sample.group_id)
        if mt is None or group is None or not any(s is sample for s in group.samples):
            return None  # dropped (abort_all) while the tool ran
        budget = sample.max_tokens - len(sample.tokens)
        ids, cut = observation_tokens(observation, mt.markers, mt.encode, budget)
        # Masked, so its version matters to no loss; the turn's own keeps staleness >= 0.
        version = sample.versions[-1] if sample.versions else sample.segment_version
        sample.tokens += ids
        sample.logprobs += [0.0] * len(ids)
        sample.versions += [version] * len(ids)
        sample.mask += [0] * len(ids)
        if sample.top_ids:
            sample.top_ids += [[] for _ in ids]
            sample.top_logprobs += [[] for _ in ids]
        sample.calls.append(ToolCall(status, exec_s, len(ids)))
        sample.turn_start = sample.turn_checked = len(sample.tokens)
        sample.code_open = False
        if cut or len(sample.tokens) >= sample.max_tokens:
            sample.finish_reason = "length"
            sample.text = self.decode(sample.tokens)
            return self._maybe_finish(sample.group_id)
        return sample

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
                          response_top_logprobs=s.top_logprobs,
                          **({} if self.multi_turn is None else
                             {"response_mask": s.mask, "tool_calls": s.calls}))
                   for s in group.samples]
        return GroupResult(group_id, samples, self.worker_index,
                           generate_s=time.perf_counter() - group.arrived)

    def drop_all(self) -> list[str]:
        """Forget every group; returns the engine requests still running, to abort."""
        running = list(self.running)
        self.calls.clear()
        self.groups.clear()
        self.running.clear()
        self.finished.clear()
        return running

    @property
    def in_flight_samples(self) -> int:
        return sum(len(g.samples) for g in self.groups.values())
