"""``lpreg compare`` of the spark comparison's GRPO and Lp-Reg arms, a few steps each on two
learner ranks: the token-watch metrics of every step, Lp-Reg's counts of the watched tokens
it regularised (added up over micro-batches and ranks), and the report's paired differences
and watch plot."""

import json
import math

import pytest
from harness import run_compare, session_pids

from launch.experiments.spark_probe import PROBE_DEFINITIONS, PROBE_FILE
from launch.training.checkpoint import CHECKPOINT_DIR, HF_DIR, step_dir_name
from launch.training.watch import WATCH_HIST_EDGES

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARMS = ("spark_grpo", "spark_lp_reg")
WATCHED = ("W", "#")  # base/spark.yaml's trainer.watch_tokens
STEPS, HIST_EVERY, RHO = 3, 2, 0.5
SMALL = [f"trainer.total_steps={STEPS}", "rollout.num_workers=1", "learner.num_workers=2",
         "data.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.micro_batch_size=2",
         "data.num_synthetic_eval=20", f"trainer.watch_hist_every={HIST_EVERY}",
         # A random tiny model samples each of its ~100 characters about 1% of the time, so W
         # and # come up a dozen or more times a step without a warm start, which takes
         # minutes. Scored by digit share, every group has rewards that differ, so Lp-Reg has
         # negative answers to act on.
         "model.tiny.warm_start_steps=0", "verifier.reward_fn=toy_rewards:digit_share",
         "verifier.truncated_reward=null",
         # At the recipe's 5% Lp-Reg regularises a dozen tokens a step here and W or # is
         # seldom one of them: the counts of the watched ones would all be 0.
         f"algorithm.lp_reg_neg_frac={RHO}",
         # The last checkpoint is what the decision-position probe reads.
         f"trainer.save_every={STEPS}"]


def read_records(out, arm):
    path = out / "runs" / arm / "seed0" / "metrics.jsonl"
    return [json.loads(line) for line in path.open()]


def response_tokens(record):
    # No tool calls on this task: every response token is the policy's own.
    return record["response_length/mean"] * record["rollout/num_samples"]


def whole(value):
    assert value == pytest.approx(round(value), abs=1e-6), value
    return round(value)


def sampled_count(record, string):
    """How many times the string's token was sampled in the step, from its share."""
    return whole(record[f"watch/{string}/sampled_frac"] * response_tokens(record))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("spark_compare") / "out"
    proc, stdout, stderr = run_compare(ARMS, out, SMALL)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return out, stdout, proc


def test_both_arms_finished(finished):
    out, stdout, proc = finished
    assert "2 run(s) done now, 0 finished earlier" in stdout
    assert not session_pids(proc.pid)
    for arm in ARMS:
        assert [r["step"] for r in read_records(out, arm)] == list(range(1, STEPS + 1))
        assert (out / "runs" / arm / "seed0" / "compare_run.json").is_file()


def test_sampled_share_probability_and_histogram(finished):
    out, _, _ = finished
    for arm in ARMS:
        for record in read_records(out, arm):
            step = record["step"]
            for string in WATCHED:
                frac = record[f"watch/{string}/sampled_frac"]
                assert 0.0 <= frac <= 1.0
                count = sampled_count(record, string)
                prob = record.get(f"watch/{string}/sampled_prob")
                assert (prob is not None) == (count > 0), (arm, step, string)
                if prob is not None:
                    assert 0.0 < prob <= 1.0
                hist = record.get(f"watch/{string}/prob_hist")
                if step % HIST_EVERY:
                    assert hist is None, (arm, step, string)
                    continue
                # Every sampled occurrence falls in exactly one bin, and the mean it was
                # sampled at lies between the edges of the bins that hold them.
                assert len(hist) == len(WATCH_HIST_EDGES) + 1
                assert sum(hist) == count, (arm, step, string, hist)
                lower = (0.0, *WATCH_HIST_EDGES)
                upper = (*WATCH_HIST_EDGES, 1.0)
                if count:
                    total = prob * count
                    assert sum(n * lo for n, lo in zip(hist, lower, strict=True)) <= total + 1e-9
                    assert total <= sum(n * hi for n, hi in zip(hist, upper, strict=True)) + 1e-9
        # The random model does sample the watched tokens: otherwise the checks above hold
        # for nothing.
        assert all(sampled_count(r, s) > 0 for r in read_records(out, arm) for s in WATCHED), arm


def test_only_lp_reg_regularises(finished):
    out, _, _ = finished
    for record in read_records(out, "spark_grpo"):
        assert not [k for k in record if k.startswith("lp_reg/") or k.endswith(("/regularized_tokens",
                                                                                  "/regularized_frac"))]
    for record in read_records(out, "spark_lp_reg"):
        for key in ("lp_reg/regularized_tokens", "lp_reg/threshold", "lp_reg/selected_kept_frac",
                    "lp_reg/filtered_mass", "lp_reg/protection_ratio"):
            assert key in record, key


