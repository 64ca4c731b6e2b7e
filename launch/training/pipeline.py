"""Where a step's training batch comes from: prompts -> groups on the rollout pool -> scored,
filtered groups, with generation running up to ``rollout.max_staleness`` steps ahead.

A *round* is one draw of ``data.prompts_per_step`` prompts from the sampler, submitted to
the pool as one GRPO group per prompt. Each step owns its rounds: round 0 is submitted
up to ``k`` steps ahead (while the learners train on earlier steps), later rounds only
when dynamic sampling (``algorithm.filter_groups``) needs more groups for the step.

Staleness, per sample: the learner's weight version when it trains on the sample, minus
the oldest version among the sample's tokens. A group holding a sample older than ``k``
is dropped and its samples counted. With ``k = 0`` every step is generated, scored and
trained on in lock-step, with the same prompts and sampling seeds as it always had.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conf.schema import LpregConfig
from launch.cluster.rollout_pool import RolloutPool
from launch.data.prompts import PromptRecord, PromptSampler
from rollout.types import GroupRequest, GroupResult, Sample, SamplingSettings
from verifier.shaping import shape_rewards

log = logging.getLogger("lpreg")


def group_seed(seed: int, *key: object) -> int:
    """The sampling seed of one group, from the run's seed and the group's place (e.g.
    "train", step, round, index); its sample j samples with this seed + j.

    Every group gets its own: vLLM draws a seeded request's random numbers from its seed
    alone, so groups that shared a seed would share them, and sample alike wherever their
    distributions are alike (a first token, a tool call: whole batches made the same
    choice together). Hashed, so that seeds of different steps and rounds do not overlap
    as consecutive ones would."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**62  # room for + j and the segment stride below 2**63


def staleness(sample: Sample, learner_version: int) -> int:
    return learner_version - min(sample.versions(), default=sample.weight_version)


@dataclass
class Round:
    step: int
    index: int
    records: list[PromptRecord]
    group_ids: list[str]
    sampler_state: dict[str, int]  # before this round's prompts were drawn
    submitted: float


