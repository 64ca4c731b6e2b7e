"""The whole loop on real Ray, real vLLM (CPU build) and real DeepSpeed (gloo), under both
weight transports: the object store, and the broadcast that GPU runs use (its gloo wire
here), with ZeRO-3 gathering one layer at a time and the tiny model's tied embeddings.

Both runs sample with ``rollout.top_p=0.9``, so vLLM's log-probs are of its top-p set,
renormalised, and the learner's must be taken under the same transform to agree with them
(``learner.top_p``). The default ``top_p=1`` is checked under both transports by
``test_integration_healing``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REQUIRED_KEYS = {"step", "reward/mean", "response_length/mean", "timing/rollout_s",
                 "timing/update_s", "timing/weight_sync_s", "rollout/tokens_per_s",
                 "weights/version"}


TRANSPORTS = {
    "object_store": ["learner.zero_stage=2", "trainer.total_steps=3"],
    "broadcast": ["rollout.weight_sync=broadcast", "learner.zero_stage=3", "trainer.total_steps=6"],
}


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def two_by_two_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "launch.cli", "train",
           *TRANSPORTS[request.param], "trainer.run_name=loop", f"trainer.output_dir={out}",
           "rollout.num_workers=2", "learner.num_workers=2",
           "rollout.verify_weight_sync=true", "learner.lr=1e-3", "algorithm.loss=ppo_clip",
           # Without the learner's top-p transform every token is off by the log of the kept
           # mass: 0.105 (about -log 0.9) on the random tiny model, far above 1e-4.
           "rollout.top_p=0.9",
           "data.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.micro_batch_size=4",
           "verifier.reward_fn=toy_rewards:digit_share", "trainer.eval_every=-1",
           # An untrained model rarely ends its answer, so keep truncated responses scored.
           "verifier.truncated_reward=null",
           # A random tiny model: this test is about the plumbing, not learning.
           "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = out / "loop"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, metrics


def test_metrics_have_one_record_per_step_with_required_keys(two_by_two_run):
    run_dir, metrics = two_by_two_run
    steps = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["total_steps"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for record in metrics:
        assert REQUIRED_KEYS <= record.keys(), REQUIRED_KEYS - record.keys()
    assert [m["weights/version"] for m in metrics] == list(range(1, steps + 1))


def test_vllm_logprobs_match_learner_after_every_sync(two_by_two_run):
    # Each step's responses were generated with the weights of the previous sync; the
    # learners recompute their log-probs in the training pass before updating, under
    # vLLM's temperature and top-p set.
    _, metrics = two_by_two_run
    for record in metrics:
        assert record["rollout/logprob_max_abs_diff"] < 1e-4, record["step"]


def test_every_rollout_worker_received_the_new_weights(two_by_two_run):
    run_dir, metrics = two_by_two_run
    checksums = [m["weights/rollout_checksums"] for m in metrics]
    for per_worker in checksums:
        assert len(per_worker) == 2 and per_worker[0] == per_worker[1]
    # The policy moved: each sync delivered different weights.
    firsts = [per_worker[0] for per_worker in checksums]
    assert all(a != b for a, b in zip(firsts, firsts[1:], strict=False))
    assert all(m["actor/grad_norm"] > 0 for m in metrics)
    # Every tensor under every name, tied ones twice, counted at full size under ZeRO-3.
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
        resolved_model(run_dir)).parameters())
    assert all(m["weights/sync_bytes"] >= 4 * params for m in metrics)


def test_both_workers_served_requests(two_by_two_run):
    _, metrics = two_by_two_run
    assert all(min(m["rollout/requests_per_worker"]) > 0 for m in metrics)


def test_run_directory_holds_the_resolved_config(two_by_two_run):
    run_dir, _ = two_by_two_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    transport = cfg["rollout"]["weight_sync"]
    assert f"trainer.total_steps={cfg['trainer']['total_steps']}" in TRANSPORTS[transport]
    assert cfg["learner"]["num_workers"] == 2
    assert cfg["rollout"]["top_p"] == 0.9
    assert cfg["verifier"]["reward_fn"] == "toy_rewards:digit_share"


def resolved_model(run_dir: Path) -> str:
    """The model directory a run trained, as its resolved config names it."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["model"]["path"] or str(next(Path(cfg["model"]["cache_dir"]).glob("*/config.json")).parent)
