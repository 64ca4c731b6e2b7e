"""Multi-turn rollouts against single-turn ones: what tool calls cost the engine.

Two RolloutWorker actors on one random tiny model, measured in alternating rounds of one
run, so slow drift of a shared machine hits both alike:

- multi-turn: ``rollout.max_turns = --max-turns``; every closed code block leaves the
  engine, runs in the sandbox with the built-in python tool, and comes back as a new
  request with the observation appended;
- single-turn: ``rollout.max_turns = 0``, the same prompts, samples, seeds and response
  length.

    lpreg bench multi_turn [--prompts 4] [--n 4] [--max-tokens 512] [--rounds 3]
                           [--max-turns 4] [--tool-sleep 0] [--tool-concurrency 4]
                           [--json PATH]

The model is ``lpreg bench rollout``'s: random, with no end-of-sequence token, so every
response runs to --max-tokens on both sides, observations included on the multi-turn
side. A random model writes no code of its own, so the markers force it, as the
multi-turn integration test does: the tiny model spells one token per character, and
each code marker is one character that this random model writes about once in 40
tokens. Every prompt (on both sides) ends with ``tool.code_start``, "R", so each
response begins inside a code block; ``tool.code_end``, "f", closes it; the next "R"
opens the next one. The code is gibberish, and its traceback, which quotes it, is the
observation.

Reported for each side: model tokens per second (the tokens the policy sampled, mask 1;
observation tokens are counted apart), and for the multi-turn side how the wall time
splits while at least one sample waits on its tool: the engine generating for the
others, or idle with no request to run. The idle part over the waiting time is what
training logs as ``tool/engine_idle_frac``.

``--tool-sleep S`` makes every sandboxed program sleep S seconds before the model's code
runs: a slow tool, to show the engine generating while it waits. The sandbox then runs
an interpreter of a throwaway virtual environment (in /var/tmp) whose site-packages
holds a ``.pth`` line that sleeps; the tool, the sandbox and its limits are otherwise
the run's own.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_ROUND_SEEDS = itertools.count(1)
WARM_UP_TOKENS = 32  # a short first round loads what each engine and the sandbox load lazily
SIDES = ("single", "multi")
# One character each. The code markers are two of the characters the random tiny model
# writes most, each about 2.5% of its tokens: turns of about 40 tokens, and room for
# several calls per response.
CODE_START, CODE_END, OUTPUT_START, OUTPUT_END = "R", "f", "[", "]"
# Only the program sleeps: the sandbox's launcher starts its interpreter with -S, no site.
SLEEP_PTH = "lpreg_bench_tool_sleep.pth"
# bwrap mounts a fresh tmpfs on /tmp, which would hide an interpreter kept there.
INTERPRETER_DIR = "/var/tmp"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpreg bench multi_turn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="response length on both sides, observations included")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-turns", type=int, default=4, help="tool calls per response")
    parser.add_argument("--tool-sleep", type=float, default=0.0,
                        help="seconds every sandboxed program sleeps before the model's code")
    parser.add_argument("--tool-concurrency", type=int, default=4,
                        help="programs at once in the worker (tool.max_concurrency)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompts", "n", "max_tokens", "rounds", "max_turns", "tool_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tool_sleep < 0:
        parser.error("--tool-sleep must not be negative")
    return args


def tool_config(args: argparse.Namespace, python: str | None = None):
    """The multi-turn worker's tool settings: forced markers, the default sandbox."""
    from conf.schema import ToolConfig

    return ToolConfig(code_start=CODE_START, code_end=CODE_END, output_start=OUTPUT_START,
                      output_end=OUTPUT_END, max_concurrency=args.tool_concurrency, python=python)


def rollout_config(args: argparse.Namespace, side: str, max_model_len: int):
    from conf.schema import RolloutConfig

    return RolloutConfig(num_workers=1, samples_per_prompt=args.n, max_response_tokens=args.max_tokens,
                         cpus_per_worker=1, max_model_len=max_model_len,
                         max_turns=args.max_turns if side == "multi" else 0)


def sleep_line(seconds: float) -> str:
    """A ``.pth`` line: ``site`` runs lines that start with "import" as the interpreter starts."""
    return f"import time; time.sleep({float(seconds)!r})\n"


