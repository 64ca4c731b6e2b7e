"""Weight sync from the learners to every rollout worker, behind one interface.

Two transports:

* ``ObjectStoreWeightSync`` (CPU, and any single-node set-up without NCCL): learner
  rank 0 puts its full state into Ray's object store once; every rollout worker reads
  the same object and reloads its engine in place.
* ``BroadcastWeightSync`` (GPU, and CPU on request): learner rank 0 broadcasts the
  weights straight into every engine through vLLM's weight-transfer API, over NCCL on
  GPUs and gloo on CPUs. Nothing passes through the driver or the object store.

Both bump a weight version that every later ``Sample`` carries, so staleness is
visible in the metrics.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.cluster.learner_group import LearnerGroup
    from launch.cluster.rollout_pool import RolloutPool

log = logging.getLogger("lpreg")


@dataclass
class SyncReport:
    version: int
    seconds: float
    num_tensors: int
    num_bytes: int


class WeightSync(ABC):
    """Publishes the learners' current weights to every rollout worker.

    ``partial``: samples still generating continue under the new weights instead of
    finishing under the old ones first (``rollout.partial_rollout``).
    """

    def __init__(self, learners: LearnerGroup, pool: RolloutPool, timeout_s: float, partial: bool):
        self.learners = learners
        self.pool = pool
        self.timeout_s = timeout_s
        self.partial = partial

    @abstractmethod
    def push(self, version: int) -> SyncReport:
        """Send the weights; returns once every live rollout worker serves ``version``."""


class ObjectStoreWeightSync(WeightSync):
    def __init__(self, learners: LearnerGroup, pool: RolloutPool, timeout_s: float, partial: bool):
        super().__init__(learners, pool, timeout_s, partial)
        self.current: tuple[Any, int] | None = None
        pool.load_current_weights = self._load_current

    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        # Every rank takes part, because ZeRO-3 has to gather the shards; rank 0's
        # result is the full state. The object reference goes to the workers as it
        # is, so the driver never downloads the weights.
        exports = self.learners.export_weights_refs()
        # The export must be whole before any worker is asked to load it: a learner that
        # died or failed while exporting is the learners' loss, not every worker's. Rank 0
        # reports its export once done (fails if it failed); the other ranks' exports are
        # None, and a rank lost in the gathers fails its own. Rank 0's export itself is the
        # model: waiting on it here would copy the whole model into the driver.
        (stats, *_) = self.pool.wait_refs(
            [self.learners.rank0.last_export_stats.remote(), *exports[1:]], self.timeout_s,
            "the learners to export their weights")
        # Kept while it is current: a replacement worker loads it before serving.
        self.current = (exports[0], version)
        self.pool.push_weights(exports[0], version, self.partial)
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=stats[0], num_bytes=stats[1])

    def _load_current(self, worker) -> Any:
        if self.current is None:
            return None  # it loaded model.path, which is version 0
        weights, version = self.current
        return worker.load_weights.remote(weights, version, False)


class BroadcastWeightSync(WeightSync):
    """Learner rank 0 sends the weights straight into every engine: one broadcast per push
    over one group of learner rank 0 and every engine's ranks, through vLLM's
    weight-transfer API (vLLM's NCCL engine on GPUs, lpreg's gloo engine on CPUs).
    Nothing passes through the driver or the object store, and under ZeRO-3 the learners
    gather one layer at a time while it is sent.

    A push parks every engine that will receive (each finishes its running requests
    first, with a deadline counted from its last progress), re-forms the group if its
    members changed (only parked engines join), broadcasts, and resumes the engines under
    the new version. A replacement worker waits until the next push includes it. A
    rollout worker lost inside the broadcast costs one retry without it; a learner rank
    lost there leaves the group to be re-formed by the rebuilt learners' first push.
    """

    def __init__(self, learners: LearnerGroup, pool: RolloutPool, timeout_s: float, partial: bool):
        super().__init__(learners, pool, timeout_s, partial)
        from conf.validate import broadcast_wire

        self.wire = broadcast_wire(pool.cfg)
        self.members: list | None = None  # the engines' handles, in group order, once formed
        pool.load_current_weights = self._join_at_next_push
        pool.serve_awaiting = lambda: self.push(pool.current_version)

    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        try:
            num_tensors, num_bytes = self._push(version)
        except BaseException:
            self.members = None  # whatever failed, the next push forms a new group
            raise
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=num_tensors, num_bytes=num_bytes)

    def _push(self, version: int) -> tuple[int, int]:
        from launch.cluster.remote import is_actor_death

        for attempt in (1, 2):
            receivers = self.pool.call_workers(
                self.pool.live_slots() + self.pool.awaiting_slots(),
                lambda handle: handle.begin_weight_update.remote(self.partial),
                "pause for new weights")
            handles = [slot.handle for slot in receivers]
            try:
                self._form_group(receivers, handles)
                (stats, *_) = self.pool.wait_refs(self.learners.broadcast_weights_refs(),
                                                  self.timeout_s, "the learners to broadcast weights")
            except Exception as err:
                if attempt == 2 or is_actor_death(err) or not self._lost_any(receivers, handles):
                    raise
                log.warning("a rollout worker was lost during the weight broadcast (%s); "
                            "broadcasting again without it", err)
                self.members = None
                self.pool.call_workers(self._still_held(receivers, handles),
                                       lambda handle: handle.abandon_weight_update.remote(),
                                       "leave the failed weight update")
                continue
            held = self._still_held(receivers, handles)
            done = self.pool.call_workers(held, lambda handle: handle.end_weight_update.remote(version),
                                          f"resume under weights v{version}")
            self.pool.go_live(done, version)
            return tuple(stats)
        raise AssertionError("unreachable")

    def _form_group(self, receivers: list, handles: list) -> None:
        if self.members is not None and len(handles) == len(self.members) and all(
                a is b for a, b in zip(handles, self.members, strict=True)):
            return
        self.members = None
        # Any earlier group is closed on the engines' side first; the learners close
        # theirs as they open the new one.
        closed = self.pool.call_workers(
            receivers, lambda handle: handle.shutdown_weight_transfer_engine.remote(),
            "close its old weight-transfer group")
        if len(closed) != len(receivers):
            raise RuntimeError("a rollout worker was lost while the weight-transfer group formed")
        tp = self.pool.cfg.tensor_parallel_size
        self.pool.wait_refs(self.learners.open_weight_transfer_refs(
            self.wire, handles, [tp] * len(handles), self.pool.cfg.broadcast_bucket_mb << 20,
            self.timeout_s), self.timeout_s, "learner-0 to open the weight-broadcast group")
        self.members = handles

    def _still_held(self, receivers: list, handles: list) -> list:
        """The receivers whose worker is the one that was parked (not lost, not replaced)."""
        return [slot for slot, handle in zip(receivers, handles, strict=True)
                if slot.handle is handle and slot.state in ("live", "awaiting")]

    def _lost_any(self, receivers: list, handles: list, settle_s: float = 5.0) -> bool:
        """Whether a receiver was lost. A broadcast fails the moment a peer's connection
        drops, while Ray may take a moment to report the actor dead: give it that."""
        deadline = time.monotonic() + settle_s
        while len(self._still_held(receivers, handles)) == len(receivers):
            if time.monotonic() > deadline:
                return False
            self.pool.poll(0.2)
        return True

    def _join_at_next_push(self, worker) -> Any:
        from launch.cluster.rollout_pool import AWAIT_NEXT_PUSH

        return AWAIT_NEXT_PUSH if self.pool.current_version > 0 else None


# rollout.weight_sync, as conf.validate.resolve_auto leaves it -> transport;
# conf.schema.WEIGHT_SYNC_TRANSPORTS adds "auto" and the old names.
TRANSPORTS: dict[str, type[WeightSync]] = {
    "object_store": ObjectStoreWeightSync,
    "broadcast": BroadcastWeightSync,
}


def make_weight_sync(transport: str, learners: LearnerGroup, pool: RolloutPool,
                     timeout_s: float, partial: bool) -> WeightSync:
    return TRANSPORTS[transport](learners, pool, timeout_s, partial)
