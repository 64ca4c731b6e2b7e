"""Learner rank 0 lost in the middle of an object-store weight export, on the real stack.

The export is the learners' work: its loss costs one rebuild of the learner group from
the newest checkpoint, and no rollout worker. The workers are not allowed a single
replacement (``rollout.max_restarts=0``), so a loss blamed on them would end the run.

Rank 0 is made to wait inside its third export (``LPREG_TEST_PAUSE_EXPORT``), where the
test SIGKILLs it: a signal sent from outside could not otherwise land in that window.
"""

from __future__ import annotations

import os
import signal

import pytest
from harness import Run, actor, by_step, read_metrics

pytestmark = pytest.mark.integration

STEPS = 5


@pytest.fixture(scope="module")
def export_loss(tmp_path_factory):
    from learner.actor import EXPORT_PAUSE_ENV

    out = tmp_path_factory.mktemp("export-loss")
    marker = out / "rank0-paused-in-export"
    args = [
        f"trainer.total_steps={STEPS}", "trainer.run_name=run", f"trainer.output_dir={out}",
        "trainer.save_every=2", "trainer.keep_last=0", "trainer.max_restarts=1",
        "rollout.weight_sync=object_store", "rollout.num_workers=2", "rollout.max_restarts=0",
        "learner.num_workers=1", "learner.micro_batch_size=8",
        "data.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_response_tokens=16",
        "trainer.eval_every=-1", "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null",
        "trainer.progress_bar=false"]
    run = Run(args, out / "run", out / "run.log", env={EXPORT_PAUSE_ENV: f"3:{marker}"})
    run.wait_until(marker.exists, "rank 0 to pause in its third export")
    paused_pid = int(marker.read_text())
    assert actor(run.run_dir, "learner", "learner-0")["pid"] == paused_pid
    os.kill(paused_pid, signal.SIGKILL)
    code, left = run.finish()
    return {"code": code, "left": left, "log": run.log(), "metrics": by_step(read_metrics(run.run_dir))}


def test_the_run_heals_and_finishes(export_loss):
    assert export_loss["code"] == 0, export_loss["log"][-6000:]
    assert sorted(export_loss["metrics"]) == list(range(1, STEPS + 1))
    assert export_loss["left"] == []


def test_the_loss_is_the_learners_and_costs_no_rollout_worker(export_loss):
    last = export_loss["metrics"][STEPS]
    assert last["learner/restarts"] == 1
    assert last["rollout/restarts"] == 0
    log = export_loss["log"]
    assert "a learner rank died while exporting weights" in log
    assert "rebuilding the learner group from the newest checkpoint" in log
    # The run went back to the step-2 checkpoint and trained steps 3 to 5 again.
    assert "step 2, weights v2" in log
