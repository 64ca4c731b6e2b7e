"""The broadcast's byte layout: the same buckets on both ends, and vLLM's packed format."""

from __future__ import annotations

import threading

import pytest
import torch

from rollout.weight_wire import (
    TensorMeta,
    bucket_ranges,
    group_broadcast,
    metas_from_update_info,
    open_gloo_group,
    receive_buckets,
    send_buckets,
    unpack,
    update_info,
)


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(17, 8)),
            ("model.layers.0.input_layernorm.weight", torch.randn(8, dtype=torch.bfloat16)),
            ("model.layers.0.mlp.up_proj.weight", torch.randn(24, 8)),
            ("model.layers.1.self_attn.q_proj.bias", torch.randn(8, dtype=torch.float16)),
            ("model.norm.weight", torch.randn(8)),
            ("lm_head.weight", torch.randn(17, 8))]


def metas_of(named) -> list[TensorMeta]:
    return [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in named]


class Loopback:
    """A broadcast without peers: what the sender broadcasts, the receiver gets next."""

    def __init__(self):
        self.buckets: list[torch.Tensor] = []

    def send(self, tensor: torch.Tensor) -> None:
        self.buckets.append(tensor.clone())

    def receive(self, tensor: torch.Tensor) -> None:
        tensor.copy_(self.buckets.pop(0))


@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")
@pytest.mark.parametrize("bucket_bytes", [1, 100, 700, 1 << 30])
def test_buckets_are_vllms_packed_chunks(bucket_bytes):
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    named = named_tensors()
    ours = [[named[i][0] for i in r] for r in bucket_ranges([m.nbytes for m in metas_of(named)],
                                                            bucket_bytes)]
    pairs, vllms = iter(named), []
    while (chunk := pack_tensors(pairs, lambda item: item[1], bucket_bytes)) is not None:
        vllms.append(chunk.names)
    assert ours == vllms


def test_what_is_sent_arrives_bit_for_bit_with_vllms_unpacking_too():
    from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

    named, wire = named_tensors(), Loopback()
    metas = metas_of(named)
    sent = send_buckets(metas, iter(named), 700, wire.send, "cpu")
    assert sent == sum(t.numel() * t.element_size() for _, t in named)
    vllm_view = [unpack_tensor(b, [m.name for m in ms], [list(m.shape) for m in ms],
                               [m.dtype for m in ms], [m.nbytes for m in ms])
                 for b, ms in zip(wire.buckets, [[metas[i] for i in r] for r in bucket_ranges(
                     [m.nbytes for m in metas], 700)], strict=True)]
    received = [pair for bucket in receive_buckets(metas, 700, wire.receive, "cpu") for pair in bucket]
    for (name, tensor), (got_name, got), (vllm_name, vllm_got) in zip(
            named, received, [p for b in vllm_view for p in b], strict=True):
        assert name == got_name == vllm_name
        assert got.dtype == tensor.dtype and torch.equal(got, tensor) and torch.equal(vllm_got, tensor)


def test_update_info_round_trips_and_is_vllms_nccl_update_info():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    metas = metas_of(named_tensors())
    info = update_info(metas)
    NCCLWeightTransferUpdateInfo(**info)  # the fields vLLM's NCCL engine takes, no more
    assert metas_from_update_info(**info) == metas
    with pytest.raises(ValueError, match="as many"):
        metas_from_update_info(info["names"], info["dtype_names"][:-1], info["shapes"])


def test_a_tensor_that_disagrees_with_the_metadata_is_named_before_its_bucket_is_sent():
    named, wire = named_tensors(), Loopback()
    metas = metas_of(named)
    swapped = [named[1], named[0], *named[2:]]
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight"):
        send_buckets(metas, iter(swapped), 1 << 30, wire.send, "cpu")
    with pytest.raises(ValueError, match="ended before 'lm_head.weight'"):
        send_buckets(metas, iter(named[:-1]), 1 << 30, wire.send, "cpu")
    assert wire.buckets == []
    with pytest.raises(ValueError, match="beyond the 5 tensors"):
        send_buckets(metas[:-1], iter(named), 1 << 30, wire.send, "cpu")


def test_unpack_gives_views_in_order():
    named = named_tensors()[:2]
    metas = metas_of(named)
    buffer = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named])
    assert [(n, torch.equal(t, src)) for (n, t), (_, src) in zip(unpack(buffer, metas), named,
                                                                  strict=True)] == \
        [(named[0][0], True), (named[1][0], True)]


def test_a_real_gloo_group_carries_the_buckets_between_two_ranks():
    from learner.actor import free_port as port_for

    named = named_tensors()
    metas, port, received, errors = metas_of(named), port_for(), [], []

    def rank(index: int) -> None:
        try:
            group = open_gloo_group("127.0.0.1", port, index, 2, timeout_s=30)
            broadcast = group_broadcast(group)
            if index == 0:
                send_buckets(metas, iter(named), 500, broadcast, "cpu")
            else:
                received.extend(p for b in receive_buckets(metas, 500, broadcast, "cpu")
                                for p in [(n, t.clone()) for n, t in b])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert [n for n, _ in received] == [n for n, _ in named]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received, named, strict=True))