def sleepy_python(base_python: str, directory: Path, seconds: float) -> str:
    """An interpreter that sleeps ``seconds`` at start: a virtual environment of
    ``base_python`` in ``directory`` with ``sleep_line`` in its site-packages."""
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(directory)], check=True)
    (site_packages,) = directory.glob("lib/python*/site-packages")
    (site_packages / SLEEP_PTH).write_text(sleep_line(seconds))
    # The sandbox user owns nothing here and must still read the interpreter.
    for path in [directory, *directory.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return str(directory / "bin" / "python")


@dataclass
class Round:
    """One side's round: its wall time, what its responses hold, and its tool waits."""

    side: str
    seconds: float
    samples: int
    model_tokens: int
    observation_tokens: int
    calls: int
    tool_wait_s: float = 0.0  # with at least one sample waiting on its tool
    tool_idle_s: float = 0.0  # the part of it with no request on the engine


def count_round(side: str, seconds: float, groups, tool_wait: tuple[float, float] = (0.0, 0.0)) -> Round:
    """``groups``: the round's ``GroupResult`` records; ``tool_wait``: the worker's
    (wait, idle) seconds over the round."""
    samples = [s for g in groups for s in g.samples]
    model = sum(sum(s.policy_mask()) for s in samples)
    total = sum(len(s.response_token_ids) for s in samples)
    calls = sum(len(s.tool_calls or []) for s in samples)
    return Round(side, seconds, len(samples), model, total - model, calls, *tool_wait)


def summarize(rounds: list[Round]) -> dict:
    """Medians of the rounds' throughput, per-answer means, and the multi-turn side's
    wall-time shares over all its rounds."""
    result: dict = {}
    for side in SIDES:
        mine = [r for r in rounds if r.side == side]
        samples = sum(r.samples for r in mine)
        by_round = [r.model_tokens / r.seconds for r in mine]
        result[side] = {
            "model_tokens_per_s": statistics.median(by_round),
            "model_tokens_per_answer": sum(r.model_tokens for r in mine) / samples,
            "observation_tokens_per_answer": sum(r.observation_tokens for r in mine) / samples,
            "calls_per_answer": sum(r.calls for r in mine) / samples,
            # Every round, to see how much the neighbours on a shared machine moved them.
            "model_tokens_per_s_by_round": by_round,
        }
    multi = [r for r in rounds if r.side == "multi"]
    wall = sum(r.seconds for r in multi)
    wait = sum(r.tool_wait_s for r in multi)
    idle = sum(r.tool_idle_s for r in multi)
    result["ratio_multi_over_single"] = (result["multi"]["model_tokens_per_s"]
                                         / result["single"]["model_tokens_per_s"])
    result["tool_wait_share"] = wait / wall
    result["engine_busy_while_waiting_share"] = (wait - idle) / wall
    result["engine_idle_while_waiting_share"] = idle / wall
    result["tool/engine_idle_frac"] = idle / wait if wait > 0 else 0.0
    return result


def format_table(result: dict) -> str:
    lines = [f"workload: {result['workload']}",
             f"{'':20s} {'model tok/s':>12s} {'model tok/answer':>17s} {'obs tok/answer':>15s} "
             f"{'calls/answer':>13s}"]
    for side, name in (("single", "single-turn"), ("multi", "multi-turn")):
        r = result[side]
        lines.append(f"{name:20s} {r['model_tokens_per_s']:12.0f} {r['model_tokens_per_answer']:17.1f} "
                     f"{r['observation_tokens_per_answer']:15.1f} {r['calls_per_answer']:13.2f}")
    lines += [
        f"{'ratio multi/single':20s} {result['ratio_multi_over_single']:12.3f}",
        f"multi-turn wall time with a sample waiting on its tool: {result['tool_wait_share']:6.1%}",
        f"  engine generating meanwhile                         : "
        f"{result['engine_busy_while_waiting_share']:6.1%}",
        f"  engine idle meanwhile                               : "
        f"{result['engine_idle_while_waiting_share']:6.1%}"
        f"  (tool/engine_idle_frac {result['tool/engine_idle_frac']:.3f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ray gives a one-CPU actor one OpenMP thread; torch reads this only when first imported.
    os.environ["OMP_NUM_THREADS"] = "1"

    from launch.benchmarks.rollout import build_endless_model
    from launch.models.tiny_model import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="lpreg-bench-") as scratch, contextlib.ExitStack() as stack:
        prompt_ids = synthetic_prompt_ids(build_tokenizer(), args.prompts)
        max_model_len = max(map(len, prompt_ids)) + args.max_tokens
        model_path = str(build_endless_model(Path(scratch) / "endless", max_model_len))
        python = None
        if args.tool_sleep > 0:
            tool_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lpreg-bench-tool-",
                                                                       dir=INTERPRETER_DIR))
            python = sleepy_python(_sandbox_python(), Path(tool_dir), args.tool_sleep)
        tools = tool_config(args, python)
        _check_sandbox(tools)
        result = _measure(model_path, prompt_ids, max_model_len, tools, args)

    sleep = f", every program sleeps {args.tool_sleep:g} s" if args.tool_sleep else ""
    result["workload"] = (f"{len(prompt_ids)} prompts x n={args.n}, {args.max_tokens} tokens per "
                          f"response, up to {args.max_turns} tool calls, {args.tool_concurrency} "
                          f"at once{sleep}; {args.rounds} rounds, max_model_len {max_model_len}")
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def synthetic_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """The synthetic task's prompts, each opening a code block: the same on both sides."""
    from conf.schema import SyntheticTaskConfig
    from launch.data.synthetic import synthetic_problems

    return [tokenizer(r.prompt + CODE_START, add_special_tokens=False)["input_ids"]
            for r in synthetic_problems(SyntheticTaskConfig(), count, seed=0)]


