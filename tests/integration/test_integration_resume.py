"""Checkpoints on the real stack: a run killed with SIGKILL resumes exactly, and the
Hugging Face export of a checkpoint serves in vLLM as the learner would.

Two training runs of 4 steps with the same seed: one straight through, one killed
during step 3 and resumed with ``trainer.resume=auto``.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import by_step, environment, kill_session, read_metrics, session_pids, train_command

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RUN_TIMEOUT_S = 1200


def settings(out: Path, name: str) -> list[str]:
    return [
        "trainer.total_steps=4", "trainer.save_every=2", f"trainer.run_name={name}",
        f"trainer.output_dir={out}", "data.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "rollout.num_workers=1", "learner.num_workers=1", "learner.micro_batch_size=8",
        # The evaluation at step 3 keeps step 3 busy for a while: the kill lands inside it.
        "trainer.eval_every=3", "data.num_synthetic_eval=768",
        # A random tiny model with a dense reward, scored even when cut at the length
        # limit: every group has non-zero advantages, so the weights really move.
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null"]


def run_to_end(args: list[str], log_path: Path) -> str:
    with log_path.open("w") as log:
        proc = subprocess.Popen(train_command(args), cwd=ROOT, env=environment(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None or session_pids(proc.pid):
                kill_session(proc)
    text = log_path.read_text()
    assert code == 0, text[-6000:]
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    full_log = run_to_end(settings(out, "full"), out / "full.log")

    # The same run, killed once step 2 (and its checkpoint) is done and step 3 is underway.
    args = settings(out, "resumed")
    run_dir = out / "resumed"
    with (out / "killed.log").open("w") as log:
        proc = subprocess.Popen(train_command(args), cwd=ROOT, env=environment(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not any(r.get("step") == 2 for r in read_metrics(run_dir)):
                assert proc.poll() is None, (out / "killed.log").read_text()[-6000:]
                assert time.monotonic() < deadline, "step 2 never finished"
                time.sleep(0.05)
        finally:
            kill_session(proc)
    at_kill = read_metrics(run_dir)

    resumed_log = run_to_end([*args, "trainer.resume=auto"], out / "resumed.log")
    return {"out": out, "full": read_metrics(out / "full"), "at_kill": at_kill,
            "resumed": read_metrics(run_dir), "full_log": full_log, "resumed_log": resumed_log}


def test_kill_landed_during_step_3(runs):
    assert [r["step"] for r in runs["at_kill"]] == [1, 2]


def test_resumed_run_ends_at_step_4_with_the_prompts_of_an_uninterrupted_run(runs):
    assert "resumed from" in runs["resumed_log"] and "step_2" in runs["resumed_log"]
    # metrics.jsonl kept the first attempt's steps and appended the rest.
    assert [r["step"] for r in runs["resumed"]] == [1, 2, 3, 4]
    full, resumed = by_step(runs["full"]), by_step(runs["resumed"])
    for step in (1, 2, 3, 4):
        assert resumed[step]["data/prompt_ids_hash"] == full[step]["data/prompt_ids_hash"], step
    assert len({full[s]["data/prompt_ids_hash"] for s in full}) == 4  # distinct batches


def test_resumed_training_continues_from_the_restored_state(runs):
    full, resumed = by_step(runs["full"]), by_step(runs["resumed"])
    assert [resumed[s]["weights/version"] for s in (3, 4)] == [3, 4]
    assert all(full[s]["actor/grad_norm"] > 0 for s in full)  # the policy moved every step
    for step in (3, 4):
        # The rollout worker generated with the restored weights: the learner's
        # recomputed log-probs (restored DeepSpeed state) agree with vLLM's.
        assert resumed[step]["rollout/logprob_max_abs_diff"] < 1e-4, step
        # Same weights, optimizer state, prompts and sampling seed: the same step.
        for key in ("reward/mean", "response_length/mean", "actor/pg_loss", "actor/entropy"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)


def test_checkpoints_are_complete_and_pruned(runs):
    from launch.training import checkpoint

    root = runs["out"] / "full" / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [2, 4]
    state = checkpoint.read_state(root / "step_4")
    assert (state.step, state.weight_version, state.sampler["position"]) == (4, 4, 16)
    assert "timing/checkpoint_s" in by_step(runs["full"])[2]


def test_evaluations_survive_the_resume(runs):
    from launch.training.evaluation import load_eval_results

    evals = load_eval_results(runs["out"] / "resumed" / "eval.jsonl")
    assert [e.step for e in evals] == [0, 3, 4]
    assert "held-out" in runs["resumed_log"]  # before -> after, across the kill


def test_hf_export_serves_in_vllm_with_the_learners_greedy_output(runs, tmp_path):
    step_dir = runs["out"] / "full" / "checkpoints" / "step_4"
    result_path = tmp_path / "greedy.json"
    proc = subprocess.run([sys.executable, str(HERE / "hf_export_greedy.py"), str(step_dir),
                           str(result_path)], cwd=ROOT, env=environment(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(result_path.read_text())
    # The export holds exactly the learner's weights...
    assert result["export_matches_learner"] and all(result["export_matches_learner"].values())
    # ...and vLLM decodes them greedily as transformers does, token for token (fp32),
    # unless two tokens tie to within float error.
    for vllm_tokens, hf_tokens, margins in zip(result["vllm"], result["hf"], result["margins"],
                                               strict=True):
        if vllm_tokens != hf_tokens:
            differ = [i for i, (a, b) in enumerate(zip(vllm_tokens, hf_tokens, strict=False))
                      if a != b]
            assert differ and margins[differ[0]] < 1e-5, (vllm_tokens, hf_tokens)
        assert vllm_tokens


# -- dynamic sampling with generation ahead of training ----------------------------------

def dynamic_settings(out: Path, name: str) -> list[str]:
    return [
        "trainer.total_steps=4", "trainer.save_every=1", "trainer.keep_last=0",
        f"trainer.run_name={name}", f"trainer.output_dir={out}", "trainer.eval_every=-1",
        "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_staleness=1",
        "algorithm.filter_groups=true", "algorithm.max_generation_rounds=8",
        "rollout.num_workers=1", "learner.num_workers=1", "learner.micro_batch_size=16",
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        # Groups of even answers always tie and are dropped; odd ones never tie: every step
        # needs refill rounds, drawn after the next step's first round.
        "verifier.reward_fn=toy_rewards:distinct_on_odd_answers", "verifier.truncated_reward=null"]


@pytest.fixture(scope="module")
def dynamic_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic")
    run_to_end(dynamic_settings(out, "full"), out / "full.log")
    full = by_step(read_metrics(out / "full"))
    # A second run continues from the checkpoint of the first step that needed refill
    # rounds (drawn after the next step's first round), as a resume after a crash would.
    refilled = [s for s in (1, 2, 3) if full[s]["rollout/generation_rounds"] >= 2]
    assert refilled, "no step needed a refill round: the run does not test the order"
    checkpoint_dir = out / "full" / "checkpoints" / f"step_{refilled[0]}"
    resumed_log = run_to_end([*dynamic_settings(out, "resumed"), f"trainer.resume={checkpoint_dir}"],
                             out / "resumed.log")
    return {"full": full, "resumed": by_step(read_metrics(out / "resumed")),
            "resumed_log": resumed_log, "checkpoint_step": refilled[0], "checkpoint": checkpoint_dir}


def test_resume_with_dynamic_sampling_ahead_replays_the_uninterrupted_prompt_order(dynamic_runs):
    from launch.training import checkpoint

    full, resumed, after = dynamic_runs["full"], dynamic_runs["resumed"], dynamic_runs["checkpoint_step"]
    assert sorted(resumed) == list(range(after + 1, 5)) and "resumed from" in dynamic_runs["resumed_log"]
    # The checkpoint kept the round drawn ahead of the refills.
    state = checkpoint.read_state(dynamic_runs["checkpoint"])
    assert [(r["step"], r["index"]) for r in state.pending_rounds] == [(after + 1, 0)]
    for step in range(after + 1, 5):
        assert resumed[step]["data/prompt_ids_hash"] == full[step]["data/prompt_ids_hash"], step
        assert resumed[step]["rollout/kept_groups"] == full[step]["rollout/kept_groups"] == 4, step
