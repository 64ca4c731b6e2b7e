"""The rollout workers as one pool: routing, streaming, and healing.

- **Routing.** Whole GRPO groups go to the live worker with the fewest samples in flight,
  as long as it has room (``rollout.max_num_seqs``); the rest wait here and go to whichever
  worker frees up first, so a slow worker or a long answer holds back only its own groups.
- **Streaming.** Every live worker always has one ``poll`` outstanding. A poll returns the
  groups that finished since the last one, or an empty heartbeat after ``POLL_S``; the
  driver collects groups as they finish instead of waiting for a whole shard.
- **Healing.** A worker is lost when a call raises Ray's actor-death error, when it leaves
  a poll unanswered for ``rollout.timeout_s``, or when it holds work without progress for
  that long (it is then killed). Its groups go straight back to the queue, so the survivors
  take them, nothing lost and nothing twice, and a replacement starts in the background
  in the same placement bundle. The replacement receives the current weights before it is
  given any work: it loads them at once from the object store, or, under the broadcast,
  waits ("awaiting") until the next push includes it. ``rollout.max_restarts`` bounds
  replacements over the run.
- **Lost nodes.** A replacement is started only once its bundle sits on a node that can
  take it (``launch.cluster.nodes``): Ray may not have declared a lost node dead yet, or
  have no room left. The slot "waits" meanwhile, while the other workers carry the run;
  with no worker left, the run stops after ``ray.node_wait_s`` without room.

The pool is driven by its caller: ``poll`` (or anything that waits through it) is the only
place where work moves, so the driver calls it while it waits for anything else too.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from conf.schema import ModelConfig, RolloutConfig
from launch.cluster.remote import (
    RemoteTimeoutError,
    RunStopped,
    died_with_node,
    is_actor_death,
    is_unreachable,
)
from launch.reporting.output import actor_log_env
from rollout.types import GroupRequest, GroupResult, WorkerReport
from rollout.worker import RolloutWorker, engine_env

log = logging.getLogger("lpreg")

POLL_S = 0.5  # how long a worker's poll waits for a finished group before answering empty
# Threads of a worker actor: a poll, a submit, a weight load and an abort may overlap.
WORKER_CONCURRENCY = 8
ROOM_CHECK_S = 0.5  # how often a waiting replacement asks Ray whether its bundle has a node
SERVING = ("starting", "loading", "awaiting", "live")  # states of a slot that has a worker


class RolloutFailure(RunStopped):
    """The rollout workers cannot go on (replacements exhausted, or none could start)."""


# What ``RolloutPool.load_current_weights`` returns for a replacement that receives the
# current weights with the next push instead of loading them itself.
AWAIT_NEXT_PUSH = "await next push"


class GroupIds:
    """Group ids that are never issued twice in a pool's life.

    Ray does not order the calls of a threaded actor, so a worker's result for a group the
    driver dropped (a reset after a lost learner, a re-dispatch) can arrive after a new
    group took the same name; a serial number keeps the two apart.
    """

    def __init__(self) -> None:
        self._serial = itertools.count()

    def __call__(self, name: str) -> str:
        return f"{name}#{next(self._serial)}"


def pick_worker(loads: dict[int, int], capacity: int, group_size: int) -> int | None:
    """The least-loaded worker with room for a group (lowest index on ties), or None.

    A worker with nothing in flight always takes a group, even one larger than its
    capacity, so an oversized group cannot wait forever.
    """
    for index, load in sorted(loads.items(), key=lambda item: (item[1], item[0])):
        if load == 0 or load + group_size <= capacity:
            return index
    return None


@dataclass
class WorkerSlot:
    """One position in the pool; a replacement takes over the slot of the worker it replaces."""

    index: int
    handle: Any = None
    # (waiting for room ->) starting -> loading or awaiting (weights) -> live; dead
    state: str = "starting"
    pid: int | None = None
    node: str | None = None
    node_id: str | None = None
    ready_ref: Any = None
    load_ref: Any = None
    poll_ref: Any = None
    poll_sent: float = 0.0
    in_flight: dict[str, GroupRequest] = field(default_factory=dict)
    in_flight_samples: int = 0
    busy_s: float = 0.0
    last_progress: float = 0.0
    last_in_flight: int = 0
    tool_calls: int = 0  # the worker's finished tool calls, as last reported
    tool_wait_s: float = 0.0  # its seconds with a sample waiting on a tool, as last reported
    tool_idle_s: float = 0.0  # the part of them with its engine idle
    started: float = 0.0
    interrupted_seen: int = 0  # the worker's own running count, as last reported
    lost_at: float | None = None  # detection time of the loss this slot is recovering from
    detected: str = ""
    waiting_since: float | None = None  # waiting for a node with room for its replacement

    @property
    def name(self) -> str:
        return f"rollout-{self.index}"


@dataclass
class PoolCounters:
    restarts: int = 0
    redispatched_requests: int = 0
    recovery_s: float = 0.0
    interrupted_samples: int = 0


class RolloutPool:
    """``placement``: a ``launch.cluster.placement.Placement`` (its ``rollout(i)`` strategy,
    ``rollout_lacking_room(i)``, ``nodes`` and ``node_wait_s``), or None to let Ray place workers."""

    def __init__(self, num_workers: int, model_path: str, model_cfg: ModelConfig,
                 cfg: RolloutConfig, seed: int, placement: Any = None,
                 on_change: Callable[[], None] | None = None, tool_cfg: Any = None) -> None:
        self.cfg = cfg
        self.tool_cfg = tool_cfg  # the sandbox's settings, for rollout.max_turns > 0
        self.model_path, self.model_cfg, self.seed = model_path, model_cfg, seed
        self.placement = placement
        self._room_checked = 0.0
        self._stalled_since: float | None = None  # no worker left, every slot waiting for room
        self.on_change = on_change  # called when the set of workers changes (actors.json)
        self.slots = [WorkerSlot(index) for index in range(num_workers)]
        self.pending: deque[GroupRequest] = deque()
        self.results: dict[str, GroupResult] = {}
        self.counters = PoolCounters()
        self.group_id = GroupIds()  # every GroupRequest's id comes from here
        # How a replacement gets the current weights, and their version: set by the weight
        # sync. It returns a load's ref, None (the model as loaded is current), or
        # AWAIT_NEXT_PUSH; serve_awaiting pushes the current weights to awaiting workers.
        self.load_current_weights: Callable[[Any], Any] | None = None
        self.serve_awaiting: Callable[[], Any] | None = None
        self.current_version = 0
        for slot in self.slots:
            self._start(slot)
        deadline = time.monotonic() + cfg.startup_timeout_s
        while any(s.state == "starting" for s in self.slots):
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in self.slots if s.state == "starting")
                self.shutdown()
                raise RemoteTimeoutError(f"timed out after {cfg.startup_timeout_s:.0f}s waiting for "
                                         f"{names} to start its vLLM engine")
            self.poll(1.0)

    # -- what the driver asks for --------------------------------------------------------
    def submit(self, groups: Iterable[GroupRequest]) -> None:
        self.pending.extend(groups)
        self._dispatch()

    def take(self, group_ids: Iterable[str]) -> dict[str, GroupResult]:
        """The finished groups among ``group_ids``, removed from the pool's results."""
        return {g: self.results.pop(g) for g in list(group_ids) if g in self.results}

    def wait_for(self, group_ids: list[str], *, poll_s: float = POLL_S) -> dict[str, GroupResult]:
        """Every group in ``group_ids``, while the pool routes, streams and heals."""
        wanted = set(group_ids)
        while not wanted <= self.results.keys():
            if self.serve_awaiting is not None and not self.live_slots() and self.awaiting_slots():
                # Every worker is a replacement waiting for a push, and none will come
                # while the driver waits for rollouts: the learners sit idle, holding
                # exactly the current version, so push it now.
                self.serve_awaiting()
            self.poll(poll_s)
        return self.take(group_ids)

    def generate(self, groups: list[GroupRequest]) -> list[GroupResult]:
        """Submit and wait: the groups' results in request order."""
        self.submit(groups)
        done = self.wait_for([g.group_id for g in groups])
        return [done[g.group_id] for g in groups]

    def wait_refs(self, refs: list, timeout_s: float, what: str) -> list:
        """``ray.get`` of refs of other actors (learners), keeping the pool moving meanwhile."""
        import ray

        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            if time.monotonic() > deadline:
                raise RemoteTimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            # A failed call raises now: its peers may be blocked on it in a collective.
            ray.get(ready)
            if pending:
                self.poll(0.05, extra=pending)
        return ray.get(refs)

    def live_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.state == "live"]

    def awaiting_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.state == "awaiting"]

    # -- weights -----------------------------------------------------------------------
    def push_weights(self, weights_ref: Any, version: int, partial: bool) -> None:
        """Every live worker loads ``weights_ref`` as ``version``; waits, healing meanwhile.
        A worker lost during the load is replaced like any other; its replacement loads
        these weights before it serves."""
        self.current_version = version
        self.call_workers(self.live_slots(),
                          lambda handle: handle.load_weights.remote(weights_ref, version, partial),
                          f"load weights v{version}")

    def call_workers(self, slots: list[WorkerSlot], call: Callable[[Any], Any],
                     what: str) -> list[WorkerSlot]:
        """``call(handle)`` on each of ``slots`` at once; waits for them, healing meanwhile.

        A weight update first lets a worker finish what it is generating, which can take
        long; the deadline (``rollout.timeout_s``) therefore runs from the call or from the
        worker's last progress, whichever is later. Returns the slots whose worker
        answered (a lost one is replaced like any other, and left out).
        """
        called = time.monotonic()
        handles = {}
        for slot in slots:
            slot.load_ref = call(slot.handle)
            handles[slot.index] = slot.handle
        serving = ("live", "awaiting")
        while waiting := [s for s in slots if s.load_ref is not None and s.state in serving
                          and s.handle is handles[s.index]]:
            now = time.monotonic()
            for slot in waiting:
                waited = now - max(called, slot.last_progress)
                if waited > self.cfg.timeout_s:
                    self._lose(slot, f"did not {what} in {waited:.0f}s without progress")
            self.poll(0.05)
        return [s for s in slots if s.state in serving and s.handle is handles[s.index]]

    def go_live(self, slots: list[WorkerSlot], version: int) -> None:
        """``slots`` hold weights ``version`` now: the awaiting ones among them may serve."""
        self.current_version = version
        for slot in slots:
            if slot.state == "awaiting":
                self._go_live(slot)

    def abort_all(self) -> None:
        """Drop every group, queued or generating (the learners went back in time)."""
        import ray

        self.pending.clear()
        self.results.clear()
        refs = {}
        for slot in self.live_slots():
            slot.in_flight.clear()
            slot.in_flight_samples = 0
            refs[slot.index] = (slot.handle, slot.handle.abort_all.remote())
        if refs:
            ray.wait([ref for _, ref in refs.values()], num_returns=len(refs), timeout=self.cfg.timeout_s)
        for index, (handle, ref) in refs.items():
            try:
                ray.get(ref, timeout=0)
            except Exception as err:  # noqa: BLE001 - a worker that fails here is found by its poll
                slot = self.slots[index]
                if is_actor_death(err) and slot.handle is handle and slot.state == "live":
                    # Lost now rather than at the next poll: the driver may not poll for a
                    # while (a learner rebuild), and its replacement can start meanwhile.
                    self._lose(slot, _death_reason(err))
                else:
                    log.warning("aborting rollout work: %s", err)

    def checksums(self) -> list[float]:
        import ray

        return ray.get([s.handle.weights_checksum.remote() for s in self.live_slots()],
                       timeout=self.cfg.timeout_s)

    def describe_actors(self) -> list[dict]:
        return [{"name": s.name, "pid": s.pid, "node": s.node, "node_id": s.node_id, "state": s.state}
                for s in self.slots]

    def busy_seconds(self) -> list[float]:
        return [s.busy_s for s in self.slots]

    def tool_wait_seconds(self) -> list[tuple[float, float]]:
        """Each slot's (seconds with a sample waiting on a tool, the part with its engine
        idle) since its worker started."""
        return [(s.tool_wait_s, s.tool_idle_s) for s in self.slots]

    # -- the engine of the pool: poll ------------------------------------------------------
    def poll(self, timeout_s: float, extra: list | None = None) -> list[GroupResult]:
        """Wait up to ``timeout_s`` for any worker to report (or any of ``extra`` to be
        ready); handle what arrived, losses included, and dispatch queued groups."""
        import ray

        refs = {}
        for slot in self.slots:
            for attr in ("ready_ref", "load_ref", "poll_ref"):
                ref = getattr(slot, attr)
                if ref is not None and slot.state != "dead":
                    refs[ref] = (slot, attr)
        waitable = list(refs) + list(extra or [])
        finished: list[GroupResult] = []
        if waitable:
            ready, _ = ray.wait(waitable, num_returns=1, timeout=timeout_s)
            if ready:  # take everything else that is ready too
                ready, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
            for ref in ready:
                if ref in refs:
                    slot, attr = refs[ref]
                    finished += self._handle(slot, attr, ref)
        else:
            time.sleep(timeout_s)
        self._check_deadlines()
        self._dispatch()
        return finished

    def _handle(self, slot: WorkerSlot, attr: str, ref) -> list[GroupResult]:
        import ray

        if getattr(slot, attr) is not ref or slot.state == "dead":
            # A second call of a worker lost earlier in the same poll (its poll and its
            # weight load fail together when its node goes): the slot has moved on.
            return []
        setattr(slot, attr, None)
        try:
            value = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - any failure of a worker call loses the worker
            self._lose(slot, _death_reason(err))
            return []
        if attr == "ready_ref":
            slot.pid, slot.node, slot.node_id = value["pid"], value["node"], value.get("node_id")
            self._catch_up(slot, loaded=0)
            return []
        if attr == "load_ref":
            if slot.state == "loading":
                self._catch_up(slot, loaded=value)
            return []
        report: WorkerReport = value
        return self._on_report(slot, report)

    def _on_report(self, slot: WorkerSlot, report: WorkerReport) -> list[GroupResult]:
        now = time.monotonic()
        if (report.busy_s > slot.busy_s or report.in_flight_samples != slot.last_in_flight
                or report.finished or report.tool_calls > slot.tool_calls):
            slot.last_progress = now
        slot.busy_s, slot.tool_calls = report.busy_s, report.tool_calls
        slot.tool_wait_s, slot.tool_idle_s = report.tool_wait_s, report.tool_idle_s
        slot.last_in_flight = report.in_flight_samples
        self.counters.interrupted_samples += max(0, report.interrupted_samples - slot.interrupted_seen)
        slot.interrupted_seen = report.interrupted_samples
        finished = []
        for group in report.finished:
            if slot.in_flight.pop(group.group_id, None) is None:
                continue  # re-dispatched elsewhere already: the copy that counts is the other
            slot.in_flight_samples -= len(group.samples)
            self.results[group.group_id] = group
            finished.append(group)
        self._send_poll(slot)
        return finished

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.timeout_s
        for slot in self.slots:
            if slot.state == "live" and slot.poll_ref is not None and now - slot.poll_sent > timeout:
                self._lose(slot, f"did not answer a poll for {now - slot.poll_sent:.0f}s")
            elif (slot.state == "live" and slot.in_flight and slot.load_ref is None
                  and now - slot.last_progress > timeout):
                self._lose(slot, f"made no progress on {len(slot.in_flight)} groups for "
                                 f"{now - slot.last_progress:.0f}s")
            # An awaiting worker is started; its next call (a push) has a deadline of its own.
            elif slot.state in ("starting", "loading") and now - slot.started > self.cfg.startup_timeout_s:
                self._lose(slot, f"did not start within {self.cfg.startup_timeout_s:.0f}s")
        self._check_waiting(now)

    def _check_waiting(self, now: float) -> None:
        """Start the replacements whose bundle found a node; stop the run when no worker is
        left and none found room within ``ray.node_wait_s``."""
        waiting = [s for s in self.slots if s.state == "waiting"]
        if not waiting:
            self._stalled_since = None
            return
        if now - self._room_checked >= ROOM_CHECK_S:
            self._room_checked = now
            for slot in waiting:
                if not self.placement.rollout_lacking_room(slot.index):
                    log.warning("%s: a node has room for its replacement after %.1fs of waiting",
                                slot.name, now - slot.waiting_since)
                    self._start(slot)
                    if self.on_change is not None:
                        self.on_change()
        if any(s.state in SERVING for s in self.slots):
            self._stalled_since = None
            return
        self._stalled_since = self._stalled_since or now
        if now - self._stalled_since > self.placement.node_wait_s:
            names = ", ".join(s.name for s in self.slots if s.state == "waiting")
            raise RolloutFailure(
                f"no rollout worker is left: {names} lost their node and no node had room for "
                f"a replacement within ray.node_wait_s={self.placement.node_wait_s:g}s, so the "
                f"run stops; add nodes (or raise ray.node_wait_s), then resume with "
                f"trainer.resume=auto")

    # -- routing ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        batches: dict[int, list[GroupRequest]] = {}
        live = {s.index: s for s in self.live_slots()}
        while self.pending and live:
            group = self.pending[0]
            n = group.sampling.samples_per_prompt
            index = pick_worker({i: s.in_flight_samples for i, s in live.items()},
                                self.cfg.max_num_seqs, n)
            if index is None:
                break
            self.pending.popleft()
            slot = live[index]
            slot.in_flight[group.group_id] = group
            slot.in_flight_samples += n
            if not batches.get(index):
                slot.last_progress = time.monotonic()
            batches.setdefault(index, []).append(group)
        for index, groups in batches.items():
            # Fire and forget: a worker that fails to take them is found by its poll.
            live[index].handle.submit.remote(groups)

    # -- losing and replacing workers ------------------------------------------------------
    def _lose(self, slot: WorkerSlot, detected: str) -> None:
        import ray

        lost_at = time.monotonic()
        was = slot.state
        slot.state = "dead"
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        groups = list(slot.in_flight.values())
        requests = sum(g.sampling.samples_per_prompt for g in groups)
        # Straight back to the front of the queue, in their original order.
        self.pending.extendleft(reversed(groups))
        slot.in_flight.clear()
        slot.in_flight_samples = 0
        for attr in ("ready_ref", "load_ref", "poll_ref"):
            setattr(slot, attr, None)
        self.counters.redispatched_requests += requests
        if self.counters.restarts >= self.cfg.max_restarts:
            raise RolloutFailure(
                f"{slot.name} (pid {slot.pid}) {detected}; rollout.max_restarts="
                f"{self.cfg.max_restarts} replacements are used up, so the run stops")
        self.counters.restarts += 1
        log.warning("%s (pid %s, %s) %s: %d groups (%d requests) re-queued for the other workers; "
                    "starting a replacement", slot.name, slot.pid, was, detected, len(groups), requests)
        slot.lost_at, slot.detected = lost_at, detected
        self._replace(slot)
        if self.on_change is not None:
            self.on_change()
        self._dispatch()

    def _replace(self, slot: WorkerSlot) -> None:
        """Start the slot's replacement, or let it wait for a node with room."""
        lacking = [] if self.placement is None else self.placement.rollout_lacking_room(slot.index)
        if not lacking:
            self._start(slot)
            return
        slot.state, slot.waiting_since = "waiting", time.monotonic()
        slot.pid = slot.node = slot.node_id = None
        self._room_checked = slot.waiting_since
        log.warning("%s's replacement waits for room (%s)", slot.name, "; ".join(lacking))

    def _start(self, slot: WorkerSlot) -> None:
        import ray

        options = dict(num_cpus=self.cfg.cpus_per_worker,
                       num_gpus=self.cfg.gpus_per_worker * self.cfg.tensor_parallel_size,
                       runtime_env={"env_vars": {**engine_env(self.cfg), **actor_log_env(slot.name)}},
                       max_concurrency=WORKER_CONCURRENCY, max_restarts=0)
        if self.placement is not None:
            options["scheduling_strategy"] = self.placement.rollout(slot.index)
        slot.handle = ray.remote(RolloutWorker).options(**options).remote(
            slot.index, self.model_path, self.model_cfg, self.cfg, self.seed, self.tool_cfg)
        slot.state, slot.started, slot.waiting_since = "starting", time.monotonic(), None
        slot.pid = slot.node = slot.node_id = None
        slot.busy_s, slot.last_in_flight, slot.interrupted_seen, slot.tool_calls = 0.0, 0, 0, 0
        slot.tool_wait_s = slot.tool_idle_s = 0.0
        slot.ready_ref = slot.handle.ready.remote()

    def _catch_up(self, slot: WorkerSlot, loaded: int) -> None:
        """A replacement serves nothing before it holds the weights the others hold.

        It loads the current weights, and loads again if a push for a newer version went
        to the live workers while it was loading (a push skips a worker still loading).
        """
        if slot.lost_at is None or loaded == self.current_version or self.load_current_weights is None:
            self._go_live(slot)
            return
        load = self.load_current_weights(slot.handle)
        if load is None:  # nothing was pushed yet: model.path is the current version
            self._go_live(slot)
        elif load is AWAIT_NEXT_PUSH:
            slot.state = "awaiting"
            if self.on_change is not None:
                self.on_change()
        else:
            slot.state, slot.load_ref = "loading", load

    def _go_live(self, slot: WorkerSlot) -> None:
        slot.state = "live"
        slot.last_progress = time.monotonic()
        self._send_poll(slot)
        if slot.lost_at is not None:
            took = time.monotonic() - slot.lost_at
            self.counters.recovery_s += took
            log.warning("recovered %s: it %s; replaced by pid %s, holding the current weights, "
                        "%.1fs after the loss was detected", slot.name, slot.detected, slot.pid, took)
            slot.lost_at = None
        if self.on_change is not None:
            self.on_change()
        self._dispatch()

    def _send_poll(self, slot: WorkerSlot) -> None:
        slot.poll_ref = slot.handle.poll.remote(POLL_S)
        slot.poll_sent = time.monotonic()

    def shutdown(self) -> None:
        import ray

        for slot in self.slots:
            if slot.handle is not None:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            slot.state = "dead"


def _death_reason(err: BaseException) -> str:
    """One line on why a worker call failed."""
    name = type(err).__name__
    if is_unreachable(err):
        return "became unreachable (its node may be lost)"
    if died_with_node(err):
        return "died with its node (Ray declared the node dead)"
    if is_actor_death(err):
        return "died (Ray reported the actor dead)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else name
    return f"failed: {first[:200]}"
