"""A rollout worker's side of a weight update, on a real vLLM engine in a real Ray actor.

The test process plays learner rank 0 of the broadcast, with the same trainer engine a
learner uses (``learner.weight_transfer``), over the gloo wire:
- a push lands, and the same weights give the same engine state whatever came before;
- a learner lost in the middle of a push leaves the engine parked with vLLM's update
  flag set: the next push clears it, re-forms the group and lands, and the engine serves;
- an update is atomic: requests running when it starts finish under the old weights, and
  requests that arrive while it runs start under the new ones.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

pytestmark = pytest.mark.integration

BUCKET_BYTES = 64 << 10  # several buckets for the tiny model, so a push can fail midway


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import ray
    from transformers import AutoModelForCausalLM

    from conf.load import load_config
    from conf.schema import TinyModelConfig
    from conf.validate import resolve_auto
    from launch.models.tiny_model import build_tiny_model
    from rollout.worker import RolloutWorker, engine_env

    model_dir = str(build_tiny_model(tmp_path_factory.mktemp("model") / "tiny",
                                     TinyModelConfig(warm_start_steps=0)))
    cfg = resolve_auto(load_config(overrides=["rollout.weight_sync=broadcast", "rollout.timeout_s=20"]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(RolloutWorker).options(
        num_cpus=1, max_concurrency=8, runtime_env={"env_vars": engine_env(cfg.rollout)}).remote(
        0, model_dir, cfg.model, cfg.rollout, 0)
    ray.get(worker.ready.remote(), timeout=600)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    yield {"worker": worker, "model": model, "cfg": cfg}
    ray.shutdown()


def perturbed(model, seed: int):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return other


def open_group(worker, source):
    from learner.actor import free_port
    from learner.weight_transfer import open_broadcast

    return open_broadcast("gloo", rank=0, address="127.0.0.1", port=free_port(), handles=[worker],
                          engine_world_sizes=[1], bucket_bytes=BUCKET_BYTES, timeout_s=20,
                          source=source)


def push(worker, model, version: int) -> float:
    """One whole push, as the driver and learner rank 0 make it; the engine's checksum."""
    import ray

    from learner.weight_broadcast import LayerwiseParameters

    ray.get(worker.begin_weight_update.remote(False), timeout=60)
    trainer = open_group(worker, LayerwiseParameters(model, zero3=False))
    try:
        trainer.send_weights()
    finally:
        trainer.shutdown()
    ray.get(worker.end_weight_update.remote(version), timeout=60)
    return ray.get(worker.weights_checksum.remote(), timeout=60)


def generate(worker, group_id: str, max_tokens: int = 8):
    import ray

    from rollout.types import GroupRequest, SamplingSettings

    ray.get(worker.submit.remote([GroupRequest(group_id, [1, 2, 3], SamplingSettings(
        samples_per_prompt=2, temperature=1.0, top_p=1.0, max_response_tokens=max_tokens,
        seed=0))]), timeout=60)


def wait_finished(worker, group_ids: set[str], within_s: float = 120):
    import ray

    found, deadline = {}, time.monotonic() + within_s
    while set(found) != group_ids:
        assert time.monotonic() < deadline, f"groups {group_ids - set(found)} never finished"
        report = ray.get(worker.poll.remote(0.5), timeout=60)
        found.update({g.group_id: g for g in report.finished})
    return found


def test_the_same_weights_give_the_same_engine_whatever_came_before(engine):
    worker, model = engine["worker"], engine["model"]
    first = push(worker, model, 1)
    moved = push(worker, perturbed(model, 1), 2)
    again = push(worker, model, 3)
    assert moved != first and again == first


