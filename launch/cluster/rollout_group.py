"""The set of rollout workers, and how one step's prompts are spread over them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from conf.schema import ModelConfig, RolloutConfig
from launch.cluster.remote import wait_named
from rollout.types import GenerationRequest, GenerationResult, Sample, SamplingSettings
from rollout.worker import RolloutWorker, engine_env


def balance_prompts(num_prompts: int, num_workers: int) -> list[list[int]]:
    """Split prompt positions into ``num_workers`` contiguous shards of near-equal size.

    Every prompt asks for the same number of samples, so equal prompt counts are equal
    work; the first ``num_prompts % num_workers`` shards take one extra prompt. A GRPO
    group never straddles two workers, so each worker can use vLLM's ``n``.
    """
    if num_workers < 1:
        raise ValueError("need at least one rollout worker")
    base, extra = divmod(num_prompts, num_workers)
    shards, start = [], 0
    for w in range(num_workers):
        size = base + (1 if w < extra else 0)
        shards.append(list(range(start, start + size)))
        start += size
    return shards


@dataclass
class RolloutStepResult:
    samples: list[Sample]  # ordered by prompt position, then sample index
    requests_per_worker: list[int]
    tokens_per_worker: list[int]
    seconds: float
    generate_s_per_worker: list[float]


class RolloutGroup:
    def __init__(self, num_workers: int, model_path: str, model_cfg: ModelConfig,
                 cfg: RolloutConfig, seed: int, placement=None) -> None:
        import ray

        self.cfg = cfg
        actor_cls = ray.remote(RolloutWorker)
        self.workers = []
        for index in range(num_workers):
            options = dict(
                num_cpus=cfg.cpus_per_worker,
                num_gpus=cfg.gpus_per_worker * cfg.tensor_parallel_size,
                name=None,
                runtime_env={"env_vars": engine_env(cfg)},
                max_concurrency=1,
            )
            if placement is not None:
                options["scheduling_strategy"] = placement(index)
            self.workers.append(actor_cls.options(**options).remote(
                index, model_path, model_cfg, cfg, seed))
        wait_named({name: w.ready.remote() for name, w in self.named_workers()},
                   cfg.startup_timeout_s, "start its vLLM engine")

    def named_workers(self):
        return [(f"rollout-{i}", w) for i, w in enumerate(self.workers)]

    def generate(self, prompt_token_ids: list[list[int]], seed: int, *,
                 samples_per_prompt: int | None = None,
                 temperature: float | None = None) -> RolloutStepResult:
        """Spread the prompts over the workers; evaluation overrides ``n`` and temperature."""
        samples_per_prompt = samples_per_prompt or self.cfg.samples_per_prompt
        sampling = SamplingSettings(
            samples_per_prompt=samples_per_prompt,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p,
            max_response_tokens=self.cfg.max_response_tokens,
            seed=seed,
        )
        shards = balance_prompts(len(prompt_token_ids), len(self.workers))
        start = time.perf_counter()
        refs = {}
        for (name, worker), shard in zip(self.named_workers(), shards, strict=True):
            if shard:
                refs[name] = worker.generate.remote(GenerationRequest(
                    prompt_indices=shard,
                    prompt_token_ids=[prompt_token_ids[i] for i in shard],
                    sampling=sampling))
        results: dict[str, GenerationResult] = wait_named(
            refs, self.cfg.timeout_s, "generate responses")
        seconds = time.perf_counter() - start

        by_worker = [results.get(name) for name, _ in self.named_workers()]
        samples = sorted((s for r in by_worker if r for s in r.samples),
                         key=lambda s: s.prompt_index)  # stable: keeps sample order
        return RolloutStepResult(
            samples=samples,
            requests_per_worker=[len(shard) * samples_per_prompt for shard in shards],
            tokens_per_worker=[r.num_response_tokens if r else 0 for r in by_worker],
            seconds=seconds,
            generate_s_per_worker=[r.generate_s if r else 0.0 for r in by_worker],
        )

    def weights_checksums(self) -> list[float]:
        """One checksum of the engine weights per worker, in worker order."""
        refs = {name: w.weights_checksum.remote() for name, w in self.named_workers()}
        sums = wait_named(refs, self.cfg.timeout_s, "checksum its weights")
        return [sums[name] for name, _ in self.named_workers()]

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
