"""The learner side of the broadcast transport, through vLLM's trainer registry.

vLLM's stock NCCL trainer assumes a single engine (every engine at ``rank_offset=1``).
lpreg runs one group over learner rank 0 and every engine, so that each push is one
broadcast that all engines receive: engine i joins at rank ``1 + the ranks of the engines
before it`` (its tensor-parallel size each). Two trainer engines do this, registered with
``WeightTransferTrainerFactory``:

- ``nccl_fanout`` (GPUs): vLLM's NCCL communicator; the engines run vLLM's own ``nccl``
  engine, which reads the packed layout ``rollout.weight_wire`` writes;
- ``gloo`` (CPUs): a torch gloo group; the engines run ``rollout.gloo_transfer``.

Both drive the inference side through vLLM's weight-transfer calls
(``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``) on the rollout workers' Ray handles, and send what
``learner.weight_broadcast.LayerwiseParameters`` yields, one layer at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from learner.weight_broadcast import LayerwiseParameters, broadcast_weights
from rollout.weight_wire import close_gloo_group, group_broadcast, open_gloo_group, update_info


class RolloutFleetClient:
    """vLLM's weight-sync client protocol over every rollout worker's Ray handle: each call
    goes to all of them at once and waits for all, up to ``timeout_s``."""

    def __init__(self, handles: list, timeout_s: float) -> None:
        self.handles = handles
        self.timeout_s = timeout_s

    def _all(self, method: str, argument_per_handle: list | None = None) -> None:
        import ray

        arguments = [()] * len(self.handles) if argument_per_handle is None else [
            (a,) for a in argument_per_handle]
        ray.get([getattr(h, method).remote(*args)
                 for h, args in zip(self.handles, arguments, strict=True)], timeout=self.timeout_s)

    def init_engines(self, init_infos: list[dict]) -> None:
        """Each engine its own init info: its own ranks in the group."""
        self._all("init_weight_transfer_engine", [{"init_info": info} for info in init_infos])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.init_engines([init_info] * len(self.handles))

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", [{"update_info": update_info}] * len(self.handles))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")


@dataclass
class _FanOutFields:
    master_address: str
    master_port: int
    engine_world_sizes: list[int]  # each engine's ranks in the group (its tensor-parallel size)
    bucket_bytes: int
    timeout_s: float

    @property
    def world_size(self) -> int:
        return 1 + sum(self.engine_world_sizes)

    def rank_offsets(self) -> list[int]:
        """Each engine's first rank: rank 0 is the learner, the engines follow in order."""
        offsets, first = [], 1
        for size in self.engine_world_sizes:
            offsets.append(first)
            first += size
        return offsets


@dataclass
class GlooFanOutInitInfo(_FanOutFields, TrainerInitInfo):
    backend: ClassVar[str] = "gloo"


@dataclass
class NcclFanOutInitInfo(_FanOutFields, TrainerInitInfo):
    backend: ClassVar[str] = "nccl_fanout"


class FanOutTrainer(TrainerWeightTransferEngine):
    """One broadcast group over learner rank 0 and every engine. Built on every learner
    rank: the others only take part in the layer gathers while rank 0 sends."""

    device: ClassVar[str]

    def __init__(self, *, client: RolloutFleetClient, source: LayerwiseParameters,
                 is_sender: bool, info: _FanOutFields) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = info
        self.group: Any = None
        self.sent = (0, 0)  # tensors and bytes of the last push

    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        if source is None:
            raise ValueError("a broadcast needs the weights to send (a LayerwiseParameters)")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, info=init_info)
        if engine.is_sender:
            infos = [engine.engine_init_info(offset) for offset in init_info.rank_offsets()]
            # The engines wait inside the rendezvous until rank 0 opens its end: both at once.
            with ThreadPoolExecutor(max_workers=1) as side:
                joined = side.submit(client.init_engines, infos)
                engine.group = engine.open_group()
                joined.result()
        return engine

    def send_weights(self) -> None:
        info = self.info
        if not self.is_sender:
            self.sent = broadcast_weights(self.source, info.bucket_bytes, None, self.device)
            return
        self.client.start_weight_update()
        side = ThreadPoolExecutor(max_workers=1)
        try:
            # The engines receive inside update_weights while rank 0 broadcasts.
            received = side.submit(self.client.update_weights, update_info(self.source.metadata()))
            self.sent = broadcast_weights(self.source, info.bucket_bytes, self.broadcast_fn(),
                                          self.device)
            received.result()
        finally:
            # Never wait for the receivers here: after a failed broadcast they are still
            # inside theirs, and only closing the group (shutdown) lets them out.
            side.shutdown(wait=False)
        self.client.finish_weight_update()

    # -- per wire ----------------------------------------------------------------------
    def engine_init_info(self, rank_offset: int) -> dict:
        raise NotImplementedError

    def open_group(self) -> Any:
        raise NotImplementedError

    def broadcast_fn(self):
        raise NotImplementedError