def test_a_learner_lost_mid_push_leaves_nothing_the_next_push_cannot_clear(engine):
    import ray

    from learner.weight_broadcast import LayerwiseParameters

    worker, model = engine["worker"], engine["model"]
    target = perturbed(model, 2)
    expected = push(worker, target, 4)
    push(worker, model, 5)

    class DiesMidway(LayerwiseParameters):
        def __iter__(self):
            for index, pair in enumerate(super().__iter__()):
                if index == len(self.params) // 2:
                    raise RuntimeError("learner rank 0 died")
                yield pair

    ray.get(worker.begin_weight_update.remote(False), timeout=60)
    trainer = open_group(worker, DiesMidway(target, zero3=False))
    with pytest.raises(RuntimeError, match="died"):
        trainer.send_weights()
    trainer.shutdown()  # what the dead learner's process leaves: a closed group
    # The engine is still parked, inside or past a failed update; the next push starts
    # by leaving it, and lands whole.
    assert push(worker, target, 6) == expected
    generate(worker, "after-failure")
    (group,) = wait_finished(worker, {"after-failure"}).values()
    assert all(s.weight_version == 6 for s in group.samples)


def test_running_requests_finish_under_the_old_weights_and_new_ones_wait_for_the_new(engine):
    import ray

    from learner.weight_broadcast import LayerwiseParameters

    worker, model = engine["worker"], engine["model"]
    push(worker, model, 7)
    generate(worker, "running", max_tokens=200)
    time.sleep(0.1)  # the engine takes it on at once; 200 tokens keep it running a while
    ray.get(worker.begin_weight_update.remote(False), timeout=60)  # returns once drained
    generate(worker, "arrived-during-update")
    trainer = open_group(worker, LayerwiseParameters(perturbed(model, 3), zero3=False))
    try:
        trainer.send_weights()
    finally:
        trainer.shutdown()
    ray.get(worker.end_weight_update.remote(8), timeout=60)
    groups = wait_finished(worker, {"running", "arrived-during-update"})
    assert {s.weight_version for s in groups["running"].samples} == {7}
    assert all(set(s.versions()) == {7} for s in groups["running"].samples)
    assert {s.weight_version for s in groups["arrived-during-update"].samples} == {8}


def test_many_interrupts_under_concurrent_polls_lose_no_group(engine):
    """Partial updates (every running sample interrupted and continued) land over and over
    while another thread polls as fast as it can and the driver keeps submitting: every
    group comes back exactly once, whole, each token tagged with the version that wrote it."""
    import threading

    import ray

    from rollout.types import GroupRequest, SamplingSettings

    worker = engine["worker"]
    first_version = 100
    ray.get(worker.begin_weight_update.remote(False), timeout=60)
    ray.get(worker.end_weight_update.remote(first_version), timeout=60)

    received: list = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def poll_forever():
        try:
            while not stop.is_set():
                received.extend(ray.get(worker.poll.remote(0.005), timeout=60).finished)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    poller = threading.Thread(target=poll_forever)
    poller.start()
    submitted: set[str] = set()
    version = first_version
    try:
        for wave in range(6):
            groups = [GroupRequest(f"stress-{wave}-{i}", [1, 2, 3 + i % 5], SamplingSettings(
                samples_per_prompt=2, temperature=1.0, top_p=1.0, max_response_tokens=24,
                seed=wave * 100 + i)) for i in range(6)]
            ray.get(worker.submit.remote(groups), timeout=60)
            submitted |= {g.group_id for g in groups}
            for _ in range(4):
                time.sleep(0.02)
                version += 1
                ray.get(worker.begin_weight_update.remote(True), timeout=60)
                ray.get(worker.end_weight_update.remote(version), timeout=60)
        deadline = time.monotonic() + 180
        while {g.group_id for g in received} != submitted and time.monotonic() < deadline \
                and not errors:
            time.sleep(0.1)
    finally:
        stop.set()
        poller.join(timeout=120)
    assert not errors, errors
    ids = [g.group_id for g in received]
    assert len(ids) == len(set(ids)), "a group came back twice"
    assert set(ids) == submitted, f"lost: {sorted(submitted - set(ids))}"
    interrupted = 0
    for group in received:
        assert len(group.samples) == 2, group.group_id
        for sample in group.samples:
            versions = sample.versions()
            assert len(versions) == len(sample.response_token_ids) == len(sample.response_logprobs)
            if not versions:
                continue
            assert versions == sorted(versions) and first_version <= versions[0] <= version
            assert sample.weight_version == versions[0]
            interrupted += len(set(versions)) > 1
    # The updates really cut into running responses.
    assert interrupted > 0
