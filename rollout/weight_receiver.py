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

    def abandon_weight_update(self) -> None:
        """Close an update a lost peer left open. Finishing it lets vLLM put back the old
        weights of every layer that received nothing (a layer that received part of its
        weights is processed as it is; the next push replaces it), and clears the
        worker's update flag; then this end of the transfer group is closed."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        worker: Any = self
        if worker._weight_update_active:
            worker.finish_weight_update()
        else:
            # A failed receive clears the flag but leaves the layer-wise reload begun;
            # finalising is a no-op where none is.
            with set_current_vllm_config(worker.vllm_config):
                finalize_layerwise_reload(worker.model_runner.get_model(), worker.model_config)
        if worker.weight_transfer_engine is not None:
            worker.weight_transfer_engine.shutdown()
