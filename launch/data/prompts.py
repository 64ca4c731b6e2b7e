"""Prompt data: records, JSONL and Parquet files, and a resumable sampler."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptRecord:
    # Plain text, or chat messages ({"role", "content"} pairs) for the tokenizer's template.
    prompt: str | tuple[tuple[str, str], ...]
    answer: str
    data_source: str = "unknown"
    id: str = ""

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.prompt]


class DataError(ValueError):
    """A data row that cannot be used; the message names the file, row and field."""


def load_prompts_file(path: str | Path) -> list[PromptRecord]:
    """Rows of ``prompt`` (string or chat messages), ``answer``, optional ``data_source``
    and ``id``, from a ``.jsonl`` or ``.parquet`` file.

    A malformed row is an error naming the file, the 1-based row and the field; rows are
    never dropped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: unsupported data format '{path.suffix}' (use .jsonl or .parquet)")
    records = [_record(row, f"{path}, row {number}", path.stem, number) for number, row in rows]
    if not records:
        raise DataError(f"{path}: contains no rows")
    return records


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, row {number}: not valid JSON ({err.msg})") from None


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a data error here
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _record(row, where: str, default_source: str, number: int) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'answer'")
    for name in ("prompt", "answer"):
        if row.get(name) is None:
            raise DataError(f"{where}: missing field '{name}'")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = _messages(prompt, where)
    elif not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of "
                        "chat messages")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field 'answer' must be a string or a number")
    return PromptRecord(prompt=prompt, answer=str(answer),
                        data_source=str(row.get("data_source") or default_source),
                        id=str(row.get("id") or f"{default_source}-{number}"))


def _messages(messages: list, where: str) -> tuple[tuple[str, str], ...]:
    if not messages:
        raise DataError(f"{where}: field 'prompt' is an empty message list")
    out = []
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field 'prompt[{i}]' must be an object with string "
                            "'role' and 'content'")
        out.append((message["role"], message["content"]))
    return tuple(out)


class PromptSampler:
    """Draws prompt batches from a fresh shuffle each epoch; its state is two ints."""

    def __init__(self, records: list[PromptRecord], batch_size: int, seed: int):
        if batch_size > len(records):
            raise DataError(f"data.prompts_per_step={batch_size} exceeds the "
                            f"{len(records)} prompts available")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptRecord]:
        if self.position + self.batch_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._shuffle(self.epoch)
        picked = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.records[i] for i in picked]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle(self.epoch)