class GlooFanOutTrainer(FanOutTrainer):
    init_info_cls = GlooFanOutInitInfo
    device = "cpu"

    def engine_init_info(self, rank_offset: int) -> dict:
        # The fields of rollout.gloo_transfer.GlooWeightTransferInitInfo.
        info = self.info
        return {"master_address": info.master_address, "master_port": info.master_port,
                "rank_offset": rank_offset, "world_size": info.world_size,
                "bucket_bytes": info.bucket_bytes, "timeout_s": info.timeout_s}

    def open_group(self) -> Any:
        info = self.info
        return open_gloo_group(info.master_address, info.master_port, 0, info.world_size,
                               info.timeout_s)

    def broadcast_fn(self):
        return group_broadcast(self.group)

    def shutdown(self) -> None:
        if self.group is not None:
            close_gloo_group(self.group)
            self.group = None


class NcclFanOutTrainer(FanOutTrainer):
    init_info_cls = NcclFanOutInitInfo
    device = "cuda"

    def engine_init_info(self, rank_offset: int) -> dict:
        from vllm.distributed.weight_transfer.nccl_common import (
            NCCLWeightTransferInitInfo,
            worker_init_payload,
        )

        info = self.info
        # Packed, with lpreg's bucket size: vLLM's consumer cuts the buckets
        # rollout.weight_wire packs.
        return worker_init_payload(NCCLWeightTransferInitInfo(
            master_address=info.master_address, master_port=info.master_port,
            rank_offset=rank_offset, world_size=info.world_size, packed=True,
            packed_buffer_size_bytes=info.bucket_bytes))

    def open_group(self) -> Any:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        return trainer_init(self.info, rank=0)

    def broadcast_fn(self):
        group = self.group

        def broadcast(tensor: torch.Tensor) -> None:
            group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())

        return broadcast

    def send_weights(self) -> None:
        super().send_weights()
        # Broadcasts are only enqueued: the parameters may change once this returns.
        torch.cuda.current_stream().synchronize()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def register_trainer_engines() -> None:
    """Both fan-out trainers in vLLM's trainer registry (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    for name, engine in (("gloo", GlooFanOutTrainer), ("nccl_fanout", NcclFanOutTrainer)):
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, engine)


def open_broadcast(wire: str, *, rank: int, address: str, port: int, handles: list,
                   engine_world_sizes: list[int], bucket_bytes: int, timeout_s: float,
                   source: LayerwiseParameters) -> FanOutTrainer:
    """This learner rank's end of a broadcast group over ``handles``' engines; ``wire`` is
    the engines' backend name (``gloo`` or ``nccl``)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    register_trainer_engines()
    info_cls = GlooFanOutInitInfo if wire == "gloo" else NcclFanOutInitInfo
    info = info_cls(master_address=address, master_port=port,
                    engine_world_sizes=list(engine_world_sizes), bucket_bytes=bucket_bytes,
                    timeout_s=timeout_s, rank=rank)
    return WeightTransferTrainerFactory.trainer_init(
        info, client=RolloutFleetClient(handles, timeout_s), source=source)