@dataclass
class StepBatch:
    """What one step trains on: kept groups in order, their samples and rewards."""

    records: list[PromptRecord]  # one per kept group
    samples: list[Sample]  # prompt_index = the group's position in ``records``
    rewards: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutPipeline:
    def __init__(self, cfg: LpregConfig, pool: RolloutPool, sampler: PromptSampler,
                 prompt_ids: Callable[[PromptRecord], list[int]], verifier):
        self.cfg = cfg
        self.pool = pool
        self.sampler = sampler
        self.prompt_ids = prompt_ids
        self.verifier = verifier
        self.rounds: dict[tuple[int, int], Round] = {}

    # -- submission --------------------------------------------------------------------
    def _submit_round(self, step: int, index: int) -> Round:
        cfg = self.cfg
        state = self.sampler.state()
        records = self.sampler.next_batch()
        groups = [GroupRequest(self.pool.group_id(f"s{step}r{index}g{i}"), self.prompt_ids(record),
                               SamplingSettings(
                                   samples_per_prompt=cfg.rollout.samples_per_prompt,
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   max_response_tokens=cfg.rollout.max_response_tokens,
                                   seed=group_seed(cfg.trainer.seed, "train", step, index, i)))
                  for i, record in enumerate(records)]
        round_ = Round(step, index, records, [g.group_id for g in groups], state, time.monotonic())
        self.rounds[(step, index)] = round_
        self.pool.submit(groups)
        return round_

    def submit_ahead(self, step: int) -> None:
        """Round 0 of every step up to ``step + max_staleness`` is on its way: those steps
        generate while the learners train on ``step``."""
        last = min(step + self.cfg.rollout.max_staleness, self.cfg.trainer.total_steps)
        for s in range(step, last + 1):
            if (s, 0) not in self.rounds:
                self._submit_round(s, 0)

    def resume_state(self) -> tuple[dict[str, int], list[dict]]:
        """What a checkpoint must hold to replay this run's prompt order exactly:
        ``(sampler state now, rounds drawn but not yet trained on)``.

        Rounds are drawn in an order that depends on the run's own history: with staleness
        ``k >= 1``, round 0 of later steps is drawn before this step's refill rounds. A resume
        that rewound the sampler to the oldest pending round would draw those refills' prompts
        a second time, so each pending round is kept with the sampler state it was drawn from,
        in draw order. Their generations are lost and regenerated.
        """
        pending = [{"step": r.step, "index": r.index, "sampler": dict(r.sampler_state)}
                   for r in self.rounds.values()]
        return self.sampler.state(), pending

    def restore(self, pending: list[dict]) -> None:
        """Submit again the rounds a checkpoint left pending (``resume_state``), with the
        prompts they drew then; the sampler then continues where it stood."""
        after = self.sampler.state()
        try:
            for entry in pending:
                self.sampler.load_state(entry["sampler"])
                self._submit_round(int(entry["step"]), int(entry["index"]))
        finally:
            self.sampler.load_state(after)

    def reset(self) -> None:
        """Forget every round (the learners were restored to an earlier step)."""
        self.rounds.clear()
        self.pool.abort_all()

    # -- a step's batch ----------------------------------------------------------------------
    def take(self, step: int, learner_version: int) -> StepBatch:
        """The scored, filtered groups of ``step``; submits and waits as needed."""
        cfg = self.cfg
        wanted = cfg.data.prompts_per_step
        self.submit_ahead(step)
        records: list[PromptRecord] = []
        groups: list[GroupResult] = []
        rewards: list[list[float]] = []
        counts = {"dropped_stale_samples": 0, "filtered_groups": 0, "rounds": 0}
        score_metrics: list[dict] = []
        first_submit = self.rounds[(step, 0)].submitted
        index = 0
        while True:
            round_ = self.rounds.pop((step, index))
            done = self.pool.wait_for(round_.group_ids)
            counts["rounds"] += 1
            round_groups = [done[g] for g in round_.group_ids]
            round_rewards, metrics = self._score(round_.records, round_groups)
            score_metrics.append(metrics)
            for record, group, group_rewards in zip(round_.records, round_groups, round_rewards,
                                                    strict=True):
                too_old = sum(staleness(s, learner_version) > cfg.rollout.max_staleness
                              for s in group.samples)
                if too_old:
                    counts["dropped_stale_samples"] += too_old
                    continue
                if cfg.algorithm.filter_groups and len(set(group_rewards)) == 1:
                    counts["filtered_groups"] += 1
                    continue
                records.append(record)
                groups.append(group)
                rewards.append(group_rewards)
            index += 1
            if len(groups) >= wanted or not cfg.algorithm.filter_groups \
                    or index >= cfg.algorithm.max_generation_rounds:
                break
            self._submit_round(step, index)
        generation_s = time.monotonic() - first_submit
        if cfg.algorithm.filter_groups and len(groups) < wanted:
            log.warning("step %d: %d of %d groups kept after %d generation rounds "
                        "(algorithm.max_generation_rounds); training on what was kept",
                        step, len(groups), wanted, counts["rounds"])
        keep = trainable_group_count(len(groups), cfg)
        records, groups, rewards = records[:keep], groups[:keep], rewards[:keep]
        samples = []
        for position, group in enumerate(groups):
            for sample in group.samples:
                sample.prompt_index = position
                samples.append(sample)
        flat_rewards = [r for group_rewards in rewards for r in group_rewards]
        metrics = self._metrics(samples, groups, learner_version, counts, score_metrics, generation_s)
        return StepBatch(records, samples, flat_rewards, metrics)

    def _score(self, records: list[PromptRecord], groups: list[GroupResult]):
        samples = [s for g in groups for s in g.samples]
        answers = [r.answer for r, g in zip(records, groups, strict=True) for _ in g.samples]
        report = self.verifier.score_batch_detailed([s.response_text for s in samples], answers)
        rewards, shaping = shape_rewards(
            report.scores, [len(s.response_token_ids) for s in samples],
            [s.finish_reason for s in samples], self.cfg.verifier, self.cfg.rollout.max_response_tokens)
        per_group, start = [], 0
        for group in groups:
            per_group.append(rewards[start:start + len(group.samples)])
            start += len(group.samples)
        return per_group, {**report.metrics(), **shaping}

    def _metrics(self, samples: list[Sample], groups: list[GroupResult], learner_version: int,
                 counts: dict, score_metrics: list[dict], generation_s: float) -> dict:
        num_workers = len(self.pool.slots)
        requests = [0] * num_workers
        tokens = [0] * num_workers
        for group in groups:
            for sample in group.samples:
                requests[group.worker_index] += 1
                tokens[group.worker_index] += len(sample.response_token_ids)
        ages = [staleness(s, learner_version) for s in samples]
        token_ages = [learner_version - v for s in samples for v in s.versions()]
        metrics: dict = {
            "rollout/requests_per_worker": requests,
            "rollout/tokens_per_worker": tokens,
            "rollout/staleness_max": max(ages, default=0),
            "rollout/staleness_mean": statistics.fmean(ages) if ages else 0.0,
            "rollout/stale_token_frac": (sum(a > 0 for a in token_ages) / len(token_ages)
                                         if token_ages else 0.0),
            # Responses continued across a weight update: tokens from several versions.
            "rollout/multi_version_samples": sum(len(set(s.versions())) > 1 for s in samples),
            "rollout/dropped_stale_samples": counts["dropped_stale_samples"],
            "rollout/generation_rounds": counts["rounds"],
            "timing/rollout_s": generation_s,
            "rollout/tokens_per_s": sum(tokens) / generation_s if generation_s > 0 else 0.0,
        }
        if self.cfg.algorithm.filter_groups:
            metrics["rollout/filtered_groups"] = counts["filtered_groups"]
            metrics["rollout/kept_groups"] = len(groups)
        # Verifier counters add up over rounds; rates are averaged.
        for key in sorted({k for m in score_metrics for k in m}):
            values = [m[key] for m in score_metrics if key in m]
            summed = key.endswith(("timeouts", "errors", "_s"))
            metrics[key] = sum(values) if summed else statistics.fmean(values)
        return metrics


def trainable_group_count(kept: int, cfg: LpregConfig) -> int:
    """The most of ``kept`` groups that split evenly into mini-batches over the learners."""
    n = cfg.rollout.samples_per_prompt
    mini, ranks = cfg.algorithm.mini_batches_per_step, cfg.learner.num_workers
    count = min(kept, cfg.data.prompts_per_step)
    while count > 0 and (count % mini or (count * n) % (mini * ranks)):
        count -= 1
    return count
