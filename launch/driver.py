"""The driver: one RL step at a time, rollout -> verify -> advantages -> update -> sync."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conf.schema import LpregConfig
from launch import checkpoint
from launch.config import to_yaml
from launch.data import PromptRecord, PromptSampler, load_prompts_file, synthetic_problems
from launch.evaluation import EvalResult, evaluate, load_eval_results
from launch.metrics import MetricsWriter
from launch.progress import Progress

log = logging.getLogger("lpreg")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    last_metrics: dict
    evaluations: list[EvalResult] = field(default_factory=list)


def prepare_run_dir(cfg: LpregConfig) -> Path:
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def resolve_model_path(cfg: LpregConfig) -> str:
    """The user's model directory, or the bootstrapped tiny model (built once, then reused)."""
    if cfg.model.path:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            from launch.config import ConfigError

            raise ConfigError(f"config key 'model.path': {path} is not a Hugging Face model "
                              "directory (no config.json)")
        return str(path.resolve())
    from launch.bootstrap import bootstrap, tiny_model_dir

    path = tiny_model_dir(cfg.model.cache_dir, cfg.model.tiny, cfg.data.synthetic)
    if not path.exists():
        log.info("bootstrapping the tiny model into %s (once; later runs reuse it)", path)
    return str(bootstrap(path, cfg.model.tiny, cfg.data.synthetic).resolve())


