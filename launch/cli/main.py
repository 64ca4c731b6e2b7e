"""The ``lpreg`` command line: every command's parser, and exit status 2 for bad input."""

from __future__ import annotations

import argparse
import logging
import sys

from conf.errors import ConfigError
from launch.cli import bench, bootstrap, compare, config, eval, jobs, plot, tool, train
from launch.cluster.remote import RunStopped
from launch.data.prompts import DataError

EXIT_CONFIG = 2
EXIT_RUN_STOPPED = 1
COMMANDS = (train, config, bootstrap, eval, plot, compare, bench, jobs, tool)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpreg", description="RL with verifiable rewards and Lp-Reg on Ray, vLLM and DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        # A problem with what the user asked for, found before anything started: one
        # line that names the key, or the file, row and field.
        print(f"lpreg: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RunStopped as err:
        # The run healed what it could and then gave up; the log above tells the story.
        print(f"lpreg: error: {err}", file=sys.stderr)
        return EXIT_RUN_STOPPED


if __name__ == "__main__":
    sys.exit(main())
