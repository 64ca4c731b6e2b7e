"""A resumed pipeline draws exactly the prompts an uninterrupted one draws, with dynamic
sampling and generation ahead of training both on: the driver-side logic, on a fake pool
whose rewards depend on the prompt alone, so the draw order is a function of the data."""

from __future__ import annotations

import pytest

from conf.load import load_config
from launch.cluster.rollout_pool import GroupIds
from launch.data.prompts import PromptRecord, PromptSampler
from launch.training.pipeline import RolloutPipeline
from rollout.types import GroupResult, Sample
from verifier.math_verifier import ScoreReport

STEPS = 5


class InstantPool:
    """Finishes every group at once. A group of an odd answer gets mixed rewards, an even
    one equal rewards, which dynamic sampling drops."""

    def __init__(self) -> None:
        self.group_id = GroupIds()
        self.slots = [object()]
        self.requests: dict[str, object] = {}

    def submit(self, groups) -> None:
        for group in groups:
            self.requests[group.group_id] = group

    def wait_for(self, group_ids):
        done = {}
        for gid in group_ids:
            request = self.requests.pop(gid)
            samples = [Sample(prompt_index=0, prompt_token_ids=list(request.prompt_token_ids),
                              response_token_ids=[1, 2], response_logprobs=[-1.0, -1.0],
                              finish_reason="stop", weight_version=0, worker_index=0,
                              response_text=f"{request.prompt_token_ids[0]}:{i}")
                       for i in range(request.sampling.samples_per_prompt)]
            done[gid] = GroupResult(gid, samples, worker_index=0, generate_s=0.0)
        return done

    def abort_all(self) -> None:
        self.requests.clear()


class ParityVerifier:
    def score_batch_detailed(self, responses, answers) -> ScoreReport:
        scores = [0.0 if int(a) % 2 == 0 else float(r.endswith(":0"))
                  for r, a in zip(responses, answers, strict=True)]
        return ScoreReport(scores)


def make_pipeline(records, sampler_state=None) -> RolloutPipeline:
    cfg = load_config(overrides=[
        "data.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_staleness=1",
        "algorithm.filter_groups=true", "algorithm.max_generation_rounds=6",
        f"trainer.total_steps={STEPS}", "learner.num_workers=1"])
    sampler = PromptSampler(records, cfg.data.prompts_per_step, seed=3)
    if sampler_state is not None:
        sampler.load_state(sampler_state)
    return RolloutPipeline(cfg, InstantPool(), sampler,
                           prompt_ids=lambda record: [int(record.id)], verifier=ParityVerifier())


@pytest.fixture
def records():
    return [PromptRecord(prompt=f"p{i}", answer=str(i), id=str(i)) for i in range(100)]


def prompts_of(pipeline, step: int) -> list[str]:
    # The fake pool generates with version 0 throughout: nothing is ever too stale.
    return [r.id for r in pipeline.take(step, learner_version=0).records]


@pytest.mark.parametrize("checkpoint_after", [1, 2, 3])
def test_resume_replays_the_prompts_of_an_uninterrupted_run(records, checkpoint_after):
    full = make_pipeline(records)
    order, saved = [], None
    for step in range(1, STEPS + 1):
        order.append(prompts_of(full, step))
        if step == checkpoint_after:
            saved = full.resume_state()
    sampler_state, pending = saved
    # Round 0 of the next step was drawn ahead, before this step's refill rounds.
    assert [(p["step"], p["index"]) for p in pending] == [(checkpoint_after + 1, 0)]

    resumed = make_pipeline(records, sampler_state)
    resumed.restore(pending)
    replay = [prompts_of(resumed, step) for step in range(checkpoint_after + 1, STEPS + 1)]
    assert replay == order[checkpoint_after:]
    # Every step kept 4 groups of odd answers, so refills were drawn, and no prompt of an
    # epoch was served twice.
    assert all(len(ids) == 4 and all(int(i) % 2 for i in ids) for ids in order)
    served = [i for ids in order for i in ids]
    assert len(served) == len(set(served))


def test_rewinding_to_the_oldest_pending_round_would_repeat_prompts(records):
    """What the pending list prevents: the old rule's resume serves refill prompts twice."""
    full = make_pipeline(records)
    order = [prompts_of(full, 1)]
    _, pending = full.resume_state()
    order += [prompts_of(full, step) for step in range(2, STEPS + 1)]

    rewound = make_pipeline(records, pending[0]["sampler"])
    replay = [prompts_of(rewound, step) for step in range(2, STEPS + 1)]
    assert replay != order[1:]
    # Round 0 of step 3 now draws what step 1's refill rounds drew.
    repeated = {i for ids in replay for i in ids} & set(order[0])
    assert repeated
