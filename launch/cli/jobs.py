"""``lpreg submit``, ``status``, ``logs`` and ``stop``: training as a Ray cluster job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conf.load import ConfigError, load_config
from launch.cli.arguments import add_recipe_argument
from launch.cli.train import add_retries_argument
from launch.cluster.jobs import (
    DEFAULT_ADDRESS,
    PROJECT_DIR,
    JobCommandError,
    JobServer,
    open_server,
    recipe_argument,
    relative_path_notes,
    train_entrypoint,
)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _fail(message: str) -> int:
    print(f"lpreg: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _follow_to_end(server: JobServer, job_id: str) -> int:
    try:
        server.follow(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running "
              f"(`lpreg stop {job_id}` ends it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    state, message = server.wait(job_id)
    print(f"job {job_id}: {state}" + (f" ({message})" if message else ""), file=sys.stderr)
    return 0 if state == "SUCCEEDED" else EXIT_FAILED


def _submit(args: argparse.Namespace) -> int:
    # Everything that can be checked here is checked before the cluster is contacted:
    # a config error exits with status 2 (ConfigError reaches the command line).
    cfg = load_config(args.config, args.overrides)
    project_dir = Path(args.working_dir).resolve()
    if not (project_dir / "launch" / "cli" / "__main__.py").is_file():
        raise ConfigError(f"--working-dir {project_dir} is not the lpreg project directory "
                          "(no launch/cli/__main__.py); pass the checkout to ship")
    if args.retries < 0 or (args.retries and cfg.trainer.save_every == 0):
        raise ConfigError("--retries resumes the job from its newest checkpoint: it must be 0 or "
                          "more, and trainer.save_every must not be 0")
    entrypoint = train_entrypoint(recipe_argument(args.config, project_dir), args.overrides,
                                  python=args.python, retries=args.retries)
    for note in relative_path_notes(cfg):
        print(f"lpreg: note: {note}", file=sys.stderr)
    try:
        server = open_server(args.address)
        job_id = server.submit(entrypoint, project_dir, args.job_id)
        print(job_id, flush=True)
        print(f"submitted to {server.address}: {entrypoint}\n"
              f"  lpreg status {job_id} | lpreg logs {job_id} --follow | lpreg stop {job_id}",
              file=sys.stderr)
        if args.follow:
            return _follow_to_end(server, job_id)
    except JobCommandError as err:
        return _fail(str(err))
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        state, message = open_server(args.address).status(args.job_id)
    except JobCommandError as err:
        return _fail(str(err))
    print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
    return 0


def _logs(args: argparse.Namespace) -> int:
    try:
        server = open_server(args.address)
        if args.follow:
            return _follow_to_end(server, args.job_id)
        sys.stdout.write(server.logs(args.job_id))
    except JobCommandError as err:
        return _fail(str(err))
    return 0


def _stop(args: argparse.Namespace) -> int:
    try:
        stopped = open_server(args.address).stop(args.job_id)
    except JobCommandError as err:
        return _fail(str(err))
    print(f"{args.job_id}: stop requested" if stopped else f"{args.job_id}: was not running")
    return 0


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None,
        help="the job server (the head's dashboard URL); default: RAY_API_SERVER_ADDRESS, "
             f"else RAY_ADDRESS when it is an http URL, else {DEFAULT_ADDRESS}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the job subcommands on the ``lpreg`` parser."""
    submit = sub.add_parser(
        "submit", help="run training as a job on a Ray cluster",
        description="Check the config here, ship the project to the cluster and run "
                    "`lpreg train` there. The token for the cluster's job server comes from "
                    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    _add_address(submit)
    submit.add_argument("--follow", action="store_true",
                        help="stream the logs until the job ends; exit non-zero unless it succeeded")
    add_recipe_argument(submit)
    add_retries_argument(submit)
    submit.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    submit.add_argument("--python", default="python",
                        help="the Python the job runs on the cluster (default: python on the "
                             "head's PATH)")
    submit.add_argument("--working-dir", default=str(PROJECT_DIR),
                        help=f"project directory to ship (default: {PROJECT_DIR})")
    submit.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, passed on to `lpreg train`")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="state of a cluster job")
    _add_address(status)
    status.add_argument("job_id", metavar="JOB")
    status.set_defaults(func=_status)

    logs = sub.add_parser("logs", help="logs of a cluster job")
    _add_address(logs)
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends; exit non-zero unless it succeeded")
    logs.set_defaults(func=_logs)

    stop = sub.add_parser("stop", help="stop a cluster job")
    _add_address(stop)
    stop.add_argument("job_id", metavar="JOB")
    stop.set_defaults(func=_stop)
