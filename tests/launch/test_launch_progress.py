"""The progress display: a rich bar on a terminal, plain log lines anywhere else."""

import io
import logging
import sys

from rich.console import Console

from launch.reporting.progress import Progress, format_duration, headline_eval

METRICS = {"reward/mean": 0.25, "response_length/mean": 12.0, "timing/step_s": 10.0,
           "timing/rollout_s": 6.0, "timing/update_s": 3.5, "timing/weight_sync_s": 0.5}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_with_eta_when_not_a_terminal(caplog):
    clock = Clock()
    progress = Progress(10, start_step=4, console=Console(file=io.StringIO()), clock=clock)
    assert not progress.live
    clock.now += 20.0  # two steps of this session took 20 s: 10 s each, 4 steps to go
    with caplog.at_level(logging.INFO, logger="lpreg"):
        line = progress.update(6, {**METRICS, "eval/accuracy": 0.41})
    assert line.startswith("step 6/10 reward 0.250 accuracy 41.0% len 12.0 10.0s/step")
    assert "(rollout 6.0s update 3.5s sync 0.5s)" in line
    assert line.endswith("ETA 0:40")
    assert line in caplog.text
    # The latest held-out number stays on show between evaluations.
    assert "accuracy 41.0%" in progress.update(7, METRICS)
    progress.close()


def test_missing_metrics_are_left_out():
    progress = Progress(3, console=Console(file=io.StringIO()), clock=Clock())
    assert progress.update(1, {}) == "step 1/3 ETA 0:00"


def test_live_bar_on_a_terminal_routes_log_lines_above_it():
    out = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(4, console=Console(file=out, force_terminal=True, width=120),
                            clock=Clock())
        assert progress.live
        assert handler.stream is not sys.__stderr__ and handler.stream is sys.stderr
        progress.update(1, METRICS)
        progress.update(2, {**METRICS, "eval/mean@8": 0.5})
        progress.close()
        assert handler.stream is sys.stderr  # restored to the real stream
        assert "2/4" in out.getvalue() and "ETA" in out.getvalue()
    finally:
        root.removeHandler(handler)


def test_disabled_bar_still_logs():
    progress = Progress(2, enabled=False, clock=Clock())
    assert not progress.live
    assert progress.update(1, METRICS).startswith("step 1/2")


def test_helpers():
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"
    assert headline_eval({"eval/mean@8": 0.5, "eval/mean@8/src": 0.1}) == ("eval/mean@8", 0.5)
    assert headline_eval({"reward/mean": 1.0}) is None
