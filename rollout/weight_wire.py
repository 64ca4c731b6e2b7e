"""The wire format of a weight broadcast, shared by its two ends.

Learner rank 0 sends every tensor of the model, in the order of the push's metadata,
packed into flat byte buckets, one broadcast per bucket. Each engine cuts the same buckets
from the metadata alone, receives them, and unpacks them into named tensors.

The bucket rule is vLLM's packed NCCL format (``vllm.distributed.weight_transfer.
packed_tensor``): tensors join a bucket in order, and a bucket closes with the tensor that
takes it past ``bucket_bytes``. vLLM's stock NCCL engine therefore receives exactly what
lpreg's sender packs, and lpreg's gloo engine reads the same bytes on CPUs.

On CPUs the wire is a gloo process group (``open_gloo_group``); on GPUs, vLLM's NCCL
communicator. Nothing here imports vLLM at import time: the learner side of the wire runs
on machines without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

Broadcast = Callable[[torch.Tensor], None]  # from rank 0 into this tensor (or out of it, on rank 0)


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a push: its name as the checkpoint spells it, dtype and full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def update_info(metas: Sequence[TensorMeta]) -> dict:
    """The per-push payload an engine's ``update_weights`` takes: the fields of vLLM's
    ``NCCLWeightTransferUpdateInfo``, which lpreg's gloo engine reads too."""
    return {"names": [m.name for m in metas],
            "dtype_names": [str(m.dtype).removeprefix("torch.") for m in metas],
            "shapes": [list(m.shape) for m in metas]}


def metas_from_update_info(names: Sequence[str], dtype_names: Sequence[str],
                           shapes: Sequence[Sequence[int]]) -> list[TensorMeta]:
    if not len(names) == len(dtype_names) == len(shapes):
        raise ValueError(f"a weight update lists {len(names)} names, {len(dtype_names)} dtypes "
                         f"and {len(shapes)} shapes; they must be as many")
    return [TensorMeta(n, getattr(torch, d), tuple(int(x) for x in s))
            for n, d, s in zip(names, dtype_names, shapes, strict=True)]


def bucket_ranges(sizes: Sequence[int], bucket_bytes: int) -> list[range]:
    """Which tensors (by position) travel together: vLLM's packing rule, from sizes alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive; got {bucket_bytes}")
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        total += size
        if total > bucket_bytes:
            ranges.append(range(start, index + 1))
            start, total = index + 1, 0
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def send_buckets(metas: Sequence[TensorMeta], tensors: Iterator[tuple[str, torch.Tensor]],
                 bucket_bytes: int, broadcast: Broadcast, device: torch.device | str) -> int:
    """Pack and broadcast every tensor of ``tensors``, which must follow ``metas``.

    Each tensor is copied into its bucket as soon as the iterator yields it, so a source
    that gathers one layer at a time (ZeRO-3) may free the layer when it moves on.
    Returns the bytes sent.
    """
    sent = 0
    for bucket in bucket_ranges([m.nbytes for m in metas], bucket_bytes):
        members = [metas[i] for i in bucket]
        buffer = torch.empty(sum(m.nbytes for m in members), dtype=torch.uint8, device=device)
        offset = 0
        for meta in members:
            name, tensor = next(tensors, (None, None))
            _check_matches(meta, name, tensor)
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            buffer[offset:offset + meta.nbytes].copy_(flat)
            offset += meta.nbytes
        broadcast(buffer)
        sent += offset
        del buffer  # before the next bucket is allocated: one bucket held at a time
    extra = next(tensors, None)
    if extra is not None:
        raise ValueError(f"the weights hold {extra[0]!r} beyond the {len(metas)} tensors their "
                         "metadata declared")
    return sent


def receive_buckets(metas: Sequence[TensorMeta], bucket_bytes: int, broadcast: Broadcast,
                    device: torch.device | str) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Receive the buckets ``send_buckets`` sends; yields each one's named tensors, which
    are views of the bucket (load them before asking for the next)."""
    for bucket in bucket_ranges([m.nbytes for m in metas], bucket_bytes):
        members = [metas[i] for i in bucket]
        buffer = torch.empty(sum(m.nbytes for m in members), dtype=torch.uint8, device=device)
        broadcast(buffer)
        yield unpack(buffer, members)


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    pieces = buffer.split([m.nbytes for m in metas])
    return [(m.name, piece.view(m.dtype).view(m.shape)) for m, piece in zip(metas, pieces, strict=True)]


def _check_matches(meta: TensorMeta, name: str | None, tensor: torch.Tensor | None) -> None:
    """The receiver cuts its buckets from the metadata: a tensor that disagrees with it
    would shift every byte after it, so it is an error, named, before anything is sent."""
    if name is None:
        raise ValueError(f"the weights ended before {meta.name!r}, which their metadata declared")
    if name != meta.name or tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
        raise ValueError(f"weight {name!r} is {tensor.dtype} {tuple(tensor.shape)}, but the "
                         f"metadata declared {meta.name!r} {meta.dtype} {meta.shape} at that place")


def open_gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
                    timeout_s: float):
    """A gloo process group of its own: no global default group, so it can sit beside
    DeepSpeed's group in a learner and beside vLLM's in an engine."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        master_address, master_port, rank, world_size, "gloo", timeout=timedelta(seconds=timeout_s))


def close_gloo_group(group) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    stateless_destroy_torch_distributed_process_group(group)


def group_broadcast(group):
    """A broadcast from group rank 0 through the group itself: ``torch.distributed.broadcast``
    wants a global rank, which a stateless group does not have."""
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0

    def broadcast(tensor: torch.Tensor) -> None:
        group.broadcast([tensor], options).wait()

    return broadcast
