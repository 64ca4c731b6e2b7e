"""The built-in synthetic tasks: generated problems with exact, verifiable answers.

``sum``: ``a+b=`` (more operands make more steps). ``linear``: ``a*x+b=c, x=`` with an
integer solution. ``fraction``: ``a/b+c/d=`` (numerators from the operand range,
denominators 2-9), answered in lowest terms as ``p/q``, or ``p`` when it is whole.
``spark_sum``: the problems of ``sum`` (meant with ``num_operands=4``), whose warm-start
responses (``warm_start_response``) are mixed: mostly a direct guess, sometimes the guess
followed by a "reasoning spark" token, a worked recheck and a corrected answer, in the
spirit of Fig. 1a of the Lp-Reg paper (see docs/data.md). ``tool_product``: ``a*b=`` (meant
with 3-digit operands), beyond the tiny model's head but one line of Python away: its
warm-start responses are mostly a direct guess, sometimes a program that prints the product,
its output, and the answer copied from it (see docs/multi_turn.md).
The operand range sets the difficulty.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

from conf.schema import SyntheticTaskConfig
from launch.data.prompts import DataError, PromptRecord
from rollout.multi_turn import Markers

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


def product_problem(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    a, b = (rng.randint(task.min_operand, task.max_operand) for _ in range(2))
    return f"{a}*{b}=", a * b


# data.synthetic.kind -> generator; conf.schema.SYNTHETIC_KINDS names the same keys.
SYNTHETIC_TASKS: dict[str, Callable[[random.Random, SyntheticTaskConfig], Problem]] = {
    "sum": sum_problem,
    "linear": linear_problem,
    "fraction": fraction_problem,
    "spark_sum": sum_problem,
    "tool_product": product_problem,
}
# Kinds whose warm start writes tool calls, in the run's tool markers (tool.code_start, ...).
TOOL_KINDS = frozenset({"tool_product"})

# spark_sum's warm-start responses. Every symbol is a character the tiny tokenizer already
# has, so the tokenizer (and every other task's model) stays as it is.
SPARK_TOKEN = "W"
# The spark's share at its decision position, just after the first answer: rare, as a
# reasoning spark is in a base model, so that plain policy gradient can stamp it out.
SPARK_SHARE = 0.10
# Inert distractors at the same position: a symbol, then the end; the answer stands. They
# are the noise tail that Lp-Reg's min-p filter is meant to remove (about 0.5% each).
DISTRACTORS = tuple("#$&@~^|?")
DISTRACTOR_SHARE = 0.04
# A spark follows a doubtful guess: in this share of the spark responses the guess is off
# by a few units or tens, and the recheck corrects it.
SPARK_WRONG_GUESS = 0.5


def _boxed(answer: object) -> str:
    return "\\boxed{" + str(answer) + "}"


def spark_response(prompt: str, answer: str, rng: random.Random) -> str:
    """One warm-start response to a ``spark_sum`` problem ``a+b+...=``.

    Direct: ``\\boxed{180}``. Spark: the guess, ``W``, the running sums
    ``12+34=46+56=102+78=180`` and the corrected answer ``\\boxed{180}``; the verifier reads
    the last box, so both paths are scored on their final answer. Distractor: the guess and
    one inert symbol."""
    operands = [int(x) for x in prompt.rstrip("=").split("+")]
    draw = rng.random()
    if draw < SPARK_SHARE:
        guess = int(answer)
        if rng.random() < SPARK_WRONG_GUESS:
            guess += rng.choice((-1, 1)) * rng.choice((1, 2, 10, 20))
        chain, total = str(operands[0]), operands[0]
        for value in operands[1:]:
            total += value
            chain += f"+{value}={total}"
        return f"{_boxed(guess)}{SPARK_TOKEN}{chain}{_boxed(total)}"
    if draw < SPARK_SHARE + DISTRACTOR_SHARE:
        return _boxed(answer) + rng.choice(DISTRACTORS)
    return _boxed(answer)


def warm_start_response(kind: str, prompt: str, answer: str, rng: random.Random) -> str:
    """The supervised response the tiny model's warm start trains on for one problem."""
    if kind == "spark_sum":
        return spark_response(prompt, answer, rng)
    return _boxed(answer)


# tool_product's warm start: the share of responses that call the tool. A minority, so
# that RL has a tool-call rate to raise; the rest answer in one guess, rarely right.
TOOL_SHARE = 0.2


def product_program(prompt: str) -> str:
    """The program a tool-using response writes for ``a*b=``."""
    return f"print({prompt.rstrip('=')})"


def program_output(answer: str) -> str:
    """What ``product_program`` prints, as the sandbox returns it: with print's newline."""
    return f"{answer}\n"


# A warm-start response as pieces: (text, trained). The tool's output is not the model's
# to write, so it is not trained on, as it is masked out of the RL loss.
Segments = list[tuple[str, bool]]


def tool_call_segments(prompt: str, answer: str, markers: Markers) -> Segments:
    """``<code_start>print(a*b)<code_end>``, the output block, then ``\\boxed{answer}``."""
    return [(markers.code_start + product_program(prompt) + markers.code_end, True),
            (markers.output_start + program_output(answer) + markers.output_end, False),
            (_boxed(answer), True)]


def warm_start_segments(kind: str, prompt: str, answer: str, rng: random.Random,
                        markers: Markers | None = None) -> Segments:
    """``warm_start_response`` in pieces, with the tool-using responses of the tool kinds."""
    if kind in TOOL_KINDS:
        if markers is None:
            raise ValueError(f"data.synthetic.kind={kind} needs the tool markers for its warm start")
        if rng.random() < TOOL_SHARE:
            return tool_call_segments(prompt, answer, markers)
        return [(_boxed(answer), True)]
    return [(warm_start_response(kind, prompt, answer, rng), True)]


def final_answer(response: str) -> str | None:
    """What the verifier reads from a warm-start-style response: the last ``\\boxed{}``."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    end = response.find("}", start)
    return response[start + len("\\boxed{"):end] if end >= 0 else None


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
