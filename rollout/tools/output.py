"""A program's output, kept within a bound however much it prints.

The model sees the first and the last part of the output: the start says what the program
was doing, the end holds the result or the traceback. What lies between is only counted,
so 100 MB of output costs the same memory as a screenful.
"""

from __future__ import annotations

import codecs


def truncation_marker(omitted: int) -> str:
    return f"\n... [output truncated: {omitted} characters omitted] ...\n"


class BoundedOutput:
    """Feed bytes as they arrive; ``text()`` gives at most ``max_chars`` of them, decoded,
    with a marker that says how many characters were left out in the middle."""

    def __init__(self, max_chars: int) -> None:
        self.head_max = max_chars - max_chars // 2
        self.tail_max = max_chars // 2
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._head: list[str] = []
        self._head_len = 0
        self._tail = ""
        self.total_chars = 0

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        self.total_chars += len(text)
        if self._head_len < self.head_max:
            take = text[:self.head_max - self._head_len]
            self._head.append(take)
            self._head_len += len(take)
            text = text[len(take):]
        if text and self.tail_max:
            self._tail = (self._tail + text)[-self.tail_max:]

    @property
    def omitted(self) -> int:
        return self.total_chars - self._head_len - len(self._tail)

    def text(self) -> str:
        self.feed(b"", final=True)
        head = "".join(self._head)
        if not self.omitted:
            return head + self._tail
        return head + truncation_marker(self.omitted) + self._tail


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` cut the same way as a program's output; and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    head = max_chars - max_chars // 2
    tail = max_chars // 2
    return text[:head] + truncation_marker(len(text) - head - tail) + (text[-tail:] if tail else ""), True
