"""Running ``lpreg train`` as a user does, in its own session, and reaching into it.

A run is started with ``start_new_session``, so its private Ray (GCS, raylet, every
worker) lives in that session; ``session_pids`` finds what is left of it. The run's
``actors.json`` names each actor's process, which is how tests inject faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from launch.experiments.compare import session_members
from launch.reporting.metrics import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)  # always the run's own private Ray
    return env


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", *args]


def run_compare(arms: list[str], out: Path, overrides: list[str],
                timeout_s: float = 1200) -> tuple[subprocess.Popen, str, str]:
    """``lpreg compare`` of ``arms`` on seed 0 into ``out``, in its own session, with the
    models kept beside ``out``; the finished process and its stdout and stderr."""
    command = [sys.executable, "-m", "launch.cli", "compare", *(a for arm in arms for a in ("-c", arm)),
               "--seeds", "0", "--out", str(out), f"model.cache_dir={out.parent / 'models'}", *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = proc.communicate(timeout=timeout_s)
    return proc, stdout, stderr


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}  # the last record of a step wins


def read_actors(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "actors.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def actor(run_dir: Path, kind: str, name: str) -> dict:
    return next((a for a in read_actors(run_dir).get(kind, []) if a["name"] == name), {})


def session_pids(sid: int) -> list[int]:
    return session_members(sid)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then anything else left in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not session_pids(proc.pid), "processes of the killed run survived"


def leftovers_after_exit(proc: subprocess.Popen, within_s: float = 60) -> list[int]:
    """Processes of a finished run still alive ``within_s`` after it exited (there should be none)."""
    deadline = time.monotonic() + within_s
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class Run:
    """``lpreg train`` in the background, with its log in ``log_path``."""

    def __init__(self, args: list[str], run_dir: Path, log_path: Path, timeout_s: float = 1200,
                 env: dict[str, str] | None = None):
        self.run_dir, self.log_path = run_dir, log_path
        self.deadline = time.monotonic() + timeout_s
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(train_command(args), cwd=ROOT, env={**environment(), **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, condition: Callable[[], bool], what: str, poll_s: float = 0.05) -> None:
        while not condition():
            assert self.proc.poll() is None, f"run ended before {what}:\n{self.log()[-6000:]}"
            assert time.monotonic() < self.deadline, f"timed out waiting for {what}"
            time.sleep(poll_s)

    def steps_done(self) -> set[int]:
        return {r["step"] for r in read_metrics(self.run_dir)}

    def finish(self) -> tuple[int, list[int]]:
        """Wait for the run to end; returns its exit code and any processes it left behind."""
        try:
            code = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            left = leftovers_after_exit(self.proc)
        finally:
            if self.proc.poll() is None or session_pids(self.proc.pid):
                kill_session(self.proc)
            self._log.close()
        return code, left


def signal_actor(run_dir: Path, kind: str, name: str, sig: int) -> int:
    pid = actor(run_dir, kind, name)["pid"]
    os.kill(pid, sig)
    return pid
