"""Runs that heal themselves, on the real stack.

One run takes three faults, one after the other, and finishes every step:
1. a rollout worker is SIGKILLed while it generates: its requests go to the other
   worker and a replacement starts;
2. once the replacement serves, the other rollout worker is SIGSTOPped: it hangs, is
   killed after its deadline (``rollout.timeout_s``) and is replaced;
3. once that replacement serves, a learner rank is SIGKILLed: the learner group is
   rebuilt from the newest checkpoint.

Steps take about a second; the run is long enough for the three recoveries to happen
while it trains, and the test waits for each before causing the next.

The run takes them under both weight transports: under the broadcast, a replacement
joins the group at the next push, and a learner rank lost mid-run leaves the engines to
the rebuilt learners' first push.

A second run may replace no rollout worker (``rollout.max_restarts=0``): one loss ends it
with a one-line error, and nothing of it is left running.
"""

from __future__ import annotations

import signal

import pytest
from harness import Run, actor, by_step, read_metrics, signal_actor

pytestmark = pytest.mark.integration

STEPS = 100
SAVE_EVERY = 10
PROMPTS, SAMPLES = 8, 4
HANG_DEADLINE_S = 15


def settings(out, name: str, *extra: str) -> list[str]:
    return [
        f"trainer.total_steps={STEPS}", f"trainer.run_name={name}", f"trainer.output_dir={out}",
        f"trainer.save_every={SAVE_EVERY}", "trainer.keep_last=0", "trainer.max_restarts=1",
        "rollout.num_workers=2", "learner.num_workers=2", "learner.micro_batch_size=8",
        f"rollout.timeout_s={HANG_DEADLINE_S}", "rollout.max_restarts=2",
        f"data.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        # Long answers from a random tiny model keep the workers busy generating.
        "rollout.max_response_tokens=64", "learner.lr=1e-3", "trainer.eval_every=-1",
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null",
        "trainer.progress_bar=false", *extra]


def live_with_new_pid(run: Run, name: str, old_pid: int) -> bool:
    entry = actor(run.run_dir, "rollout", name)
    return entry.get("state") == "live" and entry.get("pid") not in (None, old_pid)


@pytest.fixture(scope="module", params=["object_store", "broadcast"])
def healed(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"healing-{request.param}")
    run = Run(settings(out, "healed", f"rollout.weight_sync={request.param}"), out / "healed",
              out / "healed.log", timeout_s=1500)
    faults = {}

    # 1. SIGKILL rollout-0 as step 2 starts generating.
    run.wait_until(lambda: 1 in run.steps_done(), "step 1")
    faults["killed_rollout"] = signal_actor(run.run_dir, "rollout", "rollout-0", signal.SIGKILL)
    faults["killed_after_step"] = max(run.steps_done())
    run.wait_until(lambda: live_with_new_pid(run, "rollout-0", faults["killed_rollout"]),
                   "rollout-0's replacement")

    # 2. Hang rollout-1 (alive, but answering nothing) once the run has moved on.
    done = max(run.steps_done())
    run.wait_until(lambda: max(run.steps_done()) > done, "a step after the first recovery")
    faults["hung_rollout"] = signal_actor(run.run_dir, "rollout", "rollout-1", signal.SIGSTOP)
    run.wait_until(lambda: live_with_new_pid(run, "rollout-1", faults["hung_rollout"]),
                   "rollout-1's replacement")

    # 3. SIGKILL learner-1, once a checkpoint exists.
    run.wait_until(lambda: max(run.steps_done()) > SAVE_EVERY, f"step {SAVE_EVERY + 1}")
    faults["learner_killed_after_step"] = max(run.steps_done())
    faults["killed_learner"] = signal_actor(run.run_dir, "learner", "learner-1", signal.SIGKILL)
    code, left = run.finish()
    return {"code": code, "left": left, "log": run.log(), "metrics": read_metrics(run.run_dir),
            "faults": faults, "run_dir": run.run_dir}


def test_the_run_finishes_every_step(healed):
    assert healed["code"] == 0, healed["log"][-8000:]
    assert sorted(by_step(healed["metrics"])) == list(range(1, STEPS + 1))
    assert healed["left"] == [], "processes of the finished run are still alive"


def test_every_step_trained_on_the_full_batch(healed):
    for record in by_step(healed["metrics"]).values():
        assert record["rollout/num_samples"] == PROMPTS * SAMPLES, record["step"]
        assert sum(record["rollout/requests_per_worker"]) == PROMPTS * SAMPLES


def test_a_killed_rollout_worker_is_replaced_and_its_requests_redone_elsewhere(healed):
    records = healed["metrics"]
    assert max(r["rollout/restarts"] for r in records) == 2
    # The requests it held when it died went to the other worker.
    assert sum(r["rollout/redispatched_requests"] for r in records) > 0
    log = healed["log"]
    assert f"rollout-0 (pid {healed['faults']['killed_rollout']}" in log
    assert "recovered rollout-0" in log


def test_a_hung_rollout_worker_is_killed_after_its_deadline_and_replaced(healed):
    log = healed["log"]
    assert f"rollout-1 (pid {healed['faults']['hung_rollout']}" in log
    assert "did not answer a poll" in log or "made no progress" in log
    assert "recovered rollout-1" in log


def test_a_lost_learner_rank_resumes_from_the_newest_checkpoint(healed):
    records = by_step(healed["metrics"])
    assert records[STEPS]["learner/restarts"] == 1
    newest = healed["faults"]["learner_killed_after_step"] // SAVE_EVERY * SAVE_EVERY
    log = healed["log"]
    assert "recovered the learners" in log and f"step_{newest}" in log
    assert f"learner-1, pid {healed['faults']['killed_learner']}" in log
    # The rollout workers got the restored weights: the learner's log-probs agree with
    # vLLM's on every step after the recovery.
    for step in range(newest + 1, STEPS + 1):
        assert records[step]["rollout/logprob_max_abs_diff"] < 1e-4, step


def test_recoveries_are_in_the_metrics(healed):
    records = healed["metrics"]
    assert sum(r["timing/recovery_s"] for r in records) > 0


@pytest.fixture(scope="module")
def exhausted(tmp_path_factory):
    out = tmp_path_factory.mktemp("exhausted")
    args = settings(out, "exhausted", "rollout.max_restarts=0", "rollout.num_workers=1",
                    "learner.num_workers=1")
    run = Run(args, out / "exhausted", out / "exhausted.log")
    run.wait_until(lambda: 1 in run.steps_done(), "step 1")
    pid = signal_actor(run.run_dir, "rollout", "rollout-0", signal.SIGKILL)
    code, left = run.finish()
    return {"code": code, "left": left, "log": run.log(), "pid": pid}


def test_past_max_restarts_the_run_stops_with_one_clear_line(exhausted):
    assert exhausted["code"] == 1, exhausted["log"][-4000:]
    last = exhausted["log"].strip().splitlines()[-1]
    assert last.startswith(f"lpreg: error: rollout-0 (pid {exhausted['pid']}) died"), last
    assert "rollout.max_restarts=0" in last
    assert "Traceback" not in exhausted["log"]


def test_past_max_restarts_nothing_is_left_running(exhausted):
    assert exhausted["left"] == []
