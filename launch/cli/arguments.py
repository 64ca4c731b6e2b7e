"""Arguments that several commands share."""

from __future__ import annotations

import argparse


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="recipe YAML file, or the name of a shipped recipe")


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=example)
