"""The driver: one RL step at a time, rollout -> verify -> advantages -> update -> sync."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conf.load import to_yaml
from conf.schema import LpregConfig
from launch.data.prepare import load_prompts, prepare_prompts
from launch.data.prompts import PromptSampler
from launch.models.resolve import resolve_model_path
from launch.reporting.metrics import MetricsWriter
from launch.reporting.progress import Progress
from launch.training import checkpoint
from launch.training.evaluation import EvalResult, evaluate, load_eval_results
from launch.training.step_metrics import average_learner_metrics, prompt_ids_hash, summarize_rollout
from verifier.shaping import shape_rewards

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


class Trainer:
    """Runs one training job: start the actors, then rollout -> verify -> update -> sync.

    ``run`` owns the lifetime of everything it starts; the per-step work lives in
    ``_train_step`` so that the loop reads as the algorithm does.
    """

    def __init__(self, cfg: LpregConfig):
        self.cfg = cfg
        self.rollout = self.learners = self.sync = None
        self.evaluations: list[EvalResult] = []

    def run(self) -> RunResult:
        from transformers import AutoTokenizer

        from launch.cluster import ray_setup
        from launch.cluster.placement import Placement
        from verifier import MathVerifier

        cfg = self.cfg
        # Everything that can be wrong with the checkpoint or the data is found before
        # anything is written or started: a bad row costs no model build and leaves no
        # run directory behind.
        resume_from, self.checkpoints_dir = checkpoint.plan(cfg)
        train_records, eval_records = load_prompts(cfg)
        self.model_path = resolve_model_path(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.prompts = prepare_prompts(cfg, self.tokenizer, train_records, eval_records)
        self.sampler = PromptSampler(self.prompts.records, cfg.data.prompts_per_step,
                                     seed=cfg.trainer.seed)
        if resume_from is not None:
            checkpoint.check_compatible(
                checkpoint.read_state(resume_from), world_size=cfg.learner.num_workers,
                zero_stage=cfg.learner.zero_stage, num_prompts=len(self.prompts.records),
                where=resume_from)
        self.run_dir = prepare_run_dir(cfg)

        import ray

        started_ray = not ray.is_initialized()
        where = ray_setup.connect(cfg)
        ray_setup.check_capacity(cfg)
        log.info("Ray: %s; model: %s; run directory: %s", where, self.model_path, self.run_dir)

        self.verifier = MathVerifier.from_config(cfg.verifier)
        placement = progress = None
        writer = MetricsWriter(self.run_dir)
        last: dict = {}
        try:
            placement = Placement.create(cfg)
            self._start_actors(placement)
            start_step = self._resume(resume_from) if resume_from is not None else 0
            if resume_from is None and cfg.trainer.eval_every >= 0:
                self._evaluate(0)
            progress = Progress(cfg.trainer.total_steps, start_step, enabled=cfg.trainer.progress_bar)
            for step in range(start_step + 1, cfg.trainer.total_steps + 1):
                metrics = self._train_step(step)
                if self._eval_due(step):
                    metrics.update(self._evaluate(step))
                # Saved before the step's record is written: a step in metrics.jsonl
                # that was due a checkpoint has a complete one.
                if checkpoint.due(step, cfg.trainer.save_every, cfg.trainer.total_steps):
                    metrics["timing/checkpoint_s"] = self._save_checkpoint(step)
                writer.write(step, metrics)
                last = metrics
                progress.update(step, metrics)
        finally:
            if progress is not None:
                progress.close()
            writer.close()
            self.verifier.close()
            for group in (self.rollout, self.learners):
                if group is not None:
                    group.shutdown()
            if placement is not None:
                placement.remove()
            if started_ray:
                ray.shutdown()
        return RunResult(run_dir=self.run_dir, steps=cfg.trainer.total_steps, last_metrics=last,
                         evaluations=self.evaluations)

    # --- phases of a run -----------------------------------------------------------

    def _start_actors(self, placement) -> None:
        from launch.cluster.learner_group import LearnerGroup
        from launch.cluster.rollout_group import RolloutGroup
        from launch.training.weight_sync import make_weight_sync, weight_transport

        cfg = self.cfg
        t0 = time.perf_counter()
        log.info("placement groups: %s", placement.describe())
        self.rollout = RolloutGroup(cfg.rollout.num_workers, self.model_path, cfg.model, cfg.rollout,
                                    seed=cfg.trainer.seed, placement=placement.rollout)
        self.learners = LearnerGroup(
            self.model_path, cfg.model, cfg.learner, cfg.algorithm,
            temperature=cfg.rollout.temperature, total_steps=cfg.trainer.total_steps,
            seed=cfg.trainer.seed, placement=placement.learner)
        self.sync = make_weight_sync(weight_transport(cfg), self.learners, self.rollout,
                                     timeout_s=cfg.rollout.timeout_s)
        self.version = 0
        log.info("actors ready in %.1fs", time.perf_counter() - t0)

    def _resume(self, resume_from: Path) -> int:
        """Restore learners and sampler; returns the step the checkpoint was taken after."""
        state = checkpoint.restore(resume_from, self.learners, self.sampler)
        self.version = state.weight_version
        # The rollout workers loaded model.path; they need the restored weights before
        # they generate anything.
        self.sync.push(self.version)
        self.evaluations.extend(load_eval_results(self.run_dir / "eval.jsonl", up_to_step=state.step))
        log.info("resumed from %s: step %d, weight version %d", resume_from, state.step, self.version)
        return state.step

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return (every > 0 and step % every == 0) or (every >= 0 and step == self.cfg.trainer.total_steps)

    def _evaluate(self, step: int) -> dict:
        if not self.prompts.eval_records:
            return {}
        cfg = self.cfg.trainer
        result = evaluate(self.rollout, self.verifier, self.prompts.eval_records,
                          self.prompts.eval_ids, step=step, temperature=cfg.eval_temperature,
                          samples=cfg.eval_samples, seed=cfg.seed)
        self.evaluations.append(result)
        with (self.run_dir / "eval.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.as_record(), sort_keys=True) + "\n")
        log.info("eval at step %d: %s", step, _headline(result.metrics))
        return result.metrics

    def _train_step(self, step: int) -> dict:
        """Rollout -> verify -> advantages -> update -> weight sync; returns the step's metrics."""
        from learner import compute_advantages
        from learner.batch import build_train_batch

        cfg = self.cfg
        step_start = time.perf_counter()
        batch_records = self.sampler.next_batch()
        roll = self.rollout.generate([self.prompts.ids_of[id(r)] for r in batch_records],
                                     seed=cfg.trainer.seed * 100_003 + step)
        samples = roll.samples

        report = self.verifier.score_batch_detailed(
            [s.response_text for s in samples], [batch_records[s.prompt_index].answer for s in samples])
        rewards, shaping_metrics = shape_rewards(
            report.scores, [len(s.response_token_ids) for s in samples],
            [s.finish_reason for s in samples], cfg.verifier, cfg.rollout.max_response_tokens)
        advantages = compute_advantages(
            cfg.algorithm.advantage, torch.tensor(rewards, dtype=torch.float32),
            torch.tensor([s.prompt_index for s in samples]))
        batch = build_train_batch(samples, advantages, self.tokenizer.pad_token_id)

        update_start = time.perf_counter()
        learner_results = self.learners.train_step(batch)
        update_s = time.perf_counter() - update_start

        self.version += 1
        sync_report = self.sync.push(self.version)

        metrics = summarize_rollout(samples, rewards, cfg.rollout.max_response_tokens)
        metrics["data/prompt_ids_hash"] = prompt_ids_hash(batch_records)
        metrics.update(report.metrics())
        metrics.update(shaping_metrics)  # reward/overlong_penalty_mean, when the penalty is on
        metrics.update(average_learner_metrics(learner_results))
        num_tokens = sum(roll.tokens_per_worker)
        staleness = [self.version - 1 - s.weight_version for s in samples]
        metrics.update({
            "timing/rollout_s": roll.seconds,
            "timing/update_s": update_s,
            "timing/weight_sync_s": sync_report.seconds,
            "timing/step_s": time.perf_counter() - step_start,
            "rollout/tokens_per_s": num_tokens / roll.seconds if roll.seconds else 0.0,
            "rollout/requests_per_worker": roll.requests_per_worker,
            "rollout/tokens_per_worker": roll.tokens_per_worker,
            "rollout/staleness_max": max(staleness),
            "weights/version": self.version,
            "weights/sync_bytes": sync_report.num_bytes,
            "perf/throughput": num_tokens / (time.perf_counter() - step_start),
        })
        if cfg.rollout.verify_weight_sync:
            metrics["weights/rollout_checksums"] = self.rollout.weights_checksums()
        return metrics

    def _save_checkpoint(self, step: int) -> float:
        """Saves a resumable checkpoint; returns the seconds it took."""
        cfg = self.cfg
        save_start = time.perf_counter()
        saved = checkpoint.save(self.checkpoints_dir, checkpoint.TrainerState(
            step=step, weight_version=self.version, sampler=self.sampler.state(),
            num_prompts=len(self.prompts.records), learner_world_size=cfg.learner.num_workers,
            zero_stage=cfg.learner.zero_stage, seed=cfg.trainer.seed, model_path=self.model_path),
            self.learners, cfg.trainer.keep_last)
        log.info("checkpoint saved: %s", saved)
        return time.perf_counter() - save_start


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

