"""The rollout side of weight sync: a vLLM worker extension that takes new weights in place."""

from __future__ import annotations

from typing import Any


class RolloutWeightReceiver:
    """vLLM worker extension: methods reachable through ``llm.collective_rpc``.

    vLLM mixes this class into its worker, so ``self.model_runner`` is the engine's.
    """

    def load_named_tensors(self, named_tensors: list[tuple[str, Any]]) -> None:
        # The CPU backend repacks weights after loading, so ``model.load_weights``
        # cannot be called on the live model; the runner's reload path re-runs the
        # whole load-and-process sequence in place.
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=iter(named_tensors), is_checkpoint_format=True)

    def weights_checksum(self) -> float:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))
