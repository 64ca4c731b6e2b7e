"""The driver: one RL step at a time, rollout -> verify -> advantages -> update -> sync."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from conf.schema import LpregConfig
from launch.config import to_yaml
from launch.data import PromptRecord, PromptSampler, load_jsonl, synthetic_sums
from launch.metrics import MetricsWriter

log = logging.getLogger("lpreg")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    last_metrics: dict


def prepare_run_dir(cfg: LpregConfig) -> Path:
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def resolve_model_path(cfg: LpregConfig, run_dir: Path) -> str:
    if cfg.model.path:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            from launch.config import ConfigError

            raise ConfigError(f"config key 'model.path': {path} is not a Hugging Face model "
                              "directory (no config.json)")
        return str(path.resolve())
    from launch.tiny_model import build_tiny_model

    return str(build_tiny_model(run_dir / "tiny-model", cfg.model.tiny).resolve())


def load_prompts(cfg: LpregConfig) -> list[PromptRecord]:
    if cfg.data.train_path:
        return load_jsonl(cfg.data.train_path)
    return synthetic_sums(cfg.data.synthetic_num_problems, cfg.data.synthetic_max_operand,
                          cfg.data.synthetic_num_operands, seed=cfg.trainer.seed)


def tokenize_prompts(tokenizer, records: list[PromptRecord], max_tokens: int):
    """Token ids per prompt; prompts over ``max_tokens`` are dropped and counted."""
    kept, ids, dropped = [], [], 0
    for record in records:
        tokens = tokenizer(record.prompt)["input_ids"]
        if len(tokens) > max_tokens:
            dropped += 1
            continue
        kept.append(record)
        ids.append(tokens)
    return kept, ids, dropped


def weight_transport(cfg: LpregConfig) -> str:
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    return "nccl" if cfg.rollout.gpus_per_worker > 0 else "object_store"


def summarize_rollout(samples, rewards: list[float], max_tokens: int) -> dict[str, float]:
    lengths = [len(s.response_token_ids) for s in samples]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "reward/max": max(rewards),
        "reward/min": min(rewards),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": max(lengths),
        "response_length/clip_ratio": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
        "rollout/num_samples": len(samples),
    }


def average_learner_metrics(results) -> dict[str, float]:
    keys = sorted({k for r in results for k in r.metrics})
    return {k: statistics.fmean(r.metrics[k] for r in results if k in r.metrics) for k in keys}


class Trainer:
    def __init__(self, cfg: LpregConfig):
        self.cfg = cfg

    def run(self) -> RunResult:
        from transformers import AutoTokenizer

        from launch import ray_setup
        from learner import compute_advantages
        from learner.batch import build_train_batch
        from learner.group import LearnerGroup
        from rollout.group import RolloutGroup
        from rollout.weight_sync import make_weight_sync
        from verifier import MathVerifier

        cfg = self.cfg
        run_dir = prepare_run_dir(cfg)
        model_path = resolve_model_path(cfg, run_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        records, prompt_ids, dropped = tokenize_prompts(
            tokenizer, load_prompts(cfg), cfg.data.max_prompt_tokens)
        if dropped:
            log.warning("dropped %d prompts longer than data.max_prompt_tokens=%d",
                        dropped, cfg.data.max_prompt_tokens)
        ids_of = {id(r): ids for r, ids in zip(records, prompt_ids, strict=True)}
        sampler = PromptSampler(records, cfg.data.prompts_per_step, seed=cfg.trainer.seed)

        import ray

        started_ray = not ray.is_initialized()
        where = ray_setup.connect(cfg)
        ray_setup.check_capacity(cfg)
        log.info("Ray: %s; model: %s; run directory: %s", where, model_path, run_dir)

        sequences_per_step = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
        verifier = MathVerifier(timeout_s=cfg.verifier.timeout_s,
                                num_workers=cfg.verifier.num_workers,
                                reward_fn=cfg.verifier.reward_fn,
                                format_penalty=cfg.verifier.format_penalty)
        rollout = learners = None
        writer = MetricsWriter(run_dir)
        last: dict = {}
        try:
            t0 = time.perf_counter()
            rollout = RolloutGroup(cfg.rollout.num_workers, model_path, cfg.model, cfg.rollout,
                                   seed=cfg.trainer.seed)
            learners = LearnerGroup(model_path, cfg.model, cfg.learner, cfg.algorithm,
                                    temperature=cfg.rollout.temperature,
                                    sequences_per_step=sequences_per_step,
                                    seed=cfg.trainer.seed)
            sync = make_weight_sync(weight_transport(cfg), learners, rollout,
                                    timeout_s=cfg.rollout.timeout_s)
            log.info("actors ready in %.1fs", time.perf_counter() - t0)
            version = 0
            for step in range(1, cfg.trainer.total_steps + 1):
                step_start = time.perf_counter()
                batch_records = sampler.next_batch()
                roll = rollout.generate([ids_of[id(r)] for r in batch_records],
                                        seed=cfg.trainer.seed * 100_003 + step)
                samples = roll.samples

                report = verifier.score_batch_detailed(
                    [s.response_text for s in samples],
                    [batch_records[s.prompt_index].answer for s in samples])
                rewards = report.scores

                group_index = torch.tensor([s.prompt_index for s in samples])
                advantages = compute_advantages(
                    cfg.algorithm.advantage, torch.tensor(rewards, dtype=torch.float32),
                    group_index)
                batch = build_train_batch(samples, advantages, tokenizer.pad_token_id)

                update_start = time.perf_counter()
                learner_results = learners.train_step(batch)
                update_s = time.perf_counter() - update_start

                version += 1
                sync_report = sync.push(version)

                metrics = summarize_rollout(samples, rewards, cfg.rollout.max_response_tokens)
                metrics.update(report.metrics())
                metrics.update(average_learner_metrics(learner_results))
                num_tokens = sum(roll.tokens_per_worker)
                staleness = [version - 1 - s.weight_version for s in samples]
                metrics.update({
                    "timing/rollout_s": roll.seconds,
                    "timing/update_s": update_s,
                    "timing/weight_sync_s": sync_report.seconds,
                    "timing/step_s": time.perf_counter() - step_start,
                    "rollout/tokens_per_s": num_tokens / roll.seconds if roll.seconds else 0.0,
                    "rollout/requests_per_worker": roll.requests_per_worker,
                    "rollout/tokens_per_worker": roll.tokens_per_worker,
                    "rollout/staleness_max": max(staleness),
                    "weights/version": version,
                    "weights/sync_bytes": sync_report.num_bytes,
                    "perf/throughput": num_tokens / (time.perf_counter() - step_start),
                })
                if cfg.rollout.verify_weight_sync:
                    metrics["weights/rollout_checksums"] = rollout.weights_checksums()
                writer.write(step, metrics)
                last = metrics
                log.info("step %d/%d reward %.3f len %.1f rollout %.1fs update %.1fs sync %.2fs",
                         step, cfg.trainer.total_steps, metrics["reward/mean"],
                         metrics["response_length/mean"], roll.seconds, update_s,
                         sync_report.seconds)
        finally:
            writer.close()
            verifier.close()
            for group in (rollout, learners):
                if group is not None:
                    group.shutdown()
            if started_ray:
                ray.shutdown()
        return RunResult(run_dir=run_dir, steps=cfg.trainer.total_steps, last_metrics=last)

