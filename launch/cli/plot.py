"""``lpreg plot``: PNG figures of one or more runs."""

from __future__ import annotations

import argparse
import sys

EXIT_NOT_FOUND = 2


def run(args: argparse.Namespace) -> int:
    from launch.reporting.plot import default_out_dir, plot_runs

    out = args.out or default_out_dir(args.run_dirs)
    try:
        written = plot_runs(args.run_dirs, out)
    except FileNotFoundError as err:
        print(f"lpreg: error: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    for path in written:
        print(path)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser("plot", help="PNG figures of one or more runs (several share each figure)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="output directory (default: RUN_DIR/plots for one run, "
                      "./plots for several)")
    plot.set_defaults(func=run)