def _sandbox_python() -> str:
    """The interpreter the sandbox chooses when ``tool.python`` is not set."""
    from conf.schema import ToolConfig

    return _check_sandbox(ToolConfig(max_concurrency=1))


def _check_sandbox(tool_cfg) -> str:
    """The interpreter of a sandbox with these settings. A setting the sandbox refuses
    fails here, with its reason, rather than as a worker that dies while it starts."""
    from rollout.tools import Sandbox

    sandbox = Sandbox(tool_cfg)
    sandbox.close()
    return sandbox.python


def _round(pool, side: str, prompt_ids: list[list[int]], args, max_tokens: int, seed: int) -> Round:
    from rollout.types import GroupRequest, SamplingSettings

    requests = [GroupRequest(pool.group_id(f"bench-{side}{seed}-{i}"), ids,
                             # Each group its own seed; both sides the same ones in a round.
                             SamplingSettings(samples_per_prompt=args.n, temperature=1.0, top_p=1.0,
                                              max_response_tokens=max_tokens, seed=seed * 1000 + i))
                for i, ids in enumerate(prompt_ids)]
    (wait_before, idle_before), = pool.tool_wait_seconds()
    start = time.perf_counter()
    groups = pool.generate(requests)
    seconds = time.perf_counter() - start
    (wait_after, idle_after), = pool.tool_wait_seconds()
    return count_round(side, seconds, groups, (wait_after - wait_before, idle_after - idle_before))


def _measure(model_path: str, prompt_ids: list[list[int]], max_model_len: int, tool_cfg, args) -> dict:
    import ray

    from conf.schema import ModelConfig
    from launch.cluster.rollout_pool import RolloutPool
    from rollout.worker import engine_env

    configs = {side: rollout_config(args, side, max_model_len) for side in SIDES}
    os.environ.update(engine_env(configs["single"]))
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    try:
        pools = {side: RolloutPool(1, model_path, ModelConfig(), configs[side], seed=0,
                                   tool_cfg=tool_cfg if side == "multi" else None)
                 for side in SIDES}
        seed = next(_ROUND_SEEDS)
        for side in SIDES:
            _round(pools[side], side, prompt_ids, args, WARM_UP_TOKENS, seed)
        rounds = []
        for index in range(args.rounds):
            seed = next(_ROUND_SEEDS)  # fresh samples each round, not the cached prefixes of the last
            # Each side goes first every other round: neither always follows a pause.
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                rounds.append(_round(pools[side], side, prompt_ids, args, args.max_tokens, seed))
        for pool in pools.values():
            pool.shutdown()
    finally:
        ray.shutdown()
    result = summarize(rounds)
    result["rounds"] = [vars(r) for r in rounds]
    return result
