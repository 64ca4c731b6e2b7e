"""The built-in synthetic tasks: generated problems with exact, verifiable answers.

``sum``: ``a+b=`` (more operands make more steps). ``linear``: ``a*x+b=c, x=`` with an
integer solution. ``fraction``: ``a/b+c/d=`` (numerators from the operand range,
denominators 2-9), answered in lowest terms as ``p/q``, or ``p`` when it is whole.
The operand range sets the difficulty.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

from conf.schema import SyntheticTaskConfig
from launch.data.prompts import DataError, PromptRecord

# One problem from a random source: (prompt, answer).
Problem = tuple[str, object]


def sum_problem(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    operands = [rng.randint(task.min_operand, task.max_operand) for _ in range(task.num_operands)]
    return "+".join(map(str, operands)) + "=", sum(operands)


def linear_problem(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    a = rng.randint(2, 9)
    x, b = rng.randint(task.min_operand, task.max_operand), rng.randint(task.min_operand, task.max_operand)
    return f"{a}*x+{b}={a * x + b}, x=", x


def fraction_problem(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    terms = [(rng.randint(task.min_operand, task.max_operand), rng.randint(2, 9))
             for _ in range(task.num_operands)]
    total = sum(Fraction(n, d) for n, d in terms)
    answer = total.numerator if total.denominator == 1 else f"{total.numerator}/{total.denominator}"
    return "+".join(f"{n}/{d}" for n, d in terms) + "=", answer


# data.synthetic.kind -> generator; conf.schema.SYNTHETIC_KINDS names the same keys.
SYNTHETIC_TASKS: dict[str, Callable[[random.Random, SyntheticTaskConfig], Problem]] = {
    "sum": sum_problem,
    "linear": linear_problem,
    "fraction": fraction_problem,
}


def synthetic_problems(task: SyntheticTaskConfig, num_problems: int,
                       seed: int) -> list[PromptRecord]:
    """``num_problems`` problems of ``task.kind``, reproducible from ``seed``."""
    if task.kind not in SYNTHETIC_TASKS:
        raise DataError(f"data.synthetic.kind={task.kind!r}: expected one of {', '.join(SYNTHETIC_TASKS)}")
    if task.min_operand > task.max_operand:
        raise DataError(f"data.synthetic.min_operand={task.min_operand} exceeds "
                        f"max_operand={task.max_operand}")
    make = SYNTHETIC_TASKS[task.kind]
    rng = random.Random(seed)
    records = []
    for i in range(num_problems):
        prompt, answer = make(rng, task)
        records.append(PromptRecord(prompt=prompt, answer=str(answer),
                                    data_source=f"synthetic_{task.kind}", id=f"{task.kind}-{seed}-{i}"))
    return records
