"""RolloutWorker: a Ray actor that owns one vLLM engine.

The actor is thin: it turns a ``GenerationRequest`` into vLLM calls and vLLM's outputs
into ``Sample`` records, and it reloads weights when the learners publish new ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

from conf.schema import ModelConfig, RolloutConfig
from rollout.types import GenerationRequest, GenerationResult, Sample

WORKER_EXTENSION = "rollout.weight_receiver.RolloutWeightReceiver"


def engine_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment a rollout worker process needs before vLLM is imported."""
    return {
        # The engine core runs inside the actor's own process: collective_rpc becomes a
        # direct call and weight tensors pass without serialisation.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's per-engine INFO lines would bury the driver's own progress.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


class RolloutWorker:
    """Wraps one vLLM engine. Created as a Ray actor by ``launch.cluster.rollout_group.RolloutGroup``."""

    def __init__(self, worker_index: int, model_path: str, model_cfg: ModelConfig,
                 rollout_cfg: RolloutConfig, seed: int) -> None:
        os.environ.update(engine_env(rollout_cfg))
        from vllm import LLM

        self.worker_index = worker_index
        self.weight_version = 0
        self.cfg = rollout_cfg
        self.llm = LLM(
            model=model_path,
            dtype=model_cfg.dtype,
            seed=seed + worker_index,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            max_model_len=rollout_cfg.max_model_len,
            enforce_eager=rollout_cfg.enforce_eager,
            # Log-probs after temperature, i.e. of the distribution actually sampled from,
            # which is what the learner's importance ratios are measured against.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            **_weight_transfer_kwargs(rollout_cfg),
        )

    def ready(self) -> int:
        return self.worker_index

    def generate(self, request: GenerationRequest) -> GenerationResult:
        from vllm import SamplingParams

        sampling = request.sampling
        params = SamplingParams(
            n=sampling.samples_per_prompt,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_response_tokens,
            logprobs=0,  # the sampled token's own log-prob only
            seed=sampling.seed,
        )
        prompts = [{"prompt_token_ids": ids} for ids in request.prompt_token_ids]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start

        samples = []
        for prompt_index, prompt_ids, output in zip(request.prompt_indices,
                                                     request.prompt_token_ids, outputs, strict=True):
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                logprobs = [step[token].logprob
                            for step, token in zip(completion.logprobs, token_ids, strict=True)]
                samples.append(Sample(
                    prompt_index=prompt_index,
                    prompt_token_ids=list(prompt_ids),
                    response_token_ids=token_ids,
                    response_logprobs=logprobs,
                    finish_reason=completion.finish_reason or "length",
                    weight_version=self.weight_version,
                    worker_index=self.worker_index,
                    response_text=completion.text,
                ))
        return GenerationResult(worker_index=self.worker_index,
                                weight_version=self.weight_version,
                                samples=samples, generate_s=elapsed)

    def load_weights(self, named_tensors: list[tuple[str, Any]], version: int) -> int:
        """CPU path: reload the engine's weights in place from tensors in the object store."""
        self.llm.collective_rpc("load_named_tensors", args=(named_tensors,))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return version

    def set_weight_version(self, version: int) -> int:
        """GPU path: the weights arrived over NCCL; record which version they are."""
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return version

    def weights_checksum(self) -> float:
        """Sum of |w| over the engine's parameters, to observe that a sync arrived."""
        return float(self.llm.collective_rpc("weights_checksum")[0])

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return self.llm.collective_rpc(method, args=args)

    # -- GPU path: the control plane of vLLM's NCCL weight transfer. The learner's
    # trainer-side engine calls these through a Ray client while it broadcasts.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()

    def update_weight_version(self, version: str) -> None:
        self.llm.update_weight_version(version)


def _weight_transfer_kwargs(cfg: RolloutConfig) -> dict:
    """Open vLLM's NCCL weight-transfer endpoint when weights will arrive over NCCL."""
    nccl = cfg.weight_sync == "nccl" or (cfg.weight_sync == "auto" and cfg.gpus_per_worker > 0)
    if not nccl:
        return {}
    from vllm.config.weight_transfer import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend="nccl")}
