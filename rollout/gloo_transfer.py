"""A gloo weight-transfer engine for vLLM: the broadcast transport's wire on CPUs.

vLLM takes weight-transfer engines by name from its registry; on GPUs the broadcast
uses vLLM's own ``nccl`` engine, and on CPUs this one, under the name ``gloo``. It does
what vLLM's NCCL engine does with a torch gloo group in place of the NCCL communicator,
and reads the same bytes (``rollout.weight_wire``), so the code around it is the code
that runs on GPUs.

``register`` is the ``vllm.general_plugins`` entry point (setup.cfg): vLLM calls it in
every process it starts, so the engine is found by a multi-process engine too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.weight_transfer.base import WeightTransferEngine

from rollout.weight_wire import (
    close_gloo_group,
    group_broadcast,
    metas_from_update_info,
    open_gloo_group,
    receive_buckets,
)

BACKEND = "gloo"


def register() -> None:
    """Make ``WeightTransferConfig(backend="gloo")`` resolve to this engine (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")


@dataclass
class GlooWeightTransferInitInfo:
    """What an engine needs to join the broadcast group: the learner's rendezvous, its
    own first rank in the group (1 + the ranks of the engines before it) and the group
    size, the bucket size both ends cut by, and how long a collective may wait."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float


@dataclass
class GlooWeightTransferUpdateInfo:
    """One push: every tensor's name, dtype and full shape, in sending order (the fields
    of vLLM's ``NCCLWeightTransferUpdateInfo``)."""

    names: list[str] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)


class GlooWeightTransferEngine(WeightTransferEngine):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = 0

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        rank = (parallel.data_parallel_index * parallel.world_size + parallel.rank
                + init_info.rank_offset)
        self.bucket_bytes = init_info.bucket_bytes
        self.group = open_gloo_group(init_info.master_address, init_info.master_port, rank,
                                     init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        # As vLLM's NCCL engine: weights arrive in checkpoint format, layer by layer,
        # and each layer is processed (repacked for the CPU kernels) once complete.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class synchronises the accelerator afterwards, which fails where there
        # is none; a gloo receive has landed when it returns.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("the gloo weight transfer is not initialised: "
                               "init_weight_transfer_engine comes first")
        metas = metas_from_update_info(update_info.names, update_info.dtype_names,
                                       update_info.shapes)
        for named in receive_buckets(metas, self.bucket_bytes, group_broadcast(self.group),
                                     self.device):
            self.model.load_weights(named)

    def shutdown(self) -> None:
        if self.group is not None:
            close_gloo_group(self.group)
            self.group = None
