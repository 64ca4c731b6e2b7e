"""Training progress: a live rich bar on a terminal, one plain log line per step elsewhere.

Both show the step, the ETA and the numbers people watch (reward, the latest held-out
accuracy, step time). On a terminal the log lines keep scrolling above the bar; in a
log file or a Ray job's output there is no bar, only the lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("lpreg")

EVAL_KEYS = ("eval/accuracy", "eval/pass@1")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def headline_eval(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The held-out number to show: greedy accuracy, else mean@k."""
    for key in EVAL_KEYS:
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    for key, value in metrics.items():
        if key.startswith("eval/mean@") and key.count("/") == 1 and isinstance(value, (int, float)):
            return key, float(value)
    return None


def summary_fields(metrics: dict[str, Any], last_eval: tuple[str, float] | None) -> list[str]:
    """``name value`` pieces for whichever of the key metrics are present."""
    parts = []

    def add(label: str, key: str, fmt: str) -> None:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:{fmt}}")

    add("reward", "reward/mean", ".3f")
    if last_eval is not None:
        parts.append(f"{last_eval[0].removeprefix('eval/')} {100 * last_eval[1]:.1f}%")
    add("len", "response_length/mean", ".1f")
    if isinstance(metrics.get("timing/step_s"), (int, float)):
        parts.append(f"{metrics['timing/step_s']:.1f}s/step")
    timing = [f"{name} {metrics[key]:.1f}s" for name, key in (
        ("rollout", "timing/rollout_s"), ("update", "timing/update_s"),
        ("sync", "timing/weight_sync_s")) if isinstance(metrics.get(key), (int, float))]
    if timing:
        parts.append("(" + " ".join(timing) + ")")
    return parts


class Progress:
    """``update(step, metrics)`` after each step; ``close()`` at the end (also on errors).

    ``start_step`` is where a resumed run begins; the ETA only counts this session's
    steps, so time spent before a crash or on start-up does not skew it.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 console=None, clock=time.monotonic):
        self.total_steps = total_steps
        self.start_step = start_step
        self.clock = clock
        self.started = clock()
        self.last_eval: tuple[str, float] | None = None
        self._bar = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        if not enabled:
            return
        from rich.console import Console

        console = console or Console(file=sys.stdout)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        streams = (sys.stdout, sys.stderr)
        self._bar = RichProgress(
            TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[summary]}"),
            console=console, redirect_stdout=True, redirect_stderr=True)
        self._bar.start()
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                        eta="?", summary="starting")
        # Log handlers hold the stream they were created with; point them at rich's
        # proxies so log lines scroll above the bar instead of tearing through it.
        proxies = {id(streams[0]): sys.stdout, id(streams[1]): sys.stderr}
        for handler in _stream_handlers():
            proxy = proxies.get(id(handler.stream))
            if proxy is not None and proxy is not handler.stream:
                self._handlers.append((handler, handler.setStream(proxy)))

    @property
    def live(self) -> bool:
        return self._bar is not None

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.clock() - self.started) / done * max(0, self.total_steps - step)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        fields = summary_fields(metrics, self.last_eval)
        return " ".join([f"step {step}/{self.total_steps}", *fields,
                         f"ETA {format_duration(self.eta_seconds(step))}"])

    def update(self, step: int, metrics: dict[str, Any]) -> str:
        latest = headline_eval(metrics)
        if latest is not None:
            self.last_eval = latest
        text = self.line(step, metrics)
        log.info("%s", text)
        if self._bar is not None:
            self._bar.update(self._task, completed=step,
                             eta=format_duration(self.eta_seconds(step)),
                             summary=" ".join(summary_fields(metrics, self.last_eval)[:3]))
        return text

    def close(self) -> None:
        if self._bar is None:
            return
        for handler, original in self._handlers:
            handler.setStream(original)
        self._handlers = []
        self._bar.stop()
        self._bar = None


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), log]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
