"""A rollout worker lost in the middle of a multi-turn rollout, on the real stack.

The run's one rollout worker generates multi-turn responses, forced into code blocks as
in ``test_integration_multi_turn.py``. It is made to hold a sample between two turns, its
tool call paused on the tool pool's thread (``LPREG_TEST_PAUSE_TOOL``), and the test
SIGKILLs it there: a signal sent from outside could not be sure to land in that window.

What it held dies with it: the sample book, the turns so far, the tool calls. The driver
re-queues its unfinished groups whole, and its replacement, once it holds the current
weights, generates them again from the first token, turns and tool calls included: nothing
of a sample survives its worker, so nothing is resumed. With one worker the run cannot
finish unless that replacement serves; survivors taking a lost worker's groups are
``test_integration_healing.py``'s case.

Every step must train on exactly the prompts drawn for it, each group once and whole: a
lost group would leave its step waiting forever, and a group trained twice or a prompt
swapped for another would change the step's ``data/prompt_ids_hash``, which the test
recomputes from the run's own sampler. Generation is lock-step (``rollout.max_staleness=0``),
so every token is fresh and ``rollout/logprob_max_abs_diff`` on every step, the step of
the loss included, shows both that the replacement holds the learner's weights and that
the observations are masked (unmasked, their 0.0 log-probs would be far off).
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from harness import Run, by_step, read_actors, read_metrics

pytestmark = pytest.mark.integration

STEPS = 4
PROMPTS, SAMPLES, MAX_TURNS = 4, 4, 2


def settings(out) -> list[str]:
    return [
        f"trainer.total_steps={STEPS}", "trainer.run_name=heal", f"trainer.output_dir={out}",
        "rollout.num_workers=1", "rollout.max_restarts=1", "learner.num_workers=1",
        "learner.micro_batch_size=16", f"rollout.max_turns={MAX_TURNS}", "rollout.max_staleness=0",
        "tool.code_start='='", "tool.code_end=a", "tool.output_start='['", "tool.output_end=']'",
        "tool.timeout_s=5", "tool.max_concurrency=2",
        f"data.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        "rollout.max_response_tokens=128", "learner.lr=1e-3", "trainer.eval_every=-1",
        "trainer.progress_bar=false", "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null"]


def expected_prompt_hashes(args: list[str]) -> list[str]:
    """Each step's ``data/prompt_ids_hash`` in a run that lost nothing: one draw of the
    sampler per step (no dynamic sampling), in step order."""
    from conf.load import load_config
    from launch.data.prepare import load_prompts
    from launch.data.prompts import PromptSampler
    from launch.training.step_metrics import prompt_ids_hash

    cfg = load_config(overrides=args)
    train, _ = load_prompts(cfg)
    sampler = PromptSampler(train, cfg.data.prompts_per_step, seed=cfg.trainer.seed)
    return [prompt_ids_hash(sampler.next_batch()) for _ in range(cfg.trainer.total_steps)]


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    from rollout.tools.pool import TOOL_PAUSE_ENV

    out = tmp_path_factory.mktemp("multi_turn_heal")
    marker = out / "paused-in-tool"
    args = settings(out)
    run = Run(args, out / "heal", out / "heal.log", timeout_s=600, env={TOOL_PAUSE_ENV: str(marker)})
    try:
        # Armed once the learners have trained a step, so the replacement has weights to
        # catch up on that are not the initial model's.
        run.wait_until(lambda: 1 in run.steps_done(), "step 1")
        marker.with_name(marker.name + ".armed").touch()
        run.wait_until(marker.exists, "the worker to pause in a tool call")
        pid = int(marker.read_text())
        name = next(a["name"] for a in read_actors(run.run_dir)["rollout"] if a["pid"] == pid)
        steps_before = run.steps_done()
        os.kill(pid, signal.SIGKILL)
    finally:
        code, left = run.finish()  # also ends the run when the test could not kill
    return {"code": code, "left": left, "log": run.log(), "metrics": read_metrics(run.run_dir),
            "pid": pid, "name": name, "steps_before": steps_before,
            "expected_hashes": expected_prompt_hashes(args)}


def test_the_run_finishes_every_step(healed):
    assert healed["code"] == 0, healed["log"][-8000:]
    assert sorted(by_step(healed["metrics"])) == list(range(1, STEPS + 1))
    assert healed["left"] == [], "processes of the finished run are still alive"


def test_the_killed_worker_is_replaced_once_and_its_groups_requeued(healed):
    records = by_step(healed["metrics"])
    assert max(r["rollout/restarts"] for r in records.values()) == 1
    assert records[STEPS]["rollout/restarts"] == 1
    assert records[STEPS]["learner/restarts"] == 0
    log = healed["log"]
    lost = re.findall(rf"{healed['name']} \(pid {healed['pid']}, live\) died \(Ray reported the actor "
                      r"dead\): (\d+) groups \((\d+) requests\) re-queued", log)
    assert len(lost) == 1, log[-8000:]
    groups, requests = map(int, lost[0])
    # At least the group whose sample waited on the paused call; whole groups only.
    assert groups >= 1 and requests == groups * SAMPLES
    assert sum(r["rollout/redispatched_requests"] for r in records.values()) == requests
    recovered = re.findall(rf"recovered {healed['name']}: it died \(Ray reported the actor dead\); "
                           r"replaced by pid (\d+), holding the current weights", log)
    assert len(recovered) == 1 and int(recovered[0]) != healed["pid"], log[-8000:]
    # The loss came after a weight update: the replacement had weights to catch up on.
    assert healed["steps_before"]


def test_every_step_trains_on_its_own_prompts_each_group_once_and_whole(healed):
    records = by_step(healed["metrics"])
    for step, expected in enumerate(healed["expected_hashes"], start=1):
        record = records[step]
        assert record["data/prompt_ids_hash"] == expected, step
        assert record["rollout/num_samples"] == PROMPTS * SAMPLES, step
        assert record["rollout/requests_per_worker"] == [PROMPTS * SAMPLES], step


def test_regenerated_samples_are_whole_turns_on_the_current_weights_with_observations_masked(healed):
    records = by_step(healed["metrics"])
    assert sum(r["tool/calls_per_sample"] for r in records.values()) > 0
    for step in range(1, STEPS + 1):
        r = records[step]
        # A sample that kept turns of its lost first attempt could hold more calls than
        # rollout.max_turns allows, or calls its turns do not account for.
        assert 0 <= r["tool/calls_per_sample"] <= MAX_TURNS, step
        assert r["rollout/turns_mean"] == pytest.approx(1 + r["tool/calls_per_sample"]), step
        assert r["response_length/max"] <= 128, step
        assert r["rollout/staleness_max"] == 0, step
        assert r["rollout/logprob_max_abs_diff"] < 1e-4, step
