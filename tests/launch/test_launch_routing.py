"""Routing groups to rollout workers, and the step pipeline's pure parts."""

import pytest

from conf.load import load_config
from launch.cluster.rollout_pool import pick_worker
from launch.training.pipeline import group_seed, staleness, trainable_group_count
from rollout.types import Sample


def test_the_least_loaded_worker_takes_the_group():
    assert pick_worker({0: 8, 1: 4, 2: 6}, capacity=16, group_size=4) == 1


def test_ties_go_to_the_lowest_index():
    assert pick_worker({2: 0, 0: 0, 1: 0}, capacity=16, group_size=4) == 0


def test_a_full_worker_is_skipped_and_all_full_means_wait():
    assert pick_worker({0: 8, 1: 12}, capacity=16, group_size=8) == 0
    assert pick_worker({0: 12, 1: 12}, capacity=16, group_size=8) is None


def test_an_idle_worker_takes_even_an_oversized_group():
    assert pick_worker({0: 4, 1: 0}, capacity=8, group_size=16) == 1


def test_routing_fills_workers_evenly():
    loads = {0: 0, 1: 0, 2: 0}
    for _ in range(9):
        loads[pick_worker(loads, capacity=100, group_size=4)] += 4
    assert loads == {0: 12, 1: 12, 2: 12}


def sample(versions):
    return Sample(prompt_index=0, prompt_token_ids=[1], response_token_ids=list(range(len(versions))),
                  response_logprobs=[0.0] * len(versions), finish_reason="stop",
                  weight_version=min(versions), worker_index=0, token_versions=versions)


def test_staleness_counts_from_the_oldest_token():
    assert staleness(sample([3, 3, 4]), learner_version=4) == 1
    assert staleness(sample([4, 4]), learner_version=4) == 0


def test_every_group_samples_with_its_own_seeds():
    """No two samples of a run share a seed: vLLM's seeded noise depends on the seed alone,
    so shared seeds would make groups sample alike."""
    samples_per_prompt = 8
    seeds = [group_seed(3, "train", step, round_index, i) + j
             for step in range(1, 200) for round_index in range(2) for i in range(32)
             for j in range(samples_per_prompt)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert group_seed(3, "train", 5, 0, 1) == group_seed(3, "train", 5, 0, 1)  # a resume replays it
    assert group_seed(3, "train", 5, 0, 1) != group_seed(4, "train", 5, 0, 1)
    assert group_seed(3, "eval", 5, 1) != group_seed(3, "train", 5, 0, 1)


@pytest.mark.parametrize("kept, expected", [(32, 32), (31, 30), (7, 6), (1, 0)])
def test_kept_groups_are_trimmed_to_what_splits_over_mini_batches_and_learners(kept, expected):
    cfg = load_config(overrides=["data.prompts_per_step=32", "rollout.samples_per_prompt=1",
                                 "algorithm.advantage=reinforce_pp", "learner.num_workers=2"])
    assert trainable_group_count(kept, cfg) == expected


class CatchUpPool:
    """The pool's catch-up decision, without Ray: loads are recorded, not sent."""

    def __init__(self, current_version, pushed=True):
        from launch.cluster.rollout_pool import RolloutPool

        self.pool = RolloutPool.__new__(RolloutPool)
        self.pool.current_version = current_version
        self.loads = []
        self.live = []
        self.pool.load_current_weights = (
            (lambda handle: self.loads.append(handle) or f"load-{len(self.loads)}") if pushed
            else (lambda handle: None))
        self.pool._go_live = self.live.append


def replacement(index=0):
    from launch.cluster.rollout_pool import WorkerSlot

    return WorkerSlot(index, handle=f"h{index}", lost_at=1.0)


def test_a_replacement_loads_the_current_weights_before_it_serves():
    fake, slot = CatchUpPool(current_version=5), replacement()
    fake.pool._catch_up(slot, loaded=0)  # just started: holds model.path
    assert fake.loads == ["h0"] and slot.state == "loading" and fake.live == []
    fake.pool._catch_up(slot, loaded=5)
    assert fake.live == [slot]


def test_a_replacement_that_loaded_while_a_newer_push_went_out_loads_again():
    fake, slot = CatchUpPool(current_version=5), replacement()
    fake.pool._catch_up(slot, loaded=0)
    fake.pool.current_version = 6  # a push went to the live workers meanwhile
    fake.pool._catch_up(slot, loaded=5)
    assert fake.loads == ["h0", "h0"] and fake.live == []
    fake.pool._catch_up(slot, loaded=6)
    assert fake.live == [slot]


def test_before_any_push_a_replacement_serves_at_once():
    fake, slot = CatchUpPool(current_version=0, pushed=False), replacement()
    fake.pool._catch_up(slot, loaded=0)
    assert fake.live == [slot] and fake.loads == []


def test_a_group_id_is_never_issued_twice():
    from launch.cluster.rollout_pool import GroupIds

    ids = GroupIds()
    issued = [ids("s3r0g1") for _ in range(3)] + [ids("eval3-0")]
    assert len(set(issued)) == len(issued)
    assert all(i.startswith(("s3r0g1#", "eval3-0#")) for i in issued)


def test_finished_tool_calls_are_progress_while_the_engine_idles():
    # Every sample of a multi-turn worker may wait on a tool: its engine is idle, its
    # in-flight count unchanged, yet it is not hung.
    from launch.cluster.rollout_pool import PoolCounters, RolloutPool, WorkerSlot
    from rollout.types import WorkerReport

    pool = RolloutPool.__new__(RolloutPool)
    pool.counters, pool.results, pool._send_poll = PoolCounters(), {}, lambda slot: None
    slot = WorkerSlot(0, handle="h0", in_flight_samples=4, last_in_flight=4, busy_s=2.0)
    pool._on_report(slot, WorkerReport(0, 0, in_flight_samples=4, busy_s=2.0, tool_calls=0))
    assert slot.last_progress == 0.0
    pool._on_report(slot, WorkerReport(0, 0, in_flight_samples=4, busy_s=2.0, tool_calls=3))
    assert slot.last_progress > 0.0 and slot.tool_calls == 3
