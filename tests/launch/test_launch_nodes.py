"""After a lost node: which bundles can take a replacement, and waiting for a node with room."""

from __future__ import annotations

import pytest

from launch.cluster.nodes import (
    NodeInfo,
    NodeWaitTimeout,
    NodeWatch,
    bundle_problem,
    raylet_answers,
    wait_for_room,
)
from launch.cluster.remote import RunStopped, died_with_node, is_actor_death, is_unreachable
from launch.cluster.rollout_pool import RolloutFailure, RolloutPool, WorkerSlot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


A, B, GONE = NodeInfo(True, "10.0.0.1", 1), NodeInfo(True, "10.0.0.2", 2), NodeInfo(False, "10.0.0.3", 3)
NODES = {"a": A, "b": B, "gone": GONE}


def test_a_bundle_can_take_an_actor_only_on_a_live_node_whose_raylet_answers():
    answering = {A}
    def answers(node):
        return node in answering
    assert bundle_problem("a", NODES, answers) is None
    assert bundle_problem("", NODES, answers) == "no live node has room for it"
    assert bundle_problem("gone", NODES, answers) == "its node is dead"
    assert bundle_problem("never-seen", NODES, answers) == "its node is dead"
    # Ray still counts b alive, but its raylet is gone: Ray has not noticed yet.
    assert "does not answer; Ray has not declared it dead yet" in bundle_problem("b", NODES, answers)


def test_each_node_is_probed_once_per_question():
    probes = []
    watch = NodeWatch(nodes=lambda: NODES, answers=lambda node: probes.append(node) or node is A)
    assert watch.problems(["a", "b", "a", "b", "gone", ""]) == [
        None, "its node does not answer; Ray has not declared it dead yet", None,
        "its node does not answer; Ray has not declared it dead yet", "its node is dead",
        "no live node has room for it"]
    assert probes == [A, B]


def test_the_probe_tells_a_listening_raylet_from_a_closed_port():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert raylet_answers(NodeInfo(True, "127.0.0.1", port))
    assert not raylet_answers(NodeInfo(True, "127.0.0.1", port))


def test_room_at_once_means_no_wait():
    assert wait_for_room(lambda: [], 10, "the learner group", clock=Clock()) == 0.0


def test_the_wait_ends_when_a_node_joins_within_the_timeout():
    clock = Clock()
    answers = iter([["learner-1: no live node has room for it"]] * 4 + [[]])
    ticks = []
    waited = wait_for_room(lambda: next(answers), 10, "the learner group",
                           tick=lambda: (ticks.append(clock.now), clock.sleep(0.5)), clock=clock)
    assert waited == pytest.approx(2.0)
    assert len(ticks) == 4


def test_past_the_timeout_the_run_stops_with_one_line_naming_the_key():
    clock = Clock()
    with pytest.raises(NodeWaitTimeout) as stopped:
        wait_for_room(lambda: ["learner-1: no live node has room for it"], 10, "the learner group",
                      clock=clock, sleep=clock.sleep)
    message = str(stopped.value)
    assert isinstance(stopped.value, RunStopped)  # the CLI prints it as one line, exit 1
    assert "\n" not in message
    assert "no node had room for the learner group within ray.node_wait_s=10s" in message
    assert "learner-1: no live node has room for it" in message
    assert "trainer.resume=auto" in message
    assert clock.now == pytest.approx(110.0)


class ActorUnavailableError(RuntimeError):
    """Named as Ray names it; the checks go by the name."""


class ActorDiedError(RuntimeError):
    pass


def test_unreachable_and_node_deaths_are_told_apart_from_a_plain_death():
    unreachable = ActorUnavailableError("RPC error: Socket closed")
    with_node = ActorDiedError("The actor died because its node has died. Node Id: 12ab")
    alone = ActorDiedError("The actor died unexpectedly before finishing this task.")
    assert all(is_actor_death(e) for e in (unreachable, with_node, alone))
    assert is_unreachable(unreachable) and not is_unreachable(alone)
    assert died_with_node(with_node) and not died_with_node(alone)
    wrapped = RuntimeError("learner-1 failed to save")
    wrapped.__cause__ = unreachable
    assert is_unreachable(wrapped)


class Placement:
    """The rollout pool's view of placement: room per slot, the node wait."""

    def __init__(self, room: dict[int, bool], node_wait_s: float = 10.0):
        self.room, self.node_wait_s = room, node_wait_s

    def rollout_lacking_room(self, index: int) -> list[str]:
        return [] if self.room[index] else [f"rollout-{index}: no live node has room for it"]


def waiting_pool(room: dict[int, bool], states: list[str]) -> tuple[RolloutPool, list[int]]:
    pool = RolloutPool.__new__(RolloutPool)
    pool.placement = Placement(room)
    pool.slots = [WorkerSlot(i, state=state, waiting_since=0.0 if state == "waiting" else None)
                  for i, state in enumerate(states)]
    pool._room_checked, pool._stalled_since, pool.on_change = 0.0, None, None
    started = []
    pool._start = lambda slot: (started.append(slot.index), setattr(slot, "state", "starting"))
    return pool, started


def test_a_waiting_replacement_starts_once_its_bundle_has_room():
    pool, started = waiting_pool({0: False, 1: True}, ["waiting", "waiting"])
    pool._check_waiting(now=1.0)
    assert started == [1]
    assert pool._stalled_since is None  # rollout-1 is starting: the run can go on


def test_with_a_worker_left_the_run_goes_on_while_a_replacement_waits():
    pool, started = waiting_pool({0: False}, ["waiting", "live"])
    pool._check_waiting(now=1000.0)
    assert started == [] and pool._stalled_since is None


def test_with_no_worker_left_the_run_stops_after_the_node_wait():
    pool, _ = waiting_pool({0: False, 1: False}, ["waiting", "waiting"])
    pool._check_waiting(now=1.0)
    pool._check_waiting(now=10.5)
    with pytest.raises(RolloutFailure) as stopped:
        pool._check_waiting(now=11.5)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("no rollout worker is left: rollout-0, rollout-1 lost their node")
    assert "ray.node_wait_s=10s" in message


def test_a_late_answer_of_a_lost_worker_is_ignored():
    # Its poll and its weight load fail in the same poll when its node goes: the first
    # loses the worker, the second must not lose its replacement too.
    pool, _ = waiting_pool({0: False}, ["waiting"])
    stale = object()
    assert pool._handle(pool.slots[0], "load_ref", stale) == []
    assert pool.slots[0].state == "waiting"
