"""``lpreg tool exec``: one program from stdin through the tool sandbox, with the run's
settings, and the observation printed exactly as the model would see it."""

from __future__ import annotations

import argparse
import sys

from conf.load import ConfigError, load_config
from launch.cli.arguments import add_overrides_argument, add_recipe_argument


def run_exec(args: argparse.Namespace) -> int:
    from rollout.tools.pool import ToolPool

    cfg = load_config(args.config, args.overrides)
    if sys.stdin.isatty():
        raise ConfigError("lpreg tool exec reads the program from stdin: "
                          "lpreg tool exec [key=value ...] < program.py")
    code = sys.stdin.read()
    with ToolPool(cfg.tool) as pool:
        result = pool.run(code, args.tool or cfg.tool.name)
        mode = pool.sandbox.mode
    # The observation, byte for byte; a newline after it only where it has none, for the
    # terminal. What happened goes to stderr: the exit status is 0 whatever the program did.
    sys.stdout.write(result.observation if result.observation.endswith("\n")
                     else result.observation + "\n")
    sys.stdout.flush()
    print(f"lpreg tool exec: {result.status.value} in {result.wall_s:.2f} s "
          f"(sandbox: {mode})", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tool = sub.add_parser("tool", help="the sandbox that runs code the model writes in a rollout")
    actions = tool.add_subparsers(dest="tool_command", required=True)
    run = actions.add_parser(
        "exec", help="run a Python program from stdin in the tool sandbox and print the "
                     "observation the model would see")
    add_recipe_argument(run)
    run.add_argument("--tool", default=None,
                     help="the tool to call: python (the sandbox), or a name of tool.plugins "
                          "(default: tool.name, as in a rollout)")
    add_overrides_argument(run, "e.g. tool.timeout_s=2 tool.sandbox=rlimits")
    run.set_defaults(func=run_exec)
