"""``lpreg compare`` end to end: two arms, one seed, a few steps each, on real Ray, vLLM and
DeepSpeed; then the same command again, which must find both runs finished."""

import json

import pytest
from harness import run_compare, session_pids

from launch.training.step_metrics import PROB_BUCKET_KEYS

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["trainer.total_steps=3", "rollout.num_workers=1", "learner.num_workers=1",
         "data.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.micro_batch_size=8",
         "algorithm.mini_batches_per_step=2", "data.num_synthetic_eval=20",
         # A random tiny model scored by digit share: rewards differ inside every group, so
         # Lp-Reg has negative answers to act on.
         "model.tiny.warm_start_steps=0", "verifier.reward_fn=toy_rewards:digit_share",
         "verifier.truncated_reward=null"]


def compare(out, extra=()):
    return run_compare(["laptop_grpo", "laptop_lp_reg"], out, [*SMALL, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    proc, stdout, stderr = compare(out)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return out, stdout, proc


def test_both_arms_ran_and_left_no_process(finished):
    out, stdout, proc = finished
    assert "2 run(s) done now, 0 finished earlier" in stdout
    assert not session_pids(proc.pid)
    for arm in ("laptop_grpo", "laptop_lp_reg"):
        records = [json.loads(line) for line in (out / "runs" / arm / "seed0" / "metrics.jsonl").open()]
        assert [r["step"] for r in records] == [1, 2, 3]
        for record in records:  # the sampled-token probability buckets cover every token
            assert sum(record[k] for k in PROB_BUCKET_KEYS) == pytest.approx(1.0)
        assert (out / "runs" / arm / "seed0" / "compare_run.json").is_file()
    lp_reg_run = out / "runs" / "laptop_lp_reg" / "seed0"
    lp_reg = [json.loads(line) for line in (lp_reg_run / "metrics.jsonl").open()]
    # A random model's answers are full of unfiltered low-probability tokens: rho 5% acts.
    counts = [r["lp_reg/regularized_tokens"] for r in lp_reg]
    assert all(c == int(c) for c in counts) and sum(counts) > 0


def test_summary_report_and_plots(finished):
    out, stdout, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"laptop_grpo", "laptop_lp_reg"} and summary["missing_runs"] == []
    for name, arm in summary["arms"].items():
        run = arm["per_seed"]["0"]
        assert 0.0 <= run["final_accuracy"] <= 1.0 and run["initial_accuracy"] is not None
        assert run["entropy@1"] > 0 and run["wall_s"] > 0
        assert arm["mean_std"]["entropy@1"]["mean"] == pytest.approx(run["entropy@1"])
        assert (run["regularized_tokens"] is None) == (name == "laptop_grpo")
    report = (out / "report.md").read_text()
    assert "| laptop_grpo |" in report and "| laptop_lp_reg |" in report
    for name in ("entropy", "accuracy", "reward", "low_prob_mass", "regularized_frac", "sampled_prob"):
        plot = out / "plots" / f"{name}.png"
        assert plot.read_bytes().startswith(PNG_MAGIC), name
        assert f"(plots/{name}.png)" in report
        assert str(plot) in stdout


def test_a_second_call_redoes_nothing_and_other_settings_are_refused(finished):
    out, _, _ = finished
    runs = out / "runs"
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    logs = {p: p.read_text() for p in (out / "logs").iterdir()}
    proc, stdout, stderr = compare(out)
    assert proc.returncode == 0, stderr[-3000:]
    assert "0 run(s) done now, 2 finished earlier" in stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before
    assert {p: p.read_text() for p in (out / "logs").iterdir()} == logs
    assert (out / "report.md").is_file()

    proc, stdout, stderr = compare(out, ["learner.lr=1e-3"])
    assert proc.returncode == 2
    assert "other settings" in stderr and len(stderr.strip().splitlines()) == 1
