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
from typing import TYPE_CHECKING

from conf.schema import LpregConfig
from launch.cluster.remote import wait_named

if TYPE_CHECKING:
    from launch.cluster.learner_group import LearnerGroup
    from launch.cluster.rollout_group import RolloutGroup


@dataclass
class SyncReport:
    version: int
    seconds: float
    num_tensors: int
    num_bytes: int


class WeightSync(ABC):
    """Publishes the learners' current weights to every rollout worker."""

    def __init__(self, learners: LearnerGroup, rollout: RolloutGroup, timeout_s: float):
        self.learners = learners
        self.rollout = rollout
        self.timeout_s = timeout_s

    @abstractmethod
    def push(self, version: int) -> SyncReport:
        """Send the weights; returns once every rollout worker serves ``version``."""


class ObjectStoreWeightSync(WeightSync):
    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        # Every rank takes part, because ZeRO-3 has to gather the shards; rank 0's
        # result is the full state. The object reference goes to the workers as it
        # is, so the driver never downloads the weights.
        exports = self.learners.export_weights_refs()
        loads = {name: worker.load_weights.remote(exports[0], version)
                 for name, worker in self.rollout.named_workers()}
        wait_named(loads, self.timeout_s, "load new weights")
        stats = wait_named({"learner-0": self.learners.rank0.last_export_stats.remote()},
                           self.timeout_s, "report its weight export")["learner-0"]
        wait_named({f"learner-{i}": ref for i, ref in enumerate(exports)},
                   self.timeout_s, "export weights")
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=stats[0], num_bytes=stats[1])


class NcclWeightSync(WeightSync):
    """GPU path: vLLM's NCCL weight transfer, one group per rollout worker.

    Learner rank 0 is NCCL rank 0 in a group with each engine's tensor-parallel ranks
    and broadcasts bucket by bucket (vLLM packs the tensors into fixed-size buffers).
    Other learner ranks only join the ZeRO-3 gather. Requires CUDA on both sides.
    """

    def __init__(self, learners: LearnerGroup, rollout: RolloutGroup, timeout_s: float):
        super().__init__(learners, rollout, timeout_s)
        self._initialised = False

    def _initialise(self) -> None:
        handles = [worker for _, worker in self.rollout.named_workers()]
        wait_named({"learner-0": self.learners.rank0.init_nccl_weight_transfer.remote(
            handles, self.rollout.cfg.tensor_parallel_size)}, self.timeout_s,
            "open the NCCL weight-transfer groups")
        self._initialised = True

    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        if not self._initialised:
            self._initialise()
        sends = self.learners.send_weights_nccl_refs()
        wait_named({f"learner-{i}": ref for i, ref in enumerate(sends)}, self.timeout_s,
                   "broadcast weights over NCCL")
        wait_named({name: worker.set_weight_version.remote(version)
                    for name, worker in self.rollout.named_workers()},
                   self.timeout_s, "record the new weight version")
        stats = wait_named({"learner-0": self.learners.rank0.last_export_stats.remote()},
                           self.timeout_s, "report its weight export")["learner-0"]
        return SyncReport(version=version, seconds=time.perf_counter() - start,
                          num_tensors=stats[0], num_bytes=stats[1])


def weight_transport(cfg: LpregConfig) -> str:
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "nccl" if cfg.rollout.gpus_per_worker > 0 else "object_store"


# rollout.weight_sync -> transport; conf.schema.WEIGHT_SYNC_TRANSPORTS adds "auto".
TRANSPORTS: dict[str, type[WeightSync]] = {
    "object_store": ObjectStoreWeightSync,
    "nccl": NcclWeightSync,
}


def make_weight_sync(transport: str, learners: LearnerGroup, rollout: RolloutGroup,
                     timeout_s: float) -> WeightSync:
    return TRANSPORTS[transport](learners, rollout, timeout_s)
