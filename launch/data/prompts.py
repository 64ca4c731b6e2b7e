"""Prompt data: records, JSONL and Parquet files, and a resumable sampler.

Two row layouts are read as they are, told apart row by row:

- lpreg's own: ``prompt``, ``answer``, optional ``data_source`` and ``id``;
- verl's (DAPO-Math-17k, verl's preprocessed benchmarks): ``prompt``, the answer in
  ``reward_model.ground_truth``, ``data_source``, and ``extra_info`` whose ``index``
  names the row.

``data.prompt_key`` and ``data.answer_key`` (dotted paths into a row) cover any other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where a verl row keeps its reference answer; used when a row has no ``answer``.
VERL_ANSWER_KEY = "reward_model.ground_truth"
# Rows converted from Arrow to Python at a time: bounds the Python copy of a large file
# to one batch beside the records built so far.
PARQUET_BATCH_ROWS = 4096


@dataclass(frozen=True)
class PromptRecord:
    # Plain text, or chat messages ({"role", "content"} pairs) for the tokenizer's template.
    prompt: str | tuple[tuple[str, str], ...]
    answer: str
    data_source: str = "unknown"
    id: str = ""
    # A verl row's ``extra_info``, as the file has it. Left out of the hash: it is usually
    # a dict, and two records with equal prompts and answers are the same problem anyway.
    extra_info: Any = field(default=None, hash=False)

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.prompt]


class DataError(ValueError):
    """A data row that cannot be used; the message names the file, row and field."""


_MISSING = object()


def lookup(row: Mapping, key: str) -> Any:
    """The value at dotted path ``key`` in ``row`` (``_MISSING`` when absent or null).

    A key that is itself a column name wins over the path it spells, so a flat column
    named ``a.b`` is still found.
    """
    if key in row:
        value = row[key]
        return _MISSING if value is None else value
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return _MISSING
        node = node[part]
    return node


def load_prompts_file(path: str | Path, prompt_key: str | None = None,
                      answer_key: str | None = None) -> list[PromptRecord]:
    """Prompt records from a ``.jsonl`` or ``.parquet`` file.

    ``prompt_key`` (default ``prompt``) and ``answer_key`` are dotted paths into a row.
    Without ``answer_key`` a row's ``answer`` is used, or, when it has none, verl's
    ``reward_model.ground_truth``. ``data_source``, ``id`` and ``extra_info`` are taken
    when present. The prompt is a string or a list of chat messages.

    A malformed row is an error naming the file, the 1-based row (and verl's
    ``extra_info.index`` when the row has one) and the field; rows are never dropped
    silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    keys = _RowKeys(prompt_key or "prompt", answer_key)
    if path.suffix == ".parquet":
        rows = _parquet_rows(path, keys)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: unsupported data format '{path.suffix}' (use .jsonl or .parquet)")
    # verl's DAPO-Math-17k repeats each of its 17k problems 100 times: equal prompts and
    # sources share one object instead of 1.8M copies.
    shared: dict = {}
    records = [_record(row, keys, str(path), path.stem, number, shared) for number, row in rows]
    if not records:
        raise DataError(f"{path}: contains no rows")
    return records


@dataclass(frozen=True)
class _RowKeys:
    prompt: str
    answer: str | None  # None: "answer", else verl's reward_model.ground_truth

    def answer_of(self, row: Mapping) -> tuple[str, Any]:
        """(the field the answer comes from, its value or ``_MISSING``).

        Without a configured key: ``answer`` when the row has one, else verl's ground truth
        when the row has a ``reward_model`` (so a verl row without it is named as such).
        """
        if self.answer is not None:
            return self.answer, lookup(row, self.answer)
        value = lookup(row, "answer")
        if value is _MISSING and isinstance(row.get("reward_model"), Mapping):
            return VERL_ANSWER_KEY, lookup(row, VERL_ANSWER_KEY)
        return "answer", value

    def paths(self) -> list[str]:
        answers = [self.answer] if self.answer is not None else ["answer", VERL_ANSWER_KEY]
        return [self.prompt, *answers, "data_source", "id", "extra_info"]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, row {number}: not valid JSON ({err.msg})") from None


def _resolves(schema, path: str) -> bool:
    """Whether ``path`` names a top-level column or a field inside struct columns."""
    import pyarrow as pa

    if path in schema.names:
        return True
    first, *rest = path.split(".")
    if first not in schema.names:
        return False
    node = schema.field(first).type
    for part in rest:
        if not pa.types.is_struct(node) or node.get_field_index(part) < 0:
            return False
        node = node.field(part).type
    return True


def _parquet_columns(schema, paths: list[str]) -> list[str]:
    """The column selections that read ``paths`` and nothing else: a top-level column, or
    one field of a struct column (``reward_model.ground_truth`` without ``style``). A
    path the file does not have is left out: its rows lack it, and the row check names it."""
    found = [p for p in dict.fromkeys(paths) if _resolves(schema, p)]
    whole = {p for p in found if p in schema.names}
    return [p for p in found if p in whole or p.split(".")[0] not in whole]


def _parquet_rows(path: Path, keys: _RowKeys) -> Iterator[tuple[int, Any]]:
    """Rows, one record batch at a time, reading only the columns the records need."""
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(path)
        columns = _parquet_columns(parquet.schema_arrow, keys.paths())
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except Exception as err:  # noqa: BLE001 - any reader failure is a data error here
        where = f"{path}, after row {number}" if number else str(path)
        raise DataError(f"{where}: cannot read as Parquet ({err})") from None


def _record(row: Any, keys: _RowKeys, file: str, default_source: str, number: int,
            shared: dict) -> PromptRecord:
    where = f"{file}, row {number}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with '{keys.prompt}' and an answer")
    extra_info = row.get("extra_info")
    index = extra_info.get("index") if isinstance(extra_info, Mapping) else None
    if index is not None:
        where += f" (index {index})"

    prompt = lookup(row, keys.prompt)
    if prompt is _MISSING:
        raise DataError(f"{where}: missing field '{keys.prompt}'")
    if isinstance(prompt, list):
        prompt = _messages(prompt, where, keys.prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: field '{keys.prompt}' must be a non-empty string or a list "
                        "of chat messages")

    answer_field, answer = keys.answer_of(row)
    if answer is _MISSING:
        raise DataError(f"{where}: missing field '{answer_field}'")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field '{answer_field}' must be a string or a number")

    if row.get("id") is not None:
        record_id = str(row["id"])
    else:
        record_id = f"{default_source}-{index if index is not None else number}"
    data_source = str(row.get("data_source") or default_source)
    return PromptRecord(prompt=shared.setdefault(prompt, prompt), answer=str(answer),
                        data_source=shared.setdefault(data_source, data_source),
                        id=record_id, extra_info=extra_info)


def _messages(messages: list, where: str, name: str) -> tuple[tuple[str, str], ...]:
    if not messages:
        raise DataError(f"{where}: field '{name}' is an empty message list")
    out = []
    for i, message in enumerate(messages):
        if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field '{name}[{i}]' must be an object with string "
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
