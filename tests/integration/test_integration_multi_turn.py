"""Multi-turn rollouts with the sandboxed Python tool on the real stack (Ray, vLLM, DeepSpeed).

A random tiny model writes no code blocks of its own, so the markers are chosen to force
them: the synthetic prompts end with "=", which is ``tool.code_start``, so every response
begins inside a code block, and ``tool.code_end`` is one character, which a random model
writes soon. The code is gibberish; its traceback is the observation. Generation runs one
step ahead with partial rollouts, so weight updates land between and inside turns.

The observations carry log-prob 0.0 from the worker: had the learner not masked them,
``rollout/logprob_max_abs_diff`` would be about log(vocabulary size), not under 1e-4.
"""

from __future__ import annotations

import pytest
from harness import Run, read_metrics

pytestmark = pytest.mark.integration

STEPS = 3


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_turn")
    run = Run([
        f"trainer.total_steps={STEPS}", "trainer.run_name=tools", f"trainer.output_dir={out}",
        "rollout.num_workers=1", "learner.num_workers=1", "learner.micro_batch_size=16",
        "rollout.max_turns=2", "rollout.max_staleness=1", "rollout.partial_rollout=true",
        "tool.code_start='='", "tool.code_end=a", "tool.output_start='['", "tool.output_end=']'",
        "tool.timeout_s=5", "tool.max_concurrency=2",
        "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_response_tokens=128",
        "learner.lr=1e-3", "trainer.eval_every=-1", "trainer.progress_bar=false",
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null"],
        out / "tools", out / "tools.log", timeout_s=600)
    code, left = run.finish()
    return {"code": code, "left": left, "log": run.log(), "metrics": read_metrics(run.run_dir)}


def test_tool_calls_happen_and_observations_are_masked(multi_turn):
    assert multi_turn["code"] == 0, multi_turn["log"][-6000:]
    assert multi_turn["left"] == []
    records = multi_turn["metrics"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sum(r["tool/calls_per_sample"] for r in records) > 0
    assert max(r["rollout/observation_token_frac"] for r in records) > 0
    for r in records:
        assert 0 <= r["tool/calls_per_sample"] <= 2
        assert r["rollout/turns_mean"] == pytest.approx(1 + r["tool/calls_per_sample"])
        assert r["response_length/max"] <= 128
        assert 0.0 <= r["tool/engine_idle_frac"] <= 1.0 and r["tool/wait_s"] >= 0.0
        if "rollout/logprob_max_abs_diff" in r:  # fresh tokens only; a step may have none
            assert r["rollout/logprob_max_abs_diff"] < 1e-4, r["step"]
    assert any("rollout/logprob_max_abs_diff" in r for r in records)
    # Some sample waited on its tool; meanwhile the engine had the others to generate.
    assert sum(r["tool/wait_s"] for r in records) > 0
