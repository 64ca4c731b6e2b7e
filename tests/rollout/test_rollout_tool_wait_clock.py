"""The worker's clock of tool waits: time with a sample waiting on its tool, and the part of
it with nothing on the engine (``tool/engine_idle_frac``)."""

import pytest

from rollout.multi_turn import ToolWaitClock


def test_nothing_counts_before_a_call_or_without_one():
    clock = ToolWaitClock()
    clock.observe(0.0, calls_running=0, engine_busy=False)
    clock.observe(5.0, calls_running=0, engine_busy=True)
    clock.observe(9.0, calls_running=0, engine_busy=False)
    assert (clock.wait_s, clock.idle_s) == (0.0, 0.0)


def test_each_span_counts_under_the_state_observed_at_its_start():
    clock = ToolWaitClock()
    clock.observe(1.0, calls_running=1, engine_busy=True)  # a call out, others generating
    clock.observe(3.0, calls_running=1, engine_busy=False)  # the last request left the engine
    clock.observe(3.5, calls_running=2, engine_busy=False)
    clock.observe(4.0, calls_running=0, engine_busy=False)  # calls back, engine not yet refilled
    clock.observe(10.0, calls_running=0, engine_busy=True)
    assert clock.wait_s == pytest.approx(3.0)
    assert clock.idle_s == pytest.approx(1.0)


def test_reading_midway_changes_nothing_but_brings_the_totals_up_to_date():
    # poll() observes the unchanged state to report a wait still running.
    clock = ToolWaitClock()
    clock.observe(0.0, calls_running=1, engine_busy=False)
    clock.observe(2.0, calls_running=1, engine_busy=False)
    assert (clock.wait_s, clock.idle_s) == (2.0, 2.0)
    clock.observe(3.0, calls_running=1, engine_busy=True)
    clock.observe(7.0, calls_running=0, engine_busy=True)
    assert (clock.wait_s, clock.idle_s) == (7.0, 3.0)


def test_a_clock_that_goes_back_adds_nothing():
    clock = ToolWaitClock()
    clock.observe(5.0, calls_running=1, engine_busy=False)
    clock.observe(4.0, calls_running=1, engine_busy=False)
    assert (clock.wait_s, clock.idle_s) == (0.0, 0.0)
