"""Placement plans: bundles per actor, separate or colocated groups, and their checks."""

from __future__ import annotations

import pytest

from conf.load import ConfigError, load_config
from launch.cluster.placement import GroupPlan, format_bundle, plan_placement


def plan(*overrides: str):
    return plan_placement(load_config(overrides=list(overrides)))


def test_default_is_one_group_per_role_with_a_bundle_per_actor():
    p = plan("rollout.num_workers=3", "learner.num_workers=2")
    rollout, learner = p.groups
    assert (rollout.name, learner.name) == ("rollout", "learner")
    assert rollout.bundles == [{"CPU": 1.0}] * 3
    assert learner.bundles == [{"CPU": 1.0}] * 2
    assert rollout.strategy == learner.strategy == "PACK"
    assert p.rollout_slots == [(0, 0), (0, 1), (0, 2)]
    assert p.learner_slots == [(1, 0), (1, 1)]


def test_gpu_bundles_count_tensor_parallel_gpus():
    p = plan("rollout.num_workers=2", "rollout.gpus_per_worker=1", "rollout.tensor_parallel_size=2",
             "rollout.cpus_per_worker=4", "learner.num_workers=4", "learner.gpus_per_worker=1",
             "learner.cpus_per_worker=2", "ray.placement_strategy=SPREAD")
    assert p.groups[0].bundles == [{"CPU": 4.0, "GPU": 2.0}] * 2
    assert p.groups[1].bundles == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert {g.strategy for g in p.groups} == {"SPREAD"}


def test_gpu_only_workers_get_gpu_only_bundles():
    p = plan("learner.cpus_per_worker=0", "learner.gpus_per_worker=1")
    assert p.groups[1].bundles == [{"GPU": 1.0}] * 2


def test_colocate_shares_bundle_i_between_rollout_i_and_learner_i():
    p = plan("ray.colocate=true", "rollout.num_workers=2", "learner.num_workers=2",
             "rollout.gpus_per_worker=0.5", "learner.gpus_per_worker=0.5")
    (group,) = p.groups
    assert group.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert p.rollout_slots == p.learner_slots == [(0, 0), (0, 1)]


def test_colocate_with_unequal_counts_gives_extra_actors_their_own_size():
    p = plan("ray.colocate=true", "rollout.num_workers=3", "learner.num_workers=1")
    (group,) = p.groups
    assert group.bundles == [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert p.rollout_slots == [(0, 0), (0, 1), (0, 2)]
    assert p.learner_slots == [(0, 0)]


def test_descriptions_used_in_errors():
    assert format_bundle({"GPU": 1.0, "CPU": 0.5}) == "{CPU: 0.5, GPU: 1}"
    assert GroupPlan("rollout", [{"CPU": 1.0}] * 3, "PACK").describe() == "3 x {CPU: 1}"
    assert GroupPlan("x", [{"CPU": 2.0}, {"CPU": 1.0}], "PACK").describe() == "[{CPU: 2}, {CPU: 1}]"


@pytest.mark.parametrize("overrides, key", [
    (["ray.placement_strategy=TIGHT"], "ray.placement_strategy"),
    (["ray.placement_timeout_s=0"], "ray.placement_timeout_s"),
    (["rollout.cpus_per_worker=0"], "rollout.cpus_per_worker"),
    (["learner.cpus_per_worker=0"], "learner.cpus_per_worker"),
])
def test_bad_placement_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=overrides)
