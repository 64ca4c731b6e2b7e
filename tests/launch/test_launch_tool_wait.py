"""``tool/wait_s`` and ``tool/engine_idle_frac``: the workers' running totals, as the pool
keeps them and a training step turns them into metrics."""

import pytest

from launch.training.step_metrics import tool_wait_metrics


def test_the_step_counts_what_the_totals_grew_by_over_every_worker():
    before = [(10.0, 2.0), (4.0, 0.0)]
    after = [(16.0, 5.0), (6.0, 1.0)]
    metrics = tool_wait_metrics(before, after)
    assert metrics["tool/wait_s"] == pytest.approx((6.0 + 2.0) / 2)
    assert metrics["tool/engine_idle_frac"] == pytest.approx((3.0 + 1.0) / (6.0 + 2.0))


def test_a_replaced_worker_counts_its_new_totals_whole():
    metrics = tool_wait_metrics([(10.0, 4.0)], [(3.0, 1.0)])
    assert metrics == {"tool/wait_s": 3.0, "tool/engine_idle_frac": pytest.approx(1 / 3)}


def test_a_step_without_tool_waits_has_no_idle_share():
    assert tool_wait_metrics([(1.0, 1.0), (0.0, 0.0)], [(1.0, 1.0), (0.0, 0.0)]) == {
        "tool/wait_s": 0.0, "tool/engine_idle_frac": 0.0}


def test_the_pool_keeps_each_workers_last_reported_totals():
    from launch.cluster.rollout_pool import PoolCounters, RolloutPool, WorkerSlot
    from rollout.types import WorkerReport

    pool = RolloutPool.__new__(RolloutPool)
    pool.counters, pool.results, pool._send_poll = PoolCounters(), {}, lambda slot: None
    pool.slots = [WorkerSlot(0, handle="h0"), WorkerSlot(1, handle="h1")]
    pool._on_report(pool.slots[1], WorkerReport(1, 0, tool_wait_s=2.5, tool_idle_s=0.5))
    assert pool.tool_wait_seconds() == [(0.0, 0.0), (2.5, 0.5)]
