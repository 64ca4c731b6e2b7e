"""The broadcast's learner side, built exactly as a GPU run builds it, against the pinned vLLM.

The NCCL wire cannot run here, so everything it hands to vLLM is constructed here with
vLLM's own dataclasses and checked against its signatures: a wrong or missing field fails
on CPU, not on a user's first GPU run.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.weight_broadcast import LayerwiseParameters, broadcast_weights, layer_groups
from learner.weight_transfer import (
    GlooFanOutInitInfo,
    GlooFanOutTrainer,
    NcclFanOutInitInfo,
    NcclFanOutTrainer,
    RolloutFleetClient,
    register_trainer_engines,
)


def fan_out(info_cls, sizes=(2, 2), rank=0):
    return info_cls(master_address="10.0.0.1", master_port=29555, engine_world_sizes=list(sizes),
                    bucket_bytes=1 << 20, timeout_s=30.0, rank=rank)


def test_engines_take_consecutive_ranks_after_the_learner():
    info = fan_out(NcclFanOutInitInfo, sizes=(2, 1, 4))
    assert info.world_size == 8
    assert info.rank_offsets() == [1, 3, 4]
    assert info.is_sender and not fan_out(NcclFanOutInitInfo, rank=1).is_sender


def test_the_trainer_init_info_needs_the_rank_as_vllm_requires():
    with pytest.raises(TypeError, match="rank"):
        NcclFanOutInitInfo(master_address="a", master_port=1, engine_world_sizes=[1],
                           bucket_bytes=1, timeout_s=1.0)


def test_the_nccl_engines_init_info_is_vllms_own_packed_with_lpregs_buckets():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    info = fan_out(NcclFanOutInitInfo)
    trainer = NcclFanOutTrainer(client=RolloutFleetClient([], 1.0), source=None, is_sender=True,
                                info=info)
    payloads = [trainer.engine_init_info(offset) for offset in info.rank_offsets()]
    engine_side = [NCCLWeightTransferInitInfo(**p) for p in payloads]
    assert [e.rank_offset for e in engine_side] == [1, 3]
    assert all(e.world_size == 5 and e.packed and e.packed_buffer_size_bytes == 1 << 20
               and e.master_address == "10.0.0.1" and e.master_port == 29555 for e in engine_side)


def test_the_gloo_engines_init_info_is_the_gloo_engines_own():
    from rollout.gloo_transfer import GlooWeightTransferInitInfo

    info = fan_out(GlooFanOutInitInfo)
    trainer = GlooFanOutTrainer(client=RolloutFleetClient([], 1.0), source=None, is_sender=True,
                                info=info)
    engine_side = GlooWeightTransferInitInfo(**trainer.engine_init_info(3))
    assert (engine_side.rank_offset, engine_side.world_size, engine_side.bucket_bytes) == (3, 5, 1 << 20)


def test_vllm_calls_are_made_with_the_signatures_the_pinned_vllm_has():
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group
    from vllm.distributed.weight_transfer import nccl_common
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.entrypoints.llm import LLM

    # What learner.weight_transfer and rollout.weight_wire call, bound as they call it.
    inspect.signature(PyNcclCommunicator.broadcast).bind(None, torch.empty(1), src=0, stream=None)
    inspect.signature(PyNcclCommunicator.destroy).bind(None)
    inspect.signature(nccl_common.trainer_init).bind(fan_out(NcclFanOutInitInfo), rank=0)
    inspect.signature(WeightTransferTrainerFactory.trainer_init).bind(
        fan_out(NcclFanOutInitInfo), client=None, source=None)
    inspect.signature(stateless_init_torch_distributed_process_group).bind(
        "h", 1, 0, 2, "gloo", timeout=None)
    # The rollout worker's control plane, called with {"init_info": ...} / {"update_info": ...}.
    for method in ("init_weight_transfer_engine", "update_weights"):
        inspect.signature(getattr(LLM, method)).bind(None, {})
    for method in ("start_weight_update", "finish_weight_update", "shutdown_weight_transfer_engine"):
        inspect.signature(getattr(LLM, method)).bind(None)
    # The rollout worker names the engine's backend in vLLM's config.
    from vllm.config.weight_transfer import WeightTransferConfig

    assert WeightTransferConfig(backend="gloo").backend == "gloo"


def test_both_trainers_are_in_vllms_trainer_registry():
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    register_trainer_engines()
    register_trainer_engines()  # idempotent
    assert WeightTransferTrainerFactory._registry["gloo"]() is GlooFanOutTrainer
    assert WeightTransferTrainerFactory._registry["nccl_fanout"]() is NcclFanOutTrainer


def test_the_gloo_engine_is_in_vllms_engine_registry_and_a_general_plugin():
    from importlib.metadata import entry_points

    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rollout import gloo_transfer

    gloo_transfer.register()
    gloo_transfer.register()
    assert WeightTransferEngineFactory._registry["gloo"]() is gloo_transfer.GlooWeightTransferEngine
    plugins = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "rollout.gloo_transfer:register" in plugins


def tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def test_every_name_of_a_tied_parameter_is_sent_one_layer_after_another():
    model = tied_model()
    source = LayerwiseParameters(model, zero3=False)
    names = [m.name for m in source.metadata()]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert names == [n for n, _ in source]  # metadata and iteration agree
    groups = layer_groups(names)
    assert groups[0] == ["model.embed_tokens.weight"]
    assert [g[0].split(".")[2] for g in groups[1:4]] == ["0", "1", "2"]
    assert groups[-1] == ["model.norm.weight", "lm_head.weight"]


def test_metadata_follows_the_sending_order_when_names_without_a_layer_sit_between_stacks():
    class VisionLanguage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.mid = torch.nn.Linear(2, 2)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    source = LayerwiseParameters(VisionLanguage(), zero3=False)
    declared = [m.name for m in source.metadata()]
    assert declared == [n for n, _ in source]
    assert declared[-2:] == ["mid.weight", "mid.bias"]
    broadcast_weights(source, 64, lambda t: None, "cpu")  # no mismatch between the two


def test_broadcast_weights_counts_what_it_sends_and_walks_the_source_after_a_failure():
    model = tied_model()
    sent = []
    num_tensors, num_bytes = broadcast_weights(LayerwiseParameters(model, zero3=False), 4096,
                                               lambda t: sent.append(t.numel()), "cpu")
    params = dict(model.named_parameters(remove_duplicate=False))
    assert num_tensors == len(params)
    assert num_bytes == sum(sent) == sum(p.numel() * p.element_size() for p in params.values())

    walked = []

    class Counting(LayerwiseParameters):
        def __iter__(self):
            for pair in super().__iter__():
                walked.append(pair[0])
                yield pair

    def fail(_tensor):
        raise RuntimeError("peer gone")

    with pytest.raises(RuntimeError, match="peer gone"):
        broadcast_weights(Counting(model, zero3=False), 4096, fail, "cpu")
    # Other ranks are inside the same gathers: the failed sender still goes through all.
    assert walked == list(params)
