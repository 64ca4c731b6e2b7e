"""The learner side of a weight broadcast, without vLLM: what is sent and how it is packed.

``LayerwiseParameters`` lists the model's tensors as the engines load them (every name of a
tied parameter, so ``lm_head.weight`` arrives under its own name) and yields them one layer
at a time. Under ZeRO-3 each layer is gathered while it is sent and partitioned again
before the next, so no rank ever holds the whole model. Every rank must iterate, in the
same order: the gathers are collectives.

``broadcast_weights`` packs the tensors into buckets (``rollout.weight_wire``) and hands
each bucket to a broadcast function: a gloo process group's on CPUs, a NCCL
communicator's on GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rollout.weight_wire import Broadcast, TensorMeta, send_buckets


def layer_groups(names: list[str]) -> list[list[str]]:
    """Names grouped by decoder layer: the outermost integer segment of a name is its layer
    (``model.layers.3.mlp...``); names without one form a group before the layers
    (embeddings) or after them (final norm, output projection), by position."""
    before: list[str] = []
    after: list[str] = []
    layers: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            (after if layers else before).append(name)
        else:
            layers.setdefault((".".join(parts[:index]), int(parts[index])), []).append(name)
    return [g for g in (before, *layers.values(), after) if g]


class LayerwiseParameters:
    """The model's parameters by name, gathered one layer at a time under ZeRO-3."""

    def __init__(self, module: torch.nn.Module, zero3: bool) -> None:
        self.module = module
        self.zero3 = zero3
        # Tied weights are listed under every name: an engine only refreshes its output
        # projection when it receives ``lm_head.weight`` itself.
        self.params = dict(module.named_parameters(remove_duplicate=False))
        # The sending order, which metadata() declares and iteration follows.
        self.groups = layer_groups(list(self.params))

    def metadata(self) -> list[TensorMeta]:
        """Full shapes, without gathering: ZeRO-3 keeps a partitioned parameter's own
        shape in ``ds_shape``."""
        return [TensorMeta(name, p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                for name, p in ((n, self.params[n]) for group in self.groups for n in group)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group in self.groups:
            with self._gathered([self.params[name] for name in group]):
                for name in group:
                    yield name, self.params[name].detach()

    def _gathered(self, params: list[torch.nn.Parameter]):
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        unique = list({id(p): p for p in params}.values())
        return deepspeed.zero.GatheredParameters(unique, modifier_rank=None)


def broadcast_weights(source: LayerwiseParameters, bucket_bytes: int, broadcast: Broadcast | None,
                      device: torch.device | str) -> tuple[int, int]:
    """Send every tensor of ``source`` from this rank (``broadcast`` set: the sender) or
    only take part in the gathers (``broadcast`` None: every other rank). Returns the
    number of tensors and their bytes, the same on every rank.

    A failed broadcast still walks the rest of the source before it raises: the other
    ranks are inside the same sequence of gathers and would wait for this one forever.
    """
    metas = source.metadata()
    tensors = iter(source)
    try:
        if broadcast is not None:
            send_buckets(metas, tensors, bucket_bytes, broadcast, device)
    finally:
        for _ in tensors:
            pass
    return len(metas), sum(m.nbytes for m in metas)
