"""``lpreg config``: the resolved config as YAML, or the reference page of every key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conf.load import ConfigError, load_config, to_yaml
from conf.reference import REFERENCE_PATH, REGENERATE, render
from launch.cli.arguments import add_overrides_argument, add_recipe_argument

EXIT_STALE = 1


def run(args: argparse.Namespace) -> int:
    if args.reference is not None:
        if args.config or args.overrides or args.resolve_auto:
            raise ConfigError("--reference documents the schema itself; it takes no recipe, "
                              "overrides or --resolve-auto")
        return write_reference(Path(args.reference), check=args.check)
    if args.check:
        raise ConfigError("--check goes with --reference")
    cfg = load_config(args.config, args.overrides)
    if args.resolve_auto:
        from conf.validate import resolve_auto

        cfg = resolve_auto(cfg)
    print(to_yaml(cfg), end="")
    return 0


def write_reference(path: Path, check: bool) -> int:
    page = render()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != page:
            print(f"lpreg: {path} is not what the schema generates; run `{REGENERATE}`",
                  file=sys.stderr)
            return EXIT_STALE
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser(
        "config", help="print the resolved config as YAML, or write the reference of every key",
        description="Print the config a recipe and overrides make, as YAML (what `lpreg train` "
                    "would run), or write the configuration reference from the schema.")
    add_recipe_argument(config)
    config.add_argument("--resolve-auto", action="store_true",
                        help="make the automatic choices as a run makes them: auto values, and "
                             "rollout.top_logprobs 0 where nothing uses it")
    config.add_argument("--reference", nargs="?", const=str(REFERENCE_PATH), metavar="PATH",
                        help=f"write the reference page of every key, from the schema, to PATH "
                             f"(default: {REFERENCE_PATH.relative_to(REFERENCE_PATH.parents[1])} "
                             "in the checkout)")
    config.add_argument("--check", action="store_true",
                        help="with --reference: write nothing, and exit 1 when the page differs "
                             "from what the schema generates")
    add_overrides_argument(config, "dotted overrides, e.g. rollout.max_staleness=1")
    config.set_defaults(func=run)
