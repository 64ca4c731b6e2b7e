"""``ray.colocate=true`` trains on the real stack: rollout worker i and learner rank i in
one placement-group bundle, with 1 + 1 and with 2 + 2 actors.

On CPU nothing is shared but the bundle: ``auto`` picks the object store, and the
engines' log-probs must still agree with the learners' after every sync. (The placement
itself, reserved and released, is covered in test_integration_scaling.py.)
"""

from __future__ import annotations

import pytest
import yaml
from harness import Run, by_step, read_actors, read_metrics

pytestmark = pytest.mark.integration

STEPS = 3
PAIRS = (1, 2)


def settings(out, pairs: int) -> list[str]:
    return [
        f"trainer.total_steps={STEPS}", f"trainer.run_name=colocate{pairs}",
        f"trainer.output_dir={out}", "trainer.eval_every=-1", "trainer.progress_bar=false",
        "ray.colocate=true", f"rollout.num_workers={pairs}", f"learner.num_workers={pairs}",
        "rollout.verify_weight_sync=true",
        # 4 prompts x 4 samples: the smallest step that splits over two learners.
        "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.lr=1e-3",
        "verifier.reward_fn=toy_rewards:digit_share", "verifier.truncated_reward=null",
        # A random tiny model, built by the first run and reused by the second.
        "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("colocate")
    results = {}
    for pairs in PAIRS:
        run_dir = out / f"colocate{pairs}"
        run = Run(settings(out, pairs), run_dir, out / f"colocate{pairs}.log", timeout_s=600)
        code, left = run.finish()
        config = run_dir / "config.yaml"
        results[pairs] = {"code": code, "left": left, "log": run.log(),
                          "metrics": by_step(read_metrics(run_dir)), "actors": read_actors(run_dir),
                          "config": yaml.safe_load(config.read_text()) if config.is_file() else {}}
    return results


@pytest.mark.parametrize("pairs", PAIRS)
def test_every_step_finishes(runs, pairs):
    run = runs[pairs]
    assert run["code"] == 0, run["log"][-6000:]
    assert sorted(run["metrics"]) == list(range(1, STEPS + 1))
    assert [run["metrics"][s]["weights/version"] for s in range(1, STEPS + 1)] == [1, 2, 3]
    assert not run["left"], f"processes left behind: {run['left']}"


@pytest.mark.parametrize("pairs", PAIRS)
def test_each_pair_shares_one_bundle(runs, pairs):
    run = runs[pairs]
    # One group, bundle i sized for rollout worker i plus learner rank i.
    assert f"placement groups: colocated rollout+learner: {pairs} x {{CPU: 2}} PACK" in run["log"]
    rollout, learner = run["actors"]["rollout"], run["actors"]["learner"]
    assert [a["name"] for a in rollout] == [f"rollout-{i}" for i in range(pairs)]
    assert [a["name"] for a in learner] == [f"learner-{i}" for i in range(pairs)]
    assert len({a["pid"] for a in rollout + learner}) == 2 * pairs


@pytest.mark.parametrize("pairs", PAIRS)
def test_auto_picks_the_object_store(runs, pairs):
    # No GPU is shared on CPU, but no GPU means no broadcast by default either.
    config = runs[pairs]["config"]
    assert config["ray"]["colocate"] is True
    assert config["rollout"]["weight_sync"] == "object_store"


@pytest.mark.parametrize("pairs", PAIRS)
def test_engines_match_the_learners_after_every_sync(runs, pairs):
    for step, record in runs[pairs]["metrics"].items():
        assert record["rollout/logprob_max_abs_diff"] < 1e-4, step
        checksums = record["weights/rollout_checksums"]
        assert len(checksums) == pairs and len(set(checksums)) == 1, (step, checksums)
