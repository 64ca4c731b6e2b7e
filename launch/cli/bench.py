"""``lpreg bench WHICH``: the benchmarks in ``launch/benchmarks/``, one module each."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

BENCHMARK_PACKAGE = "launch.benchmarks"


def available_benchmarks() -> list[str]:
    package = importlib.import_module(BENCHMARK_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"{BENCHMARK_PACKAGE}.{args.which}")
    return module.main(args.rest)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    names = available_benchmarks()
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(names)}")
    bench.add_argument("which", choices=names)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=run)