def load_prompts(cfg: LpregConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Training prompts and held-out evaluation prompts."""
    if cfg.data.train_path:
        train = load_prompts_file(cfg.data.train_path)
        held_out = load_prompts_file(cfg.data.eval_path) if cfg.data.eval_path else []
        return train, held_out
    if cfg.data.eval_path:
        held_out = load_prompts_file(cfg.data.eval_path)
    else:
        # Distinct problems from their own seed...
        candidates = synthetic_problems(cfg.data.synthetic, 4 * cfg.data.num_synthetic_eval,
                                        seed=cfg.data.synthetic.seed + 1_000_003)
        unique = {r.prompt: r for r in candidates}
        held_out = list(unique.values())[: cfg.data.num_synthetic_eval]
    # ...that the policy never trains on.
    excluded = {r.prompt for r in held_out}
    train = [r for r in synthetic_problems(cfg.data.synthetic, cfg.data.num_synthetic_train,
                                           seed=cfg.data.synthetic.seed)
             if r.prompt not in excluded]
    return train, held_out


def prompt_token_ids(tokenizer, record: PromptRecord) -> list[int]:
    """Plain prompts are tokenized as they are; chat prompts go through the chat template."""
    if not record.is_chat:
        return tokenizer(record.prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        from launch.data import DataError

        raise DataError(f"prompt '{record.id}' is a list of chat messages, but the model's "
                        "tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(record.messages(), add_generation_prompt=True,
                                        tokenize=True)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def tokenize_prompts(tokenizer, records: list[PromptRecord], max_tokens: int):
    """Token ids per prompt; prompts over ``max_tokens`` are dropped and counted."""
    kept, ids, dropped = [], [], 0
    for record in records:
        tokens = prompt_token_ids(tokenizer, record)
        if len(tokens) > max_tokens:
            dropped += 1
            continue
        kept.append(record)
        ids.append(tokens)
    return kept, ids, dropped


def apply_truncated_reward(scores: list[float], finish_reasons: list[str],
                           truncated_reward: float | None) -> list[float]:
    """Give responses that hit the length cap ``truncated_reward`` instead of their score."""
    if truncated_reward is None:
        return list(scores)
    return [truncated_reward if reason == "length" else score
            for score, reason in zip(scores, finish_reasons, strict=True)]


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


def prompt_ids_hash(records: list[PromptRecord]) -> str:
    """A short fingerprint of a step's prompts, in order, to compare runs and resumes."""
    return hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest()[:16]


def average_learner_metrics(results) -> dict[str, float]:
    keys = sorted({k for r in results for k in r.metrics})
    return {k: statistics.fmean(r.metrics[k] for r in results if k in r.metrics) for k in keys}


class Trainer:
    def __init__(self, cfg: LpregConfig):
        self.cfg = cfg

    def run(self) -> RunResult:
        from transformers import AutoTokenizer

        from launch import ray_setup
        from launch.placement import Placement
        from learner import compute_advantages
        from learner.batch import build_train_batch
        from learner.group import LearnerGroup
        from rollout.group import RolloutGroup
        from rollout.weight_sync import make_weight_sync
        from verifier import MathVerifier

        cfg = self.cfg
        # Checkpoint problems are config problems: report them before anything is written.
        resume_from, checkpoints_dir = checkpoint.plan(cfg)
        run_dir = prepare_run_dir(cfg)
        model_path = resolve_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train_records, eval_records = load_prompts(cfg)
        records, prompt_ids, dropped = tokenize_prompts(
            tokenizer, train_records, cfg.data.max_prompt_tokens)
        eval_records, eval_ids, eval_dropped = tokenize_prompts(
            tokenizer, eval_records, cfg.data.max_prompt_tokens)
        if dropped or eval_dropped:
            log.warning("skipped %d training and %d evaluation prompts longer than "
                        "data.max_prompt_tokens=%d", dropped, eval_dropped,
                        cfg.data.max_prompt_tokens)
        ids_of = {id(r): ids for r, ids in zip(records, prompt_ids, strict=True)}
        sampler = PromptSampler(records, cfg.data.prompts_per_step, seed=cfg.trainer.seed)
        if resume_from is not None:
            checkpoint.check_compatible(
                checkpoint.read_state(resume_from), world_size=cfg.learner.num_workers,
                zero_stage=cfg.learner.zero_stage, num_prompts=len(records), where=resume_from)

        import ray

        started_ray = not ray.is_initialized()
        where = ray_setup.connect(cfg)
        ray_setup.check_capacity(cfg)
        log.info("Ray: %s; model: %s; run directory: %s", where, model_path, run_dir)

        sequences_per_step = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
        verifier = MathVerifier.from_config(cfg.verifier)
        rollout = learners = placement = progress = None
        writer = MetricsWriter(run_dir)
        last: dict = {}
        evaluations: list[EvalResult] = []
        try:
            t0 = time.perf_counter()
            placement = Placement.create(cfg)
            log.info("placement groups: %s", placement.describe())
            rollout = RolloutGroup(cfg.rollout.num_workers, model_path, cfg.model, cfg.rollout,
                                   seed=cfg.trainer.seed, placement=placement.rollout)
            learners = LearnerGroup(model_path, cfg.model, cfg.learner, cfg.algorithm,
                                    temperature=cfg.rollout.temperature,
                                    sequences_per_step=sequences_per_step,
                                    seed=cfg.trainer.seed, placement=placement.learner)
            sync = make_weight_sync(weight_transport(cfg), learners, rollout,
                                    timeout_s=cfg.rollout.timeout_s)
            log.info("actors ready in %.1fs", time.perf_counter() - t0)

            def run_eval(at_step: int) -> dict:
                if not eval_records:
                    return {}
                result = evaluate(rollout, verifier, eval_records, eval_ids, step=at_step,
                                  temperature=cfg.trainer.eval_temperature,
                                  samples=cfg.trainer.eval_samples, seed=cfg.trainer.seed)
                evaluations.append(result)
                with (run_dir / "eval.jsonl").open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result.as_record(), sort_keys=True) + "\n")
                log.info("eval at step %d: %s", at_step, _headline(result.metrics))
                return result.metrics

            version = start_step = 0
            if resume_from is not None:
                state = checkpoint.restore(resume_from, learners, sampler)
                version, start_step = state.weight_version, state.step
                # The rollout workers loaded model.path; they need the restored weights
                # before they generate anything.
                sync.push(version)
                evaluations.extend(load_eval_results(run_dir / "eval.jsonl", up_to_step=start_step))
                log.info("resumed from %s: step %d, weight version %d", resume_from, start_step,
                         version)
            elif cfg.trainer.eval_every >= 0:
                run_eval(0)
            progress = Progress(cfg.trainer.total_steps, start_step,
                                enabled=cfg.trainer.progress_bar)
            for step in range(start_step + 1, cfg.trainer.total_steps + 1):
                step_start = time.perf_counter()
                batch_records = sampler.next_batch()
                roll = rollout.generate([ids_of[id(r)] for r in batch_records],
                                        seed=cfg.trainer.seed * 100_003 + step)
                samples = roll.samples

                report = verifier.score_batch_detailed(
                    [s.response_text for s in samples],
                    [batch_records[s.prompt_index].answer for s in samples])
                rewards = apply_truncated_reward(report.scores,
                                                 [s.finish_reason for s in samples],
                                                 cfg.verifier.truncated_reward)

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
                metrics["data/prompt_ids_hash"] = prompt_ids_hash(batch_records)
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
                every = cfg.trainer.eval_every
                if (every > 0 and step % every == 0) or (every >= 0 and step == cfg.trainer.total_steps):
                    metrics.update(run_eval(step))
                # Saved before the step's record is written: a step in metrics.jsonl
                # that was due a checkpoint has a complete one.
                if checkpoint.due(step, cfg.trainer.save_every, cfg.trainer.total_steps):
                    save_start = time.perf_counter()
                    saved = checkpoint.save(checkpoints_dir, checkpoint.TrainerState(
                        step=step, weight_version=version, sampler=sampler.state(),
                        num_prompts=len(records), learner_world_size=cfg.learner.num_workers,
                        zero_stage=cfg.learner.zero_stage, seed=cfg.trainer.seed,
                        model_path=model_path), learners, cfg.trainer.keep_last)
                    metrics["timing/checkpoint_s"] = time.perf_counter() - save_start
                    log.info("checkpoint saved: %s", saved)
                writer.write(step, metrics)
                last = metrics
                progress.update(step, metrics)
        finally:
            if progress is not None:
                progress.close()
            writer.close()
            verifier.close()
            for group in (rollout, learners):
                if group is not None:
                    group.shutdown()
            if placement is not None:
                placement.remove()
            if started_ray:
                ray.shutdown()
        return RunResult(run_dir=run_dir, steps=cfg.trainer.total_steps, last_metrics=last,
                         evaluations=evaluations)


def _headline(metrics: dict) -> str:
    key = next((k for k in ("eval/accuracy", "eval/pass@1") if k in metrics), None)
    if key is None:
        key = next(k for k in metrics if k.startswith("eval/mean@"))
    return f"{key} {100 * metrics[key]:.1f}% over {int(metrics['eval/num_problems'])} problems"


def improvement_summary(evaluations: list[EvalResult]) -> str | None:
    """'before -> after' for the headline metric, as printed at the end of a run."""
    if len(evaluations) < 2:
        return None
    first, final = evaluations[0].metrics, evaluations[-1].metrics
    key = "eval/accuracy" if "eval/accuracy" in first else next(
        k for k in first if k.startswith("eval/mean@"))
    before, after = 100 * first[key], 100 * final[key]
    return (f"held-out {key.removeprefix('eval/')}: {before:.1f}% at step "
            f"{evaluations[0].step} -> {after:.1f}% at step {evaluations[-1].step} "
            f"({after - before:+.1f} points, {int(final['eval/num_problems'])} problems)")

