"""The built-in synthetic tasks: generated problems with exact, verifiable answers."""

from __future__ import annotations

import random
from fractions import Fraction

from conf.schema import SyntheticTaskConfig
from launch.data.prompts import DataError, PromptRecord

SYNTHETIC_KINDS = ("sum", "linear", "fraction")


def synthetic_problems(task: SyntheticTaskConfig, num_problems: int,
                       seed: int) -> list[PromptRecord]:
    """Problems with exact integer answers, reproducible from ``seed``.

    ``sum``: ``a+b=`` (more operands make more steps). ``linear``: ``a*x+b=c, x=`` with an
    integer solution. ``fraction``: ``a/b+c/d=`` (numerators from the operand range,
    denominators 2-9), answered in lowest terms as ``p/q``, or ``p`` when it is whole.
    The operand range sets the difficulty.
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
        elif task.kind == "fraction":
            terms = [(rng.randint(low, high), rng.randint(2, 9))
                     for _ in range(max(2, task.num_operands))]
            prompt = "+".join(f"{n}/{d}" for n, d in terms) + "="
            total = sum(Fraction(n, d) for n, d in terms)
            answer = total.numerator if total.denominator == 1 else f"{total.numerator}/{total.denominator}"
        else:
            raise DataError(f"data.synthetic.kind={task.kind!r}: expected one of "
                            f"{', '.join(SYNTHETIC_KINDS)}")
        records.append(PromptRecord(prompt=prompt, answer=str(answer),
                                    data_source=f"synthetic_{task.kind}", id=f"{task.kind}-{seed}-{i}"))
    return records
