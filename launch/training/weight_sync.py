"""Weight sync from the learners to every rollout worker, behind one interface.

Two transports:

* ``ObjectStoreWeightSync`` (CPU, and any single-node set-up without NCCL): learner
  rank 0 puts its full state into Ray's object store once; every rollout worker reads
  the same object and reloads its engine in place.
* ``NcclWeightSync`` (GPU): learner rank 0 broadcasts parameters straight into each
  engine over NCCL through vLLM's weight-transfer API. Nothing passes through the
  driver or the object store.

Both bump a weight version that every later ``Sample`` carries, so staleness is
visible in the metrics.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conf.schema import LpregConfig

if TYPE_CHECKING:
    from launch.cluster.learner_group import LearnerGroup
    from launch.cluster.rollout_pool import RolloutPool


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

    def _export_stats(self) -> tuple[int, int]:
        (stats,) = self.pool.wait_refs([self.learners.rank0.last_export_stats.remote()],
                                       self.timeout_s, "learner-0 to report its weight export")
        return stats


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
        # Kept while it is current: a replacement worker loads it before serving.
        self.current = (exports[0], version)
        self.pool.push_weights(exports[0], version, self.partial)
        stats = self._export_stats()
        self.pool.wait_refs(exports, self.timeout_s, "the learners to export their weights")
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=stats[0], num_bytes=stats[1])

    def _load_current(self, worker) -> Any:
        if self.current is None:
            return None  # it loaded model.path, which is version 0
        weights, version = self.current
        return worker.load_weights.remote(weights, version, False)


class NcclWeightSync(WeightSync):
    """GPU path: vLLM's NCCL weight transfer, one group per rollout worker.

    Learner rank 0 is NCCL rank 0 in a group with each engine's tensor-parallel ranks
    and broadcasts bucket by bucket (vLLM packs the tensors into fixed-size buffers).
    Other learner ranks only join the ZeRO-3 gather. Requires CUDA on both sides.
    The engines are parked around the broadcast, as for the object-store path. A
    replacement worker cannot join the NCCL groups of a running run: losing a rollout
    worker with this transport stops the run.
    """

    def __init__(self, learners: LearnerGroup, pool: RolloutPool, timeout_s: float, partial: bool):
        super().__init__(learners, pool, timeout_s, partial)
        self._initialised = False
        pool.load_current_weights = self._cannot_replace

    def _initialise(self) -> None:
        handles = [slot.handle for slot in self.pool.live_slots()]
        self.pool.wait_refs([self.learners.rank0.init_nccl_weight_transfer.remote(
            handles, self.pool.cfg.tensor_parallel_size)], self.timeout_s,
            "learner-0 to open the NCCL weight-transfer groups")
        self._initialised = True

    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        if not self._initialised:
            self._initialise()
        workers = [slot.handle for slot in self.pool.live_slots()]
        self.pool.wait_refs([w.begin_weight_update.remote(self.partial) for w in workers],
                            self.timeout_s, "the rollout workers to pause for new weights")
        self.pool.wait_refs(self.learners.send_weights_nccl_refs(), self.timeout_s,
                            "the learners to broadcast weights over NCCL")
        self.pool.wait_refs([w.end_weight_update.remote(version) for w in workers],
                            self.timeout_s, "the rollout workers to record the new weight version")
        stats = self._export_stats()
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=stats[0], num_bytes=stats[1])

    def _cannot_replace(self, worker) -> Any:
        from launch.cluster.rollout_pool import RolloutFailure

        raise RolloutFailure("a rollout worker was lost, and a replacement cannot join the NCCL "
                             "weight transfer of a running run; resume the run from its newest "
                             "checkpoint (trainer.resume=auto), or use rollout.weight_sync=object_store")


def weight_transport(cfg: LpregConfig) -> str:
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "nccl" if cfg.rollout.gpus_per_worker > 0 else "object_store"


# rollout.weight_sync -> transport; conf.schema.WEIGHT_SYNC_TRANSPORTS adds "auto".
TRANSPORTS: dict[str, type[WeightSync]] = {
    "object_store": ObjectStoreWeightSync,
    "nccl": NcclWeightSync,
}


def make_weight_sync(transport: str, learners: LearnerGroup, pool: RolloutPool,
                     timeout_s: float, partial: bool) -> WeightSync:
    return TRANSPORTS[transport](learners, pool, timeout_s, partial)
