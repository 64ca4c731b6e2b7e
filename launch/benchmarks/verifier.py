"""How fast the verifier scores, and what a batch with bombs costs.

Responses are ~2 KB of reasoning text ending in a boxed answer, grouped as in GRPO:
``--group-size`` samples per prompt share one reference answer, half of them correct
(written in the reference's form or an equivalent one), half wrong.

Answer mixes:
- ``int``: integer answers only, like DAPO-Math-17k;
- ``mixed``: MATH-like: 55% integers, the rest fractions, radicals and pi, points and
  intervals, polynomials, units/degrees/text;
- ``symbolic``: ``mixed`` without the integers, i.e. every answer goes to math-verify.

Reported:
- throughput, responses per second of wall time, over ``--n`` responses scored in
  batches of ``--batch-size`` by a warm pool (one warm-up batch first);
- the same per CPU-second (parent plus workers, from ``/proc``): on a shared machine
  wall time depends on the neighbours, CPU time much less. Responses per CPU-second
  times the number of idle cores is what an otherwise idle machine would reach. These
  runs don't park slow workers (``park_after_s`` = timeout), so every worker lives
  through the run and its CPU time is counted;
- the wall time of one batch of 1,000 ``mixed`` responses of which ``--bombs`` are
  bombs (power towers, deep nesting, a 1 MB response, ``\\frac{1}{0}``), next to the
  same batch without them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable

from verifier import MathVerifier

FILLER = (
    "We begin by restating the problem and identifying the quantities involved. "
    "Let $x$ denote the unknown; substituting into the given relation gives $2x + 3 = 7$, "
    "so we isolate the variable step by step and double-check each manipulation. "
    "Next we verify the boundary cases and make sure no solution is lost when dividing. "
)


def _filler(rng: random.Random, size: int = 1900) -> str:
    text = ""
    while len(text) < size:
        text += FILLER.replace("7", str(rng.randint(5, 99)))
    return text[:size]


Answer = tuple[str, str, str]  # reference, an equivalent correct form, a wrong answer


def _int(rng: random.Random) -> Answer:
    v = rng.randint(-50, 5000)
    return str(v), str(v), str(v + rng.choice([-2, -1, 1, 3]))


def _frac(rng: random.Random) -> Answer:
    a, b = rng.randint(1, 97), rng.randint(2, 97)
    return (
        f"\\frac{{{a}}}{{{b}}}",
        rng.choice([f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{2 * a}}}{{{2 * b}}}"]),
        f"\\frac{{{a + 1}}}{{{b}}}",
    )


def _radical(rng: random.Random) -> Answer:
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
    return rng.choice(
        [
            (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{{{b + 1}}}"),
            (f"\\frac{{{a}\\pi}}{{{b}}}", f"\\frac{{{a}}}{{{b}}}\\pi", f"\\frac{{{a + 1}\\pi}}{{{b}}}"),
        ]
    )


def _point(rng: random.Random) -> Answer:
    a, b = rng.randint(-9, 9), rng.randint(10, 30)
    return rng.choice(
        [
            (f"({a}, {b})", f"({a},{b})", f"({b}, {a})"),
            (f"[{a}, {b})", f"[{a},{b})", f"[{a}, {b}]"),
        ]
    )


def _poly(rng: random.Random) -> Answer:
    a = rng.randint(1, 9)
    return f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2", f"(x+{a + 1})^2"


def _text(rng: random.Random) -> Answer:
    v = rng.randint(10, 170)
    return rng.choice(
        [
            (f"{v}^\\circ", f"{v}", f"{v + 10}^\\circ"),
            (f"{v}", f"{v} \\text{{ cm}}", f"{v + 1} \\text{{ cm}}"),
            ("\\text{(B)}", "\\text{(B)}", "\\text{(C)}"),
        ]
    )


MIXES: dict[str, list[tuple[float, Callable[[random.Random], Answer]]]] = {
    "int": [(1.0, _int)],
    "mixed": [(0.55, _int), (0.12, _frac), (0.10, _radical), (0.08, _point), (0.07, _poly), (0.08, _text)],
    "symbolic": [(0.12, _frac), (0.10, _radical), (0.08, _point), (0.07, _poly), (0.08, _text)],
}


def make_batch(
    n: int, mix: str, group_size: int, rng: random.Random
) -> tuple[list[str], list[str], list[float]]:
    """Responses, reference answers and the reward each response should get."""
    weights, makers = zip(*MIXES[mix], strict=True)
    responses: list[str] = []
    references: list[str] = []
    expected: list[float] = []
    while len(responses) < n:
        reference, right, wrong = rng.choices(makers, weights)[0](rng)
        for _ in range(group_size):
            correct = rng.random() < 0.5
            final = rng.choice([reference, right]) if correct else wrong
            responses.append(f"{_filler(rng)}\n\nTherefore the final answer is $\\boxed{{{final}}}$.")
            references.append(reference)
            expected.append(1.0 if correct else 0.0)
    return responses[:n], references[:n], expected[:n]


def make_bombs(k: int) -> list[str]:
    shapes = [
        lambda i: f"\\boxed{{{7 + i}^{{{7 + i}^{{{7 + i}^{{{7 + i}}}}}}}}}",
        lambda i: "\\boxed{" + "(" * 10_000 + str(i) + ")" * 10_000 + "}",
        lambda i: "x" * 1_000_000 + f" \\boxed{{{i}}}",
        lambda i: f"\\boxed{{\\frac{{{i + 1}}}{{0}}}}",
        lambda i: f"\\boxed{{{{{10 + i}!}}!}}",
    ]
    return [shapes[i % len(shapes)](i) for i in range(k)]


def _cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_cpu(verifier: MathVerifier) -> dict[int, float]:
    return {pid: cpu for pid in verifier.worker_pids() if (cpu := _cpu_s(pid)) is not None}


def _throughput(verifier: MathVerifier, mix: str, args: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    warm_r, warm_a, _ = make_batch(args.batch_size, mix, args.group_size, rng)
    verifier.score_batch(warm_r, warm_a)
    done = 0
    elapsed = 0.0
    cpu = 0.0
    wrong = 0
    timeouts = 0
    while done < args.n:
        size = min(args.batch_size, args.n - done)
        responses, answers, expected = make_batch(size, mix, args.group_size, rng)
        workers_before = _worker_cpu(verifier)
        parent_before = time.process_time()
        start = time.perf_counter()
        report = verifier.score_batch_detailed(responses, answers)
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - parent_before
        # Workers replaced during the batch are not counted, so this is a lower bound.
        for pid, after in _worker_cpu(verifier).items():
            cpu += after - workers_before.get(pid, after)
        done += size
        wrong += sum(1 for got, want in zip(report.scores, expected, strict=True) if got != want)
        timeouts += report.timeouts
    return {
        "mix": mix,
        "responses": done,
        "seconds": round(elapsed, 3),
        "per_second": round(done / elapsed, 1),
        "cpu_seconds": round(cpu, 3),
        "per_cpu_second": round(done / cpu, 1) if cpu > 0 else None,
        "wrong_rewards": wrong,
        "timeouts": timeouts,
    }


def _bomb_batch(verifier: MathVerifier, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed + 1000)
    verifier.wait_ready()
    warm_r, warm_a, _ = make_batch(args.batch_size, "mixed", args.group_size, rng)
    verifier.score_batch(warm_r, warm_a)
    responses, answers, _ = make_batch(1000, "mixed", args.group_size, rng)
    start = time.perf_counter()
    verifier.score_batch(responses, answers)
    clean_s = time.perf_counter() - start

    responses, answers, _ = make_batch(1000, "mixed", args.group_size, rng)
    slots = rng.sample(range(1000), args.bombs)
    for slot, bomb in zip(slots, make_bombs(args.bombs), strict=True):
        responses[slot] = bomb
    start = time.perf_counter()
    report = verifier.score_batch_detailed(responses, answers)
    bombs_s = time.perf_counter() - start
    return {
        "responses": 1000,
        "bombs": args.bombs,
        "timeout_s": args.timeout_s,
        "clean_batch_s": round(clean_s, 2),
        "batch_with_bombs_s": round(bombs_s, 2),
        "timeouts": report.timeouts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench verifier", description=__doc__.split("\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--n", type=int, default=2048, help="responses per throughput run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--mix", choices=[*MIXES, "all"], default="all")
    parser.add_argument("--bombs", type=int, default=10, help="bombs in the 1,000-response batch; 0 skips it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--park-after-s", type=float, default=None, help="throughput runs: the pool's park_after_s"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    results: dict = {"num_workers": args.num_workers}
    start = time.perf_counter()
    with MathVerifier(
        timeout_s=args.timeout_s, num_workers=args.num_workers, park_after_s=args.timeout_s
    ) as verifier:
        verifier.wait_ready()
        results["startup_s"] = round(time.perf_counter() - start, 2)
        mixes = list(MIXES) if args.mix == "all" else [args.mix]
        results["throughput"] = [_throughput(verifier, m, args, args.seed + i) for i, m in enumerate(mixes)]
    if args.bombs:
        with MathVerifier(timeout_s=args.timeout_s, num_workers=args.num_workers) as verifier:
            results["bomb_batch"] = _bomb_batch(verifier, args)

    if args.json:
        print(json.dumps(results))
        return 0
    print(f"verifier benchmark: {args.num_workers} workers, timeout {args.timeout_s:g} s")
    print(f"  start-up (fork server warm-up + workers): {results['startup_s']} s")
    load = os.getloadavg()[0]
    print(f"  load average: {load:.1f} on {os.cpu_count()} CPUs (wall-time numbers depend on it)")
    for row in results["throughput"]:
        print(
            f"  {row['mix']:>8}: {row['per_second']:8.1f} responses/s wall, "
            f"{row['per_cpu_second']} per CPU-second "
            f"({row['responses']} in {row['seconds']} s, wrong rewards {row['wrong_rewards']}, "
            f"timeouts {row['timeouts']})"
        )
    if args.bombs:
        b = results["bomb_batch"]
        print(
            f"  1,000 mixed responses: {b['clean_batch_s']} s clean; "
            f"{b['batch_with_bombs_s']} s with {b['bombs']} bombs ({b['timeouts']} timeouts)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
