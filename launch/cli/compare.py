"""``lpreg compare``: several recipes under the same seeds and budget, then one report."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from conf.load import ConfigError
from launch.cli.arguments import add_overrides_argument

EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_BAD_INPUT = 2  # what lpreg train exits with when a setting or a data row is wrong


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got '{text}'") from None


def parse_seeds_for(items: list[str]) -> dict[str, list[int]]:
    """``ARM=SEEDS`` items, e.g. ``grpo_entropy_on_policy=0,1,2``."""
    chosen: dict[str, list[int]] = {}
    for item in items:
        arm, sep, seeds = item.partition("=")
        if not sep or not arm.strip():
            raise ConfigError(f"--seeds-for takes ARM=SEEDS, e.g. my_arm=0,1,2; got '{item}'")
        if arm.strip() in chosen:
            raise ConfigError(f"--seeds-for names {arm.strip()} twice")
        chosen[arm.strip()] = parse_seeds(seeds)
    return chosen


def run(args: argparse.Namespace) -> int:
    from launch.experiments.compare import run_comparison
    from launch.experiments.report import paired_text

    words = [w for recipe in args.recipes or [] for w in ("-c", recipe)]
    words += ["--seeds", args.seeds, *[w for item in args.seeds_for for w in ("--seeds-for", item)]]
    words += ["--baseline", args.baseline] if args.baseline else []
    words += ["--model-seed", str(args.model_seed)] if args.model_seed is not None else []
    words += ["--out", args.out, *args.overrides]
    command = "lpreg compare " + shlex.join(words)
    # A plain `kill` stops the comparison the way Ctrl-C does: its runs stop with it.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_comparison(args.recipes or [], parse_seeds(args.seeds), args.out, list(args.overrides),
                                parallel=args.parallel, command=command,
                                start_runs=not args.report_only,
                                seeds_for=parse_seeds_for(args.seeds_for), baseline=args.baseline,
                                model_seed=args.model_seed)
    except KeyboardInterrupt:
        print("lpreg: interrupted; the same command continues the comparison, skipping the "
              "runs that finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    ran_ok = sum(o.exit_code == 0 for o in result.ran)
    print(f"{ran_ok} run(s) done now, {len(result.outcomes) - len(result.ran)} finished earlier"
          + (f", {len(result.missing)} not finished" if result.missing else ""))
    print(result.summary_path)
    print(result.report_path)
    for path in result.plots:
        print(path)
    for line in paired_text(result.summary):
        print(line)
    if result.failed:
        for outcome in result.failed:
            why = ("its settings were refused (exit 2): fix them before running again"
                   if outcome.exit_code == EXIT_BAD_INPUT else f"exit {outcome.exit_code}")
            print(f"lpreg: error: {outcome.run.arm} seed {outcome.run.seed} failed, {why}; see "
                  f"{outcome.log_path}", file=sys.stderr)
        print(f"lpreg: error: {len(result.failed)} run(s) failed; the same command runs only the "
              "missing ones again", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare", help="train several recipes over the same seeds, then summarise and plot them")
    compare.add_argument("-c", "--config", dest="recipes", action="append", metavar="RECIPE",
                         help="a recipe file or shipped recipe name: one arm; repeat for each arm")
    compare.add_argument("--seeds", default="0,1,2",
                         help="comma-separated seeds, each run by every arm that --seeds-for does not "
                              "name (default: 0,1,2)")
    compare.add_argument("--seeds-for", action="append", default=[], metavar="ARM=SEEDS",
                         help="an arm's own seeds, e.g. my_control=0,1,2 (ARM: its recipe's name); "
                              "repeat for each such arm")
    compare.add_argument("--baseline", metavar="RECIPE",
                         help="the arm every other arm is set against seed by seed (default: the first -c)")
    compare.add_argument("--model-seed", type=int, metavar="N",
                         help="start every run from the tiny model of seed N, so that the seeds vary "
                              "only the problems and the sampling (default: each run's own seed)")
    compare.add_argument("--out", default="compare", help="output directory (default: ./compare)")
    compare.add_argument("--parallel", type=int, default=1, metavar="N",
                         help="runs at a time (default 1; more on a Ray cluster, see docs/compare.md)")
    compare.add_argument("--report-only", action="store_true",
                         help="start no run: summarise and plot the runs that have finished")
    add_overrides_argument(compare, "overrides for every arm, e.g. trainer.total_steps=300")
    compare.set_defaults(func=run)
