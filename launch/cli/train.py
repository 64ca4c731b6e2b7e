"""``lpreg train``: run training (a private local Ray unless told otherwise)."""

from __future__ import annotations

import argparse

from conf.load import ConfigError, load_config, to_yaml
from launch.cli.arguments import add_overrides_argument, add_recipe_argument


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.retries < 0:
        raise ConfigError(f"--retries must be 0 or more, got {args.retries}")
    if args.retries:
        if cfg.trainer.save_every == 0:
            raise ConfigError("--retries resumes the run from its newest checkpoint, but "
                              "trainer.save_every=0 writes none; set trainer.save_every")
        return _supervised(args)
    from launch.training.loop import Trainer, improvement_summary

    result = Trainer(cfg, verbose=args.verbose).run()
    print(f"run finished: {result.steps} steps, metrics in {result.run_dir / 'metrics.jsonl'}")
    summary = improvement_summary(result.evaluations)
    if summary:
        print(summary)
    return 0


def _supervised(args: argparse.Namespace) -> int:
    """This process watches; a child process is the driver (see launch.training.supervise)."""
    import sys

    from launch.training.supervise import supervise

    command = [sys.executable, "-m", "launch.cli", "train"]
    if args.verbose:
        command.append("--verbose")
    if args.config:
        command += ["-c", args.config]
    return supervise(command + list(args.overrides), args.retries)


def add_retries_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retries", type=int, default=0, metavar="N",
        help="run the driver as a child process and, when it is lost (killed, crashed), run it "
             "again from the newest checkpoint, up to N times (needs trainer.save_every)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="run training (a local Ray by default)")
    add_recipe_argument(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    train.add_argument("-v", "--verbose", action="store_true",
                       help="show every actor's output (vLLM, DeepSpeed, Ray) live, nothing "
                            "silenced; without it the terminal shows lpreg's own lines and "
                            "each actor's output goes to <run dir>/logs/<actor>.log")
    add_retries_argument(train)
    add_overrides_argument(train, "dotted overrides, e.g. trainer.total_steps=10")
    train.set_defaults(func=run)
