"""``lpreg train``: run training (a private local Ray unless told otherwise)."""

from __future__ import annotations

import argparse

from conf.load import load_config, to_yaml
from launch.cli.arguments import add_overrides_argument, add_recipe_argument


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from launch.training.loop import Trainer, improvement_summary

    result = Trainer(cfg).run()
    print(f"run finished: {result.steps} steps, metrics in {result.run_dir / 'metrics.jsonl'}")
    summary = improvement_summary(result.evaluations)
    if summary:
        print(summary)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="run training (a local Ray by default)")
    add_recipe_argument(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    add_overrides_argument(train, "dotted overrides, e.g. trainer.total_steps=10")
    train.set_defaults(func=run)