def test_watched_counts_among_the_regularised(finished):
    out, _, _ = finished
    records = read_records(out, "spark_lp_reg")
    watched_total = 0
    for record in records:
        regularized = whole(record["lp_reg/regularized_tokens"])
        selected = whole(record["lp_reg/selected_tokens"])
        assert 0 < regularized <= selected <= response_tokens(record)
        assert record["lp_reg/selected_kept_frac"] == pytest.approx(
            record["lp_reg/selected_kept_tokens"] / selected)
        for string in WATCHED:
            mine = whole(record[f"watch/{string}/regularized_tokens"])
            # One epoch: each sampled token is in one micro-batch of one rank, once.
            assert mine <= min(regularized, sampled_count(record, string))
            assert record[f"watch/{string}/regularized_frac"] == pytest.approx(mine / regularized)
            watched_total += mine
    assert watched_total > 0  # else the relations above were tested on zeros only

    # The counts add up over ranks and micro-batches, while lp_reg/selected_frac and
    # lp_reg/regularized_frac are means of each micro-batch's share: over the run the count
    # per response token is near that mean. Counts averaged over the two ranks would be half
    # of it, counts that every rank reports for the whole batch twice.
    tokens = sum(response_tokens(r) for r in records)
    for count, share in (("selected_tokens", "selected_frac"), ("regularized_tokens", "regularized_frac")):
        per_token = sum(r[f"lp_reg/{count}"] for r in records) / tokens
        mean = sum(r[f"lp_reg/{share}"] for r in records) / len(records)
        assert 0.7 < per_token / mean < 1.4, (count, per_token, mean)


def test_summary_report_and_plots(finished):
    out, stdout, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == set(ARMS) and summary["missing_runs"] == []
    assert summary["baseline"] == "spark_grpo"
    runs = {arm: summary["arms"][arm]["per_seed"]["0"] for arm in ARMS}
    assert runs["spark_grpo"]["regularized_tokens"] is None
    lp_reg = read_records(out, "spark_lp_reg")
    assert runs["spark_lp_reg"]["regularized_tokens"] == sum(r["lp_reg/regularized_tokens"] for r in lp_reg)

    paired = summary["paired_differences"]
    assert set(paired) == {"spark_lp_reg"}
    for key in ("best_accuracy", "final_accuracy", "final_reward"):
        difference = paired["spark_lp_reg"][key]
        assert difference["seeds"] == [0] and difference["n"] == 1
        expected = runs["spark_lp_reg"][key] - runs["spark_grpo"][key]
        assert math.isclose(difference["per_seed"]["0"], expected, abs_tol=1e-12), key
        assert difference["favour_arm"] + difference["favour_baseline"] + difference["ties"] == 1

    report = (out / "report.md").read_text()
    assert "## Against the baseline, spark_grpo" in report
    assert "| spark_lp_reg | reward end |" in report
    assert "| spark_grpo |" in report and "| spark_lp_reg |" in report
    plot = out / "plots" / "watch.png"
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert "(plots/watch.png)" in report and str(plot) in stdout


def test_the_decision_position_is_probed_before_and_after(finished):
    out, _, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    runs = {arm: summary["arms"][arm]["per_seed"]["0"] for arm in ARMS}
    for arm, run in runs.items():
        for key in PROBE_DEFINITIONS:
            for stage in ("start", "end"):
                value = run[f"{key}@{stage}"]
                assert value is not None and math.isfinite(value) and value >= 0, (arm, key, stage)
        saved = json.loads((out / "runs" / arm / "seed0" / PROBE_FILE).read_text())
        assert saved["final_model"].endswith(f"{CHECKPOINT_DIR}/{step_dir_name(STEPS)}/{HF_DIR}")
        assert saved["values"] == {k: v for k, v in run.items() if k.split("@")[0] in PROBE_DEFINITIONS}
    # Both arms start from the one random model, which spreads its probability almost evenly
    # over its ~100 symbols: W gets about 1/100 just after a first answer.
    start = runs["spark_grpo"]["decision_spark_prob@start"]
    assert start == runs["spark_lp_reg"]["decision_spark_prob@start"] and 0.003 < start < 0.03
    assert runs["spark_grpo"]["decision_entropy@start"] > 3.5
    report = (out / "report.md").read_text()
    assert "## The decision position" in report
    assert "| spark_lp_reg | end |" in report and "| spark_grpo | start |" in report
    assert "`decision_entropy@end`" in report
