"""``lpreg bootstrap``: build and warm-start the tiny offline model."""

from __future__ import annotations

import argparse

from conf.load import load_config
from launch.cli.arguments import add_overrides_argument, add_recipe_argument


def run(args: argparse.Namespace) -> int:
    from launch.models.bootstrap import bootstrap, tiny_model_dir

    cfg = load_config(args.config, args.overrides)
    output = args.output or tiny_model_dir(cfg.model.cache_dir, cfg.model.tiny, cfg.data.synthetic, cfg.tool)
    path = bootstrap(output, cfg.model.tiny, cfg.data.synthetic, tool=cfg.tool)
    print(f"tiny model ready in {path}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    boot = sub.add_parser(
        "bootstrap", help="build and warm-start the tiny offline model (what train uses by default)")
    boot.add_argument("--output", help="model directory (default: model.cache_dir/tiny-<hash>)")
    add_recipe_argument(boot)
    add_overrides_argument(boot, "e.g. model.tiny.warm_start_steps=2000 data.synthetic.max_operand=99")
    boot.set_defaults(func=run)
