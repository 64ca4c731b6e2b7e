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
    from launch.driver import Trainer, improvement_summary

    result = Trainer(cfg).run()
    print(f"run finished: {result.steps} steps, metrics in {result.run_dir / 'metrics.jsonl'}")
    summary = improvement_summary(result.evaluations)
    if summary:
        print(summary)
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from launch.bootstrap import bootstrap, tiny_model_dir

    cfg = load_config(args.config, args.overrides)
    output = args.output or tiny_model_dir(cfg.model.cache_dir, cfg.model.tiny, cfg.data.synthetic)
    path = bootstrap(output, cfg.model.tiny, cfg.data.synthetic)
    print(f"tiny model ready in {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from launch.eval_model import expand_shorthands, format_result, run_evaluation

    cfg = load_config(args.config, expand_shorthands(args.overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result, output = run_evaluation(cfg, args.output)
    print(format_result(result))
    print(f"appended to {output}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from launch.plot import default_out_dir, plot_runs

    out = args.out or default_out_dir(args.run_dirs)
    try:
        written = plot_runs(args.run_dirs, out)
    except FileNotFoundError as err:
        print(f"lpreg: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    for path in written:
        print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"launch.benchmarks.{args.which}")
    return module.main(args.rest)


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="recipe YAML file, or the name of a shipped recipe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpreg", description="RL with verifiable rewards and Lp-Reg on Ray, vLLM and DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run training (a local Ray by default)")
    add_recipe_argument(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. trainer.total_steps=10")
    train.set_defaults(func=_train)

    boot = sub.add_parser(
        "bootstrap", help="build and warm-start the tiny offline model (what train uses by default)")
    boot.add_argument("--output", help="model directory (default: model.cache_dir/tiny-<hash>)")
    add_recipe_argument(boot)
    boot.add_argument("overrides", nargs="*", metavar="key=value",
                      help="e.g. model.tiny.warm_start_steps=2000 data.synthetic.max_operand=99")
    boot.set_defaults(func=_bootstrap)

    evaluate = sub.add_parser(
        "eval", help="evaluate a model directory or checkpoint on held-out problems")
    add_recipe_argument(evaluate)
    evaluate.add_argument("--output", help="eval.jsonl to append to (default: the run directory "
                          "of the checkpoint, else trainer.output_dir/trainer.run_name)")
    evaluate.add_argument("--print-config", action="store_true",
                          help="print the resolved config and exit")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="e.g. model=runs/demo/checkpoints/step_60 data=aime.jsonl "
             "trainer.eval_samples=8 trainer.eval_temperature=0.6 "
             "(model= and data= stand for model.path= and data.eval_path=)")
    evaluate.set_defaults(func=_eval)

    plot = sub.add_parser("plot", help="PNG figures of one or more runs (several share each figure)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="output directory (default: RUN_DIR/plots for one run, "
                      "./plots for several)")
    plot.set_defaults(func=_plot)

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
