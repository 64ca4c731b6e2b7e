"""The ``lpreg`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from launch.config import ConfigError, load_config, to_yaml

EXIT_CONFIG = 2


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from launch.driver import Trainer

    result = Trainer(cfg).run()
    print(f"run finished: {result.steps} steps, metrics in {result.run_dir / 'metrics.jsonl'}")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from conf.schema import TinyModelConfig
    from launch.tiny_model import build_tiny_model

    path = build_tiny_model(args.output, TinyModelConfig(seed=args.seed))
    print(f"tiny model written to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"launch.benchmarks.{args.which}")
    return module.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpreg", description="RL with verifiable rewards and Lp-Reg on Ray, vLLM and DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run training (a local Ray by default)")
    train.add_argument("-c", "--config", help="recipe YAML file, or the name of a shipped recipe")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. trainer.total_steps=10")
    train.set_defaults(func=_train)

    boot = sub.add_parser("bootstrap", help="build the tiny offline model and tokenizer")
    boot.add_argument("--output", default="models/tiny")
    boot.add_argument("--seed", type=int, default=0)
    boot.set_defaults(func=_bootstrap)

    bench = sub.add_parser("bench", help="benchmarks: rollout, loss, verifier")
    bench.add_argument("which", choices=["rollout", "loss", "verifier"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    from launch.jobs import add_job_commands

    add_job_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"lpreg: error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
