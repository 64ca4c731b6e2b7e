"""The training loop: rollout -> verify -> advantages -> update -> weight sync, step after step.

``Trainer.run`` owns the lifetime of everything it starts. ``Trainer._train_step`` is one
step of the algorithm. Generation may run ahead of training (``rollout.max_staleness``,
see ``launch.training.pipeline``), and lost actors are replaced as the run goes: a
rollout worker by the rollout pool, the learner group here, from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conf.load import to_yaml
from conf.schema import LpregConfig
from launch.cluster.remote import RunStopped, is_actor_death
from launch.data.prepare import load_prompts, prepare_prompts
from launch.data.prompts import PromptSampler
from launch.models.resolve import resolve_model_path
from launch.reporting.metrics import MetricsWriter
from launch.reporting.output import quiet_driver
from launch.reporting.progress import Progress
from launch.training import checkpoint
from launch.training.evaluation import EvalResult, evaluate, load_eval_results
from launch.training.step_metrics import (
    average_learner_metrics,
    probability_buckets,
    prompt_ids_hash,
    summarize_rollout,
    tool_wait_metrics,
)
from launch.training.watch import watch_hist_due, watch_metrics, watch_token_ids

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


class LearnerLost(RuntimeError):
    """A learner rank died: the DeepSpeed group cannot go on without it."""


class Trainer:
    """Runs one training job: start the actors, then step after step, healing as it goes."""

    def __init__(self, cfg: LpregConfig, verbose: bool = False):
        """``verbose``: every actor's output live on this terminal, nothing silenced;
        otherwise only lpreg's own lines, and the actors' output in ``<run dir>/logs/``."""
        from conf.validate import resolve_auto

        self.cfg = resolve_auto(cfg)
        self.verbose = verbose
        self.pool = self.learners = self.sync = self.pipeline = None
        self.evaluations: list[EvalResult] = []
        self.learner_restarts = 0
        self._recovery_s = 0.0  # learner recoveries not yet reported in a step's metrics
        self._reported = {"redispatched": 0, "recovery_s": 0.0, "interrupted": 0}

    def run(self) -> RunResult:
        from transformers import AutoTokenizer

        from launch.cluster import ray_setup
        from launch.cluster.placement import Placement
        from verifier import MathVerifier

        cfg = self.cfg
        if not self.verbose:
            quiet_driver()
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
        if cfg.trainer.save_every == 0 and cfg.trainer.max_restarts > 0:
            log.warning("trainer.save_every=0: there will be no checkpoint to continue from, so "
                        "losing a learner rank ends the run (rollout workers are still replaced)")
        self.run_dir = prepare_run_dir(cfg)

        import ray

        started_ray = not ray.is_initialized()
        where = ray_setup.connect(cfg, self.run_dir / "logs", self.verbose)
        ray_setup.check_capacity(cfg)
        log.info("Ray: %s; model: %s; run directory: %s%s", where, self.model_path, self.run_dir,
                 " (actors' output in logs/)" if started_ray else "")

        self.verifier = MathVerifier.from_config(cfg.verifier)
        self.placement = progress = None
        writer = MetricsWriter(self.run_dir, cfg)
        last: dict = {}
        try:
            self.placement = Placement.create(cfg)
            self._start_actors()
            step = self._resume(resume_from) if resume_from is not None else 0
            if resume_from is None and cfg.trainer.eval_every >= 0:
                self._evaluate(0)
            progress = Progress(cfg.trainer.total_steps, step, enabled=cfg.trainer.progress_bar)
            self._step_end = time.perf_counter()
            while step < cfg.trainer.total_steps:
                try:
                    metrics = self._train_step(step + 1)
                    if self._eval_due(step + 1):
                        metrics.update(self._evaluate(step + 1))
                    # Saved before the step's record is written: a step in metrics.jsonl
                    # that was due a checkpoint has a complete one.
                    if checkpoint.due(step + 1, cfg.trainer.save_every, cfg.trainer.total_steps):
                        metrics["timing/checkpoint_s"] = self._save_checkpoint(step + 1)
                except LearnerLost as lost:
                    step = self._recover_learners(lost)
                    continue
                step += 1
                metrics.update(self._health_metrics())
                writer.write(step, metrics)
                last = metrics
                progress.update(step, metrics)
        finally:
            if progress is not None:
                progress.close()
            writer.close()
            self.verifier.close()
            for group in (self.pool, self.learners):
                if group is not None:
                    group.shutdown()
            if self.placement is not None:
                self.placement.remove()
            if started_ray:
                ray.shutdown()
        return RunResult(run_dir=self.run_dir, steps=cfg.trainer.total_steps, last_metrics=last,
                         evaluations=self.evaluations)

    # --- phases of a run -----------------------------------------------------------

    def _start_actors(self) -> None:
        from launch.cluster.rollout_pool import RolloutPool
        from launch.training.pipeline import RolloutPipeline

        cfg = self.cfg
        t0 = time.perf_counter()
        log.info("placement groups: %s", self.placement.describe())
        self.pool = RolloutPool(cfg.rollout.num_workers, self.model_path, cfg.model, cfg.rollout,
                                seed=cfg.trainer.seed, placement=self.placement,
                                on_change=self._write_actors, tool_cfg=cfg.tool)
        self._start_learners()
        self.pipeline = RolloutPipeline(cfg, self.pool, self.sampler,
                                        lambda record: self.prompts.ids_of[id(record)], self.verifier)
        self.version = 0
        log.info("actors ready in %.1fs", time.perf_counter() - t0)

    def _start_learners(self) -> None:
        from launch.cluster.learner_group import LearnerGroup
        from launch.training.weight_sync import make_weight_sync

        cfg = self.cfg
        self.learners = LearnerGroup(
            self.model_path, cfg.model, cfg.learner, cfg.algorithm,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            total_steps=cfg.trainer.total_steps, seed=cfg.trainer.seed,
            placement=self.placement.learner,
            # The rollout pool keeps healing while ranks start (a rebuild can take minutes).
            tick=lambda pending: self.pool.poll(0.5, extra=pending),
            watched=watch_token_ids(self.tokenizer, cfg.trainer.watch_tokens))
        self.sync = make_weight_sync(cfg.rollout.weight_sync, self.learners, self.pool,
                                     timeout_s=cfg.rollout.timeout_s,
                                     partial=cfg.rollout.partial_rollout)
        self._write_actors()

    def _write_actors(self) -> None:
        """``actors.json`` in the run directory: every actor's name, process id and node."""
        if self.pool is None:
            return
        actors = {"rollout": self.pool.describe_actors(),
                  "learner": self.learners.describe_actors() if self.learners else []}
        tmp = self.run_dir / "actors.json.tmp"
        tmp.write_text(json.dumps(actors, indent=1))
        os.replace(tmp, self.run_dir / "actors.json")

    def _resume(self, resume_from: Path) -> int:
        """Restore learners and sampler; returns the step the checkpoint was taken after."""
        state = checkpoint.restore(resume_from, self.learners, self.sampler)
        self.version = state.weight_version
        # The rollout workers loaded model.path; they need the restored weights before
        # they generate anything.
        self.sync.push(self.version)
        self.pipeline.restore(state.pending_rounds)
        self.evaluations.extend(load_eval_results(self.run_dir / "eval.jsonl", up_to_step=state.step))
        log.info("resumed from %s: step %d, weight version %d", resume_from, state.step, self.version)
        return state.step

    def _recover_learners(self, lost: LearnerLost) -> int:
        """A new learner group from the newest checkpoint; returns the step to continue after."""
        cfg = self.cfg
        started = time.perf_counter()
        if cfg.trainer.save_every == 0:
            raise RunStopped(f"{lost}; with trainer.save_every=0 there is no checkpoint to continue "
                             "from, so the run stops (set trainer.save_every to let it heal)")
        if self.learner_restarts >= cfg.trainer.max_restarts:
            raise RunStopped(f"{lost}; trainer.max_restarts={cfg.trainer.max_restarts} "
                             "restarts of the learner group are used up, so the run stops")
        self.learner_restarts += 1
        log.warning("%s; rebuilding the learner group from the newest checkpoint", lost)
        self.learners.shutdown()
        # Work generated for later steps came from weights the run is about to give up.
        self.pipeline.reset()
        # A rank lost with its node left a bundle there: Ray moves it once it declares the
        # node dead, to a node with room, or to one that joins within ray.node_wait_s.
        self.placement.wait_for_learner_room(tick=lambda: self.pool.poll(0.5))
        self._start_learners()
        newest = checkpoint.find_latest(self.checkpoints_dir)
        if newest is not None:
            state = checkpoint.restore(newest, self.learners, self.sampler)
            step, self.version, source = state.step, state.weight_version, str(newest)
            pending_rounds = state.pending_rounds
        else:  # before the first checkpoint: the start of the run is the newest state
            self.sampler.load_state({"epoch": 0, "position": 0})
            step, self.version, source = 0, 0, f"the start of the run ({self.model_path})"
            pending_rounds = []
        self.sync.push(self.version)
        self.pipeline.restore(pending_rounds)
        self.evaluations = [e for e in self.evaluations if e.step <= step]
        took = time.perf_counter() - started
        self._recovery_s += took
        log.warning("recovered the learners: %s; rebuilt %d ranks from %s (step %d, weights v%d) "
                    "and pushed them to the rollout workers in %.1fs", lost, cfg.learner.num_workers,
                    source, step, self.version, took)
        self._step_end = time.perf_counter()
        return step

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return (every > 0 and step % every == 0) or (every >= 0 and step == self.cfg.trainer.total_steps)

    def _evaluate(self, step: int) -> dict:
        if not self.prompts.eval_records:
            return {}
        cfg = self.cfg.trainer
        result = evaluate(self.pool, self.verifier, self.prompts.eval_records,
                          self.prompts.eval_ids, step=step, temperature=cfg.eval_temperature,
                          samples=cfg.eval_samples, seed=cfg.seed,
                          max_response_tokens=self.cfg.rollout.max_response_tokens,
                          top_p=self.cfg.rollout.top_p)
        self.evaluations.append(result)
        with (self.run_dir / "eval.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.as_record(), sort_keys=True) + "\n")
        log.info("eval at step %d: %s", step, _headline(result.metrics))
        return result.metrics

    @contextmanager
    def _learner_loss(self, what: str) -> Iterator[None]:
        """A learner rank's death inside the block becomes ``LearnerLost``, naming the rank.

        The error that arrives first may be a surviving rank's, from a collective or a
        broadcast its dead peer left, so any other failure asks the ranks whether one
        died before it passes on. A ``RunStopped`` (the rollout pool giving up) passes
        through as it is.
        """
        try:
            yield
        except RunStopped:
            raise
        except Exception as err:
            if is_actor_death(err):
                raise LearnerLost(f"a learner rank died while {what} "
                                  f"({self.learners.name_of_failure(err)})") from err
            dead = self.learners.dead_rank()
            if dead is not None:
                raise LearnerLost(f"a learner rank died while {what} ({dead})") from err
            raise

    def _train_step(self, step: int) -> dict:
        """Rollout -> verify -> advantages -> update -> weight sync; returns the step's metrics."""
        from learner import compute_advantages
        from learner.batch import build_train_batch

        cfg = self.cfg
        busy_before = self.pool.busy_seconds()
        tools_before = self.pool.tool_wait_seconds()
        wait_start = time.perf_counter()
        batch = self.pipeline.take(step, learner_version=self.version)
        wait_s = time.perf_counter() - wait_start
        if not batch.samples:
            raise RunStopped(f"step {step}: no group left to train on (see rollout/dropped_stale_samples "
                             "and rollout/filtered_groups)")

        advantages = compute_advantages(
            cfg.algorithm.advantage, torch.tensor(batch.rewards, dtype=torch.float32),
            torch.tensor([s.prompt_index for s in batch.samples]))
        train_batch = build_train_batch(batch.samples, advantages, self.tokenizer.pad_token_id,
                                        learner_version=self.version, algo=cfg.algorithm,
                                        temperature=cfg.rollout.temperature)

        update_start = time.perf_counter()
        what = "training on the step's batch"
        with self._learner_loss(what):
            learner_results = self.pool.wait_refs(self.learners.train_step_refs(train_batch),
                                                  cfg.learner.timeout_s, what)
        update_s = time.perf_counter() - update_start

        self.version += 1
        with self._learner_loss("exporting weights"):
            sync_report = self.sync.push(self.version)

        step_end = time.perf_counter()
        step_s = step_end - self._step_end
        self._step_end = step_end
        metrics = summarize_rollout(batch.samples, batch.rewards, cfg.rollout.max_response_tokens)
        metrics.update(probability_buckets(train_batch.rollout_log_probs, train_batch.policy_mask))
        metrics["data/prompt_ids_hash"] = prompt_ids_hash(batch.records)
        if cfg.trainer.watch_tokens:
            watched = watch_token_ids(self.tokenizer, cfg.trainer.watch_tokens)
            metrics.update(watch_metrics(batch.samples, watched,
                                         histogram=watch_hist_due(step, cfg.trainer.watch_hist_every)))
        metrics.update(batch.metrics)
        metrics.update(average_learner_metrics(learner_results))
        num_tokens = sum(len(s.response_token_ids) for s in batch.samples)
        busy = [after - before for before, after in zip(busy_before, self.pool.busy_seconds(),
                                                        strict=True)]
        metrics.update({
            "timing/rollout_wait_s": wait_s,
            "timing/update_s": update_s,
            "timing/weight_sync_s": sync_report.seconds,
            "timing/step_s": step_s,
            # The learners work only during the update; the workers only while generating.
            "timing/learner_idle_s": max(0.0, step_s - update_s),
            "timing/rollout_idle_s": max(0.0, step_s - sum(busy) / len(busy)) if busy else 0.0,
            "weights/version": self.version,
            "weights/sync_bytes": sync_report.num_bytes,
            "perf/throughput": num_tokens / step_s if step_s > 0 else 0.0,
        })
        if cfg.rollout.max_turns > 0:
            metrics.update(tool_wait_metrics(tools_before, self.pool.tool_wait_seconds()))
        if cfg.rollout.verify_weight_sync:
            metrics["weights/rollout_checksums"] = self.pool.checksums()
        return metrics

    def _health_metrics(self) -> dict:
        """Restarts so far; re-dispatched requests, interrupted samples and recovery time since
        the last step's record."""
        counters = self.pool.counters
        metrics = {
            "rollout/restarts": counters.restarts,
            "learner/restarts": self.learner_restarts,
            "rollout/redispatched_requests": counters.redispatched_requests - self._reported["redispatched"],
            "rollout/interrupted_samples": counters.interrupted_samples - self._reported["interrupted"],
            "timing/recovery_s": (counters.recovery_s - self._reported["recovery_s"]) + self._recovery_s,
        }
        self._reported = {"redispatched": counters.redispatched_requests,
                          "recovery_s": counters.recovery_s,
                          "interrupted": counters.interrupted_samples}
        self._recovery_s = 0.0
        return metrics

    def _save_checkpoint(self, step: int) -> float:
        """Saves a resumable checkpoint; returns the seconds it took."""
        cfg = self.cfg
        save_start = time.perf_counter()
        sampler, pending_rounds = self.pipeline.resume_state()
        with self._learner_loss("saving a checkpoint"):
            saved = checkpoint.save(self.checkpoints_dir, checkpoint.TrainerState(
                step=step, weight_version=self.version, sampler=sampler, pending_rounds=pending_rounds,
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

