"""Ray cluster jobs: ``lpreg submit``, ``status``, ``logs`` and ``stop``."""

from __future__ import annotations

import argparse


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Register the job subcommands on the ``lpreg`` parser."""
