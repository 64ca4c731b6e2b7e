"""Final-answer extraction and cheap pre-checks, run in the parent process.

Everything here is plain string scanning that is linear in the input, so it is safe to
run on hostile text without a timeout. Nothing here decides that two different answers
are equivalent: that is left to math-verify in the worker processes. The only verdicts
given here are ones math-verify would give too (identical strings, two plain integers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

DEFAULT_BOXED_COMMANDS: tuple[str, ...] = ("boxed", "fbox")

# A backslash escape (which may hide a brace) or a brace; used to walk brace nesting
# without a per-character Python loop.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)

# "Answer: ...", "Final answer: ...", "**Answer:** ..." at the start of a line.
# Only [ \t] and single-line classes are used so that the scan stays linear even on
# megabytes of newlines or spaces.
_ANSWER_LINE = re.compile(
    r"^[ \t>#*_-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(?P<value>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)

_PLAIN_INT = re.compile(r"[+-]?\d{1,64}")
_BARE_TOKEN = re.compile(r"[^\s$]+")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the brace closing the one at ``open_pos``, or None if it never closes."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
        # Escapes such as \{ and \} are skipped: they are literal braces in LaTeX.
    return None


@lru_cache(maxsize=16)
def _command_pattern(commands: tuple[str, ...]) -> re.Pattern[str]:
    # Not followed by a letter: \boxed but not \boxedsymbol.
    names = "|".join(re.escape(name) for name in commands)
    return re.compile(rf"\\(?:{names})(?![A-Za-z])")


def extract_boxed(text: str, commands: Sequence[str] = DEFAULT_BOXED_COMMANDS) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` (or other listed command), brace-matched.

    A box nested in another box is part of the outer one's content. ``\\boxed 5`` (no
    braces) yields the following token. If the last box never closes, the answer is
    None rather than an earlier box: an earlier box is usually an intermediate result.

    One forward pass: each box's content is skipped once matched, and an unclosed box
    ends the scan, so the time is linear in ``len(text)``.
    """
    pattern = _command_pattern(tuple(commands))
    n = len(text)
    last: str | None = None
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "{":
            close = _match_braces(text, i)
            if close is None:
                return None
            last = text[i + 1 : close]
            pos = close + 1
        else:
            token = _BARE_TOKEN.match(text, i)
            last = token.group() if token else None
            pos = token.end() if token else i
    if last is None:
        return None
    return last.strip() or None


def _unwrap(value: str) -> str:
    value = value.strip().rstrip("*").rstrip()  # "**Answer: 18**"
    changed = True
    while changed and value:
        changed = False
        if value.endswith("."):
            value = value[:-1].rstrip()
            changed = True
        for left, right in _WRAPPERS:
            if len(value) > len(left) + len(right) and value.startswith(left) and value.endswith(right):
                value = value[len(left) : -len(right)].strip()
                changed = True
    return value


def extract_answer_line(text: str) -> str | None:
    """Value of the last ``Answer: ...`` line, without surrounding ``$``, ``**`` or a final period."""
    last = None
    for match in _ANSWER_LINE.finditer(text):
        last = match
    if last is None:
        return None
    return _unwrap(last.group("value")) or None


def extract_answer(
    response: str,
    *,
    boxed_commands: Sequence[str] = DEFAULT_BOXED_COMMANDS,
    answer_line_fallback: bool = True,
) -> str | None:
    """The final answer of a response: the last boxed expression, else an ``Answer:`` line.

    ``boxed_commands=()`` disables boxed extraction; ``answer_line_fallback=False``
    disables the fallback. Returns None when the response has no final answer.
    """
    if boxed_commands:
        boxed = extract_boxed(response, boxed_commands)
        if boxed is not None:
            return boxed
    if answer_line_fallback:
        return extract_answer_line(response)
    return None


def nesting_depth(text: str) -> int:
    """Deepest nesting of (), [] and {} (unbalanced closers are ignored); linear time."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}" and depth:
            depth -= 1
    return best


def quick_verdict(answer: str, reference: str) -> bool | None:
    """A verdict math-verify would also reach, without parsing; None when it needs parsing.

    Identical non-empty strings parse identically, and two plain integers are equal
    exactly when their values are. Everything else goes to math-verify.
    """
    a = answer.strip()
    b = reference.strip()
    if a and a == b:
        return True
    if _PLAIN_INT.fullmatch(a) and _PLAIN_INT.fullmatch(b):
        return int(a) == int(b)
    return None
