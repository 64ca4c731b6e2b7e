"""Multi-turn responses with a tool (rollout.max_turns > 0): pure functions, no vLLM.

The model writes ``code_start`` ... ``code_end``; the worker stops that request there, runs
the code beside the engine thread, and continues the response after
``output_start`` + observation + ``output_end``. Markers are matched on decoded text, never
on token ids: a tokenizer may spell a marker with different tokens in different contexts,
or split it across several. Observation tokens are not the policy's: they carry mask 0,
log-prob 0.0 and empty top-K lists, and the learner never trains on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Markers:
    code_start: str = "```python"
    code_end: str = "```"
    output_start: str = "```output"
    output_end: str = "```"


@dataclass(frozen=True)
class MultiTurn:
    """What a worker's sample book needs to cut responses into turns."""

    max_turns: int
    markers: Markers
    encode: Callable[[str], list[int]]  # text -> token ids, without special tokens


def code_open_at_end(text: str, m: Markers) -> bool:
    """Whether ``text`` ends inside a code block: a prompt that opens one makes the
    response's first tokens code."""
    start = text.rfind(m.code_start)
    return start >= 0 and m.code_end not in text[start + len(m.code_start):]


def find_code_block(text: str, code_open: bool, m: Markers) -> tuple[str, int] | None:
    """The first complete code block in a turn's ``text``, as (code, end of ``code_end``);
    ``code_open``: the turn began inside a block, so its code starts at once."""
    body = 0
    if not code_open:
        start = text.find(m.code_start)
        if start < 0:
            return None
        body = start + len(m.code_start)
    end = text.find(m.code_end, body)
    if end < 0:
        return None
    return text[body:end], end + len(m.code_end)


def cut_at_code_block(turn_tokens: list[int], known_clean: int, code_open: bool, m: Markers,
                      decode: Callable[[list[int]], str]) -> tuple[str, int] | None:
    """Where a turn's tokens complete a code block: (code, how many tokens to keep).

    ``known_clean``: the first tokens, already checked, complete none. The kept tokens end
    with the token that completes ``code_end``; what the engine generated after it in the
    same output is dropped. The marker may be split across tokens, so the whole turn is
    decoded rather than each token on its own.
    """
    if len(turn_tokens) <= known_clean or find_code_block(decode(turn_tokens), code_open, m) is None:
        return None
    for keep in range(known_clean + 1, len(turn_tokens) + 1):
        found = find_code_block(decode(turn_tokens[:keep]), code_open, m)
        if found is not None:
            return found[0], keep
    return None  # unreachable: the whole turn has a block


def observation_tokens(observation: str, m: Markers, encode: Callable[[str], list[int]],
                       budget: int) -> tuple[list[int], bool]:
    """The observation block's tokens, cut to the ``budget`` left in the response; and
    whether it was cut (the response then ends with finish reason "length")."""
    ids = encode(m.output_start + observation + m.output_end)
    return ids[:max(0, budget)], len(ids) > budget


@dataclass
class ToolWaitClock:
    """Running totals of the wall-clock seconds during which at least one sample waits on its
    tool (``wait_s``), and of the part of them in which the engine has no request to run
    (``idle_s``): the tool time that no other sample's generation covered.

    ``observe`` is given the state after each change of it; the time since the previous
    call counts under the state that call gave, so the totals are exact without a timer.
    """

    wait_s: float = 0.0
    idle_s: float = 0.0
    _since: float | None = field(default=None, repr=False)
    _waiting: bool = field(default=False, repr=False)
    _idle: bool = field(default=False, repr=False)

    def observe(self, now: float, calls_running: int, engine_busy: bool) -> None:
        if self._since is not None and self._waiting:
            span = max(0.0, now - self._since)
            self.wait_s += span
            if self._idle:
                self.idle_s += span
        self._since, self._waiting, self._idle = now, calls_running > 0, not engine_busy
