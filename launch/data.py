"""Prompt data: the built-in synthetic task, JSONL files, and a resumable sampler."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from conf.schema import SyntheticTaskConfig


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    answer: str
    data_source: str = "unknown"
    id: str = ""


class DataError(ValueError):
    """A data row that cannot be used; the message names the file, row and field."""


def synthetic_problems(task: SyntheticTaskConfig, num_problems: int,
                       seed: int) -> list[PromptRecord]:
    """Problems with exact integer answers, reproducible from ``seed``.

    ``sum``: ``a+b=`` (more operands make more steps). ``linear``: ``a*x+b=c, x=`` with an
    integer solution. The operand range sets the difficulty.
    """
    rng = random.Random(seed)
    low, high = task.min_operand, task.max_operand
    if low > high:
        raise DataError(f"data.synthetic.min_operand={low} exceeds max_operand={high}")
    records = []
    for i in range(num_problems):
        if task.kind == "sum":
            operands = [rng.randint(low, high) for _ in range(max(2, task.num_operands))]
            prompt, answer = "+".join(map(str, operands)) + "=", sum(operands)
        elif task.kind == "linear":
            a, x, b = rng.randint(2, 9), rng.randint(low, high), rng.randint(low, high)
            prompt, answer = f"{a}*x+{b}={a * x + b}, x=", x
        else:
            raise DataError(f"data.synthetic.kind={task.kind!r}: expected 'sum' or 'linear'")
        records.append(PromptRecord(prompt=prompt, answer=str(answer),
                                    data_source=f"synthetic_{task.kind}", id=f"{task.kind}-{seed}-{i}"))
    return records


def load_jsonl(path: str | Path) -> list[PromptRecord]:
    """Rows of ``{"prompt": str, "answer": str|number, "data_source"?: str, "id"?: str}``.

    A malformed row is an error naming the file, the 1-based row and the field;
    rows are never dropped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with path.open(encoding="utf-8") as handle:
        for row_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {row_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            for name in ("prompt", "answer"):
                if name not in row:
                    raise DataError(f"{where}: missing field '{name}'")
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise DataError(f"{where}: field 'prompt' must be a non-empty string")
            if not isinstance(row["answer"], (str, int, float)):
                raise DataError(f"{where}: field 'answer' must be a string or a number")
            records.append(PromptRecord(
                prompt=row["prompt"], answer=str(row["answer"]),
                data_source=str(row.get("data_source", path.stem)),
                id=str(row.get("id", f"{path.stem}-{row_number}"))))
    if not records:
        raise DataError(f"{path}: contains no rows")
    return records


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
