"""Lost nodes: which placement bundles can take a replacement actor, and waiting for one.

When a node is lost (preempted, kernel panic, raylet killed) its raylet and every actor
on it die at once. The driver usually notices before Ray does: a call to an actor there
fails within seconds, while Ray declares the node dead only once its health checks have
failed (``health_check_period_ms`` x ``health_check_failure_threshold``: 15 s with Ray's
defaults). Until then Ray still counts the node, and the placement-group bundles on it,
as alive, and an actor started in such a bundle is sent to the dead node: it never
starts, or starts only once Ray has moved the bundle.

So before it starts a replacement in a bundle, lpreg asks the bundle's node itself: a
TCP connection to its raylet's port, which a lost node refuses (its raylet is gone) or
never answers. A bundle can take an actor when Ray has placed it on a node that Ray
counts alive and whose raylet answers. Once Ray declares the node dead it moves the
bundle to a node with room, or leaves it unplaced until a node joins; waiting for that is
bounded by ``ray.node_wait_s`` where the run cannot go on without the actor.

The decisions are pure functions of what Ray and the probe report (``bundle_problem``,
``wait_for_room``); ``NodeWatch`` asks them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from launch.cluster.remote import RunStopped

log = logging.getLogger("lpreg")

PROBE_TIMEOUT_S = 1.0  # a raylet on a live node accepts at once; a dead machine never answers


class NodeWaitTimeout(RunStopped):
    """No node had room for what the run needs within ``ray.node_wait_s``."""


@dataclass(frozen=True)
class NodeInfo:
    alive: bool  # as Ray counts it
    address: str
    raylet_port: int


def bundle_problem(node_id: str | None, nodes: dict[str, NodeInfo],
                   answers: Callable[[NodeInfo], bool]) -> str | None:
    """Why a bundle placed on ``node_id`` cannot take an actor now, or None when it can."""
    if not node_id:
        return "no live node has room for it"
    node = nodes.get(node_id)
    if node is None or not node.alive:
        return "its node is dead"
    if not answers(node):
        return "its node does not answer; Ray has not declared it dead yet"
    return None


def wait_for_room(missing: Callable[[], list[str]], timeout_s: float, what: str, *,
                  tick: Callable[[], object] | None = None, poll_s: float = 0.5,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], object] = time.sleep) -> float:
    """Wait until ``missing()`` is empty; returns the seconds waited.

    ``missing()`` names what has no room (e.g. ``learner-1: its node is dead``); ``tick``
    keeps the caller's other work moving while it waits (it should take about ``poll_s``;
    without it the wait sleeps that long). Past ``timeout_s`` it raises
    ``NodeWaitTimeout`` with one line that names what found no room and the key to raise.
    """
    started = clock()
    lacking = missing()
    if not lacking:
        return 0.0
    log.warning("no room for %s (%s); waiting up to %gs (ray.node_wait_s) for a node to join",
                what, "; ".join(lacking), timeout_s)
    while lacking:
        if clock() - started >= timeout_s:
            raise NodeWaitTimeout(
                f"no node had room for {what} within ray.node_wait_s={timeout_s:g}s "
                f"({'; '.join(lacking)}), so the run stops; add nodes (or raise ray.node_wait_s), "
                f"then resume with trainer.resume=auto")
        if tick is not None:
            tick()
        else:
            sleep(poll_s)
        lacking = missing()
    waited = clock() - started
    log.warning("a node has room for %s after %.1fs of waiting", what, waited)
    return waited


def raylet_answers(node: NodeInfo, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the node's raylet accepts a connection (it serves gRPC on that port)."""
    try:
        with socket.create_connection((node.address, node.raylet_port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ray_nodes() -> dict[str, NodeInfo]:
    import ray

    return {n["NodeID"]: NodeInfo(bool(n.get("Alive")), n.get("NodeManagerAddress", ""),
                                  int(n.get("NodeManagerPort") or 0)) for n in ray.nodes()}


class NodeWatch:
    """Asks Ray for its nodes and each node's raylet whether it answers."""

    def __init__(self, nodes: Callable[[], dict[str, NodeInfo]] = ray_nodes,
                 answers: Callable[[NodeInfo], bool] = raylet_answers):
        self._nodes, self._answers = nodes, answers

    def problems(self, node_ids: list[str | None]) -> list[str | None]:
        """``bundle_problem`` for each node: one question to Ray, one probe per node."""
        nodes = self._nodes()
        probed: dict[NodeInfo, bool] = {}

        def answers(node: NodeInfo) -> bool:
            if node not in probed:
                probed[node] = self._answers(node)
            return probed[node]

        return [bundle_problem(node, nodes, answers) for node in node_ids]


def bundle_nodes(group) -> dict[int, str]:
    """Bundle index -> the node Ray placed it on ("" while it waits for room)."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(group)
    return {int(index): node or "" for index, node in (table.get("bundles_to_node_id") or {}).items()}
