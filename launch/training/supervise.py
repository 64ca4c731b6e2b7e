"""Keeping a training driver going: run it as a child process, and when it is lost, run it
again from the run's newest checkpoint.

The rollout pool and the learner recovery heal what dies under a driver; this heals the
driver itself (killed for memory, its node rebooted under a submitted job). A child that
exits 0 is done; one that exits 2 was refused its input, which a retry cannot fix; any
other end (an error, a signal) is retried, with ``trainer.resume=auto``, up to ``retries``
times. A SIGTERM or SIGINT to the supervisor (``lpreg stop``, Ctrl-C) goes to the child
and ends the supervision.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence

log = logging.getLogger("lpreg")

EXIT_BAD_INPUT = 2
RESUME_AUTO = "trainer.resume=auto"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supervise(command: Sequence[str], retries: int) -> int:
    """Run ``command``; run it again with ``trainer.resume=auto`` when it is lost."""
    attempt, stopping = 0, False
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            argv = list(command) + ([RESUME_AUTO] if attempt else [])
            started = time.monotonic()
            child = subprocess.Popen(argv)
            code = child.wait()
            if code in (0, EXIT_BAD_INPUT) or stopping:
                return code
            if attempt >= retries:
                log.error("the training driver %s; all %d retries are used up", describe_exit(code),
                          retries)
                return code
            attempt += 1
            log.warning("the training driver %s after %.0fs; retry %d of %d continues from the "
                        "newest checkpoint", describe_exit(code), time.monotonic() - started,
                        attempt, retries)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
