"""``lpreg compare``'s planning, summaries and report, on synthetic run directories."""

import json
import math
import statistics
from types import SimpleNamespace

import pytest

from conf.errors import ConfigError
from launch.cli.main import main
from launch.experiments.compare import DONE_FILE, _mark_finished, plan_runs, train_command
from launch.experiments.report import plot_bands, write_report, write_summary
from launch.experiments.summary import (
    Spread,
    aggregate,
    band,
    histogram_mean,
    paired_difference,
    smooth,
    summarize_run,
)
from launch.models.bootstrap import tiny_model_dir
from launch.reporting.plot import load_run
from launch.training.step_metrics import (
    LOW_PROB_MASS_KEY,
    PROB_BUCKET_KEYS,
    average_learner_metrics,
    probability_buckets,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps=40, entropy_end=0.1, lp_reg=False, eval_every=10, acc_shift=0.0,
              watch_hist=None):
    """A run whose entropy falls linearly from 0.5 to ``entropy_end``; with ``watch_hist``
    (step -> counts), the string "W" is watched and those histograms logged."""
    run_dir.mkdir(parents=True)
    evals = [{"step": 0, "eval/accuracy": 0.2}]
    with (run_dir / "metrics.jsonl").open("w") as handle:
        for step in range(1, steps + 1):
            record = {"step": step, "reward/mean": step / steps,
                      "actor/entropy": 0.5 + (entropy_end - 0.5) * step / steps,
                      LOW_PROB_MASS_KEY: 0.1, "sampled_prob/below_0.01": 0.01,
                      "sampled_prob/above_0.9": 0.6}
            if lp_reg:
                record["lp_reg/regularized_frac"] = 0.002
                record["lp_reg/regularized_tokens"] = 3.0
            if watch_hist is not None:
                record["watch/W/sampled_frac"] = 0.01
                record["watch/W/sampled_prob"] = 0.2 + step / 100
                if step in watch_hist:
                    record["watch/W/prob_hist"] = watch_hist[step]
            if step % eval_every == 0:
                record["eval/accuracy"] = 0.2 + 0.01 * step + acc_shift
                evals.append({"step": step, "eval/accuracy": record["eval/accuracy"]})
            handle.write(json.dumps(record) + "\n")
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run_dir


def test_summary_reads_windows_evaluations_and_counts(tmp_path):
    run = load_run(write_run(tmp_path / "r", steps=40, lp_reg=True))
    summary = summarize_run(run, total_steps=40, wall_s=12.5)
    # 5% of 40 steps: windows of 2 steps.
    entropy = {s: 0.5 - 0.4 * s / 40 for s in range(1, 41)}
    assert summary["entropy@start"] == pytest.approx((entropy[1] + entropy[2]) / 2)
    assert summary["entropy@0.5"] == pytest.approx((entropy[19] + entropy[20]) / 2)
    assert summary["entropy@1"] == pytest.approx((entropy[39] + entropy[40]) / 2)
    assert summary["initial_accuracy"] == pytest.approx(0.2)
    assert summary["final_accuracy"] == pytest.approx(0.6)
    assert summary["best_accuracy"] == pytest.approx(0.6)
    assert summary["final_reward"] == pytest.approx((39 + 40) / 80)
    assert summary["low_prob_mass"] == pytest.approx(0.1)
    assert summary["regularized_frac"] == pytest.approx(0.002)
    assert summary["regularized_tokens"] == 120
    assert summary["wall_s"] == 12.5


def test_a_run_without_lp_reg_metrics_reports_none_not_zero(tmp_path):
    summary = summarize_run(load_run(write_run(tmp_path / "r")), total_steps=40)
    assert summary["regularized_frac"] is None and summary["regularized_tokens"] is None


def test_aggregate_gives_mean_sample_std_and_range():
    spreads = aggregate({0: {"a": 1.0, "b": None}, 1: {"a": 3.0, "b": None}, 2: {"a": 2.0, "b": None}})
    assert spreads["a"] == Spread(mean=2.0, std=1.0, min=1.0, max=3.0, n=3)
    assert spreads["b"] is None
    assert aggregate({0: {"a": 5.0}})["a"].std == 0.0


def test_band_is_taken_on_common_steps_after_smoothing(tmp_path):
    a = load_run(write_run(tmp_path / "a", steps=20, entropy_end=0.1))
    b = load_run(write_run(tmp_path / "b", steps=20, entropy_end=0.3))
    curve = band([a, b], "actor/entropy")
    assert curve.steps == list(range(1, 21))
    assert curve.low[-1] == pytest.approx(0.1) and curve.high[-1] == pytest.approx(0.3)
    assert curve.mean[-1] == pytest.approx(0.2)
    assert band([a, b], "eval/accuracy").steps == [0, 10, 20]
    assert band([a], "no/such_metric") is None
    assert smooth([1, 2, 3], [1.0, 2.0, 6.0], 2) == ([1, 2, 3], [1.0, 1.5, 4.0])


def test_probability_buckets_split_tokens_by_the_probability_they_were_sampled_with():
    import torch

    probs = [0.005, 0.05, 0.1, 0.3, 0.7, 0.95, 0.99, 1.0]  # 0.1 is an edge: the bucket above
    shares = probability_buckets(torch.tensor([math.log(p) for p in probs], dtype=torch.float64))
    assert [shares[k] for k in PROB_BUCKET_KEYS] == [1 / 8, 1 / 8, 2 / 8, 1 / 8, 3 / 8]
    assert probability_buckets(torch.zeros(0))[LOW_PROB_MASS_KEY] == 0.0
    assert shares[LOW_PROB_MASS_KEY] == 2 / 8
    assert sum(shares[k] for k in PROB_BUCKET_KEYS) == pytest.approx(1.0)


def test_learner_ranks_token_counts_add_up_and_fractions_average():
    ranks = [SimpleNamespace(metrics={"lp_reg/regularized_tokens": 3.0, "lp_reg/regularized_frac": 0.1}),
             SimpleNamespace(metrics={"lp_reg/regularized_tokens": 5.0, "lp_reg/regularized_frac": 0.3})]
    combined = average_learner_metrics(ranks)
    assert combined["lp_reg/regularized_tokens"] == 8.0
    assert combined["lp_reg/regularized_frac"] == pytest.approx(0.2)


def test_model_seed_gives_every_run_one_model_and_leaves_the_run_seeds_alone(tmp_path):
    planned = plan_runs(["grpo_on_policy", "lp_reg_on_policy"], [0, 7], tmp_path, [], model_seed=3)
    assert {r.cfg.model.tiny.seed for r in planned} == {3}
    assert [(r.cfg.trainer.seed, r.cfg.data.synthetic.seed) for r in planned] == [(0, 0), (7, 7)] * 2
    assert len({tiny_model_dir("m", r.cfg.model.tiny, r.cfg.data.synthetic) for r in planned}) == 1
    # A comparison with its own models is a different comparison: its finished runs do not count.
    own = plan_runs(["grpo_on_policy"], [0], tmp_path, [])[0]
    assert own.cfg.model.tiny.seed == 0 and own.config_digest != planned[0].config_digest


def test_plan_sets_seeds_and_run_directories_and_checks_every_config(tmp_path):
    planned = plan_runs(["grpo_on_policy", "lp_reg_on_policy"], [0, 7], tmp_path, ["trainer.total_steps=5"])
    assert [(r.arm, r.seed) for r in planned] == [("grpo_on_policy", 0), ("grpo_on_policy", 7),
                                                  ("lp_reg_on_policy", 0), ("lp_reg_on_policy", 7)]
    run = planned[1]
    assert (run.cfg.trainer.seed, run.cfg.model.tiny.seed, run.cfg.data.synthetic.seed) == (7, 7, 7)
    assert run.cfg.trainer.total_steps == 5 and run.cfg.algorithm.loss == "ppo_clip"
    assert run.run_dir == tmp_path.resolve() / "runs" / "grpo_on_policy" / "seed7"
    assert planned[2].cfg.algorithm.loss == "lp_reg"
    assert planned[0].config_digest != planned[1].config_digest
    command = train_command(run, resume=True)
    assert command[-1] == "trainer.resume=auto" and "trainer.seed=7" in command


@pytest.mark.parametrize(("recipes", "seeds", "overrides", "message"), [
    (["grpo_on_policy"], [0], ["trainer.seed=3"], "trainer.seed"),
    (["grpo_on_policy"], [0], ["trainer.output_dir=/x"], "trainer.output_dir"),
    (["grpo_on_policy", "grpo_on_policy"], [0], [], "share the name"),
    (["grpo_on_policy"], [0, 0], [], "each seed once"),
    (["grpo_on_policy"], [], [], "at least one seed"),
    ([], [0], [], "at least one -c"),
    (["grpo_on_policy"], [0], ["algorithm.loss=nope"], "algorithm.loss"),
])
def test_plan_refuses_what_would_spoil_the_comparison(tmp_path, recipes, seeds, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_runs(recipes, seeds, tmp_path, overrides)
    assert not (tmp_path / "runs").exists()


def test_a_finished_run_is_recognised_only_with_the_same_settings(tmp_path):
    run = plan_runs(["grpo_on_policy"], [0], tmp_path, ["trainer.total_steps=5"])[0]
    assert run.finished() is None
    run.run_dir.mkdir(parents=True)
    _mark_finished(run, 42.0, tmp_path / "log")
    assert run.finished()["wall_s"] == 42.0
    assert json.loads((run.run_dir / DONE_FILE).read_text())["seed"] == 0
    changed = plan_runs(["grpo_on_policy"], [0], tmp_path, ["trainer.total_steps=6"])[0]
    with pytest.raises(ConfigError, match="other settings"):
        changed.finished()


def test_report_tables_and_band_plots(tmp_path):
    runs = {"grpo": [load_run(write_run(tmp_path / "g0", entropy_end=0.05)),
                     load_run(write_run(tmp_path / "g1", entropy_end=0.07))],
            "lp_reg": [load_run(write_run(tmp_path / "l0", entropy_end=0.3, lp_reg=True)),
                       load_run(write_run(tmp_path / "l1", entropy_end=0.32, lp_reg=True))]}
    arms = {name: {"recipe": f"{name}.yaml",
                   "per_seed": {i: summarize_run(r, 40, 10.0) for i, r in enumerate(series)}}
            for name, series in runs.items()}
    summary = write_summary(tmp_path / "summary.json", arms, [0, 1], ["trainer.total_steps=40"], [])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    grpo = summary["arms"]["grpo"]["mean_std"]
    ends = [statistics.fmean(0.5 + (end - 0.5) * s / 40 for s in (39, 40)) for end in (0.05, 0.07)]
    assert grpo["entropy@1"]["mean"] == pytest.approx(statistics.fmean(ends))
    assert grpo["entropy@1"]["std"] == pytest.approx(statistics.stdev(ends))
    assert grpo["regularized_frac"] is None
    assert summary["arms"]["lp_reg"]["mean_std"]["regularized_frac"]["mean"] == pytest.approx(0.002)
    plots = plot_bands(runs, tmp_path / "plots", total_steps=40)
    names = {p.name for p in plots}
    assert {"entropy.png", "accuracy.png", "reward.png", "low_prob_mass.png", "regularized_frac.png",
            "regularized_tokens.png", "sampled_prob.png"} == names
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)
    write_report(tmp_path / "report.md", summary, plots, "lpreg compare -c a -c b")
    report = (tmp_path / "report.md").read_text()
    assert "| grpo |" in report and "| lp_reg | 1 |" in report
    assert "![entropy](plots/entropy.png)" in report and "`lpreg compare -c a -c b`" in report
    assert "60.0 ± 0.0" in report  # final accuracy of both seeds, in percent


def test_cli_refuses_bad_seeds_and_parallel_with_one_line(capsys, tmp_path):
    assert main(["compare", "-c", "grpo_on_policy", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["compare", "-c", "grpo_on_policy", "--parallel", "0", "--out", str(tmp_path)]) == 2
    assert "--parallel" in capsys.readouterr().err


def test_report_only_summarises_the_finished_runs_and_names_the_rest(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "-c", "grpo_on_policy", "-c", "lp_reg_on_policy", "--seeds", "0,1",
            "--out", str(out), "trainer.total_steps=40", "--report-only"]
    for run in plan_runs(["grpo_on_policy", "lp_reg_on_policy"], [0, 1], out, ["trainer.total_steps=40"]):
        if (run.arm, run.seed) != ("lp_reg_on_policy", 1):  # that one never finished
            write_run(run.run_dir, lp_reg=run.arm.startswith("lp_reg"))
            _mark_finished(run, 30.0, out / "logs" / "x.log")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 run(s) done now, 3 finished earlier, 1 not finished" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_runs"] == ["lp_reg_on_policy seed 1"]
    assert summary["arms"]["grpo_on_policy"]["mean_std"]["final_accuracy"]["n"] == 2
    assert summary["arms"]["lp_reg_on_policy"]["mean_std"]["final_accuracy"]["n"] == 1
    assert "**Not finished:** lp_reg_on_policy seed 1" in (out / "report.md").read_text()
    assert not (out / "runs" / "lp_reg_on_policy" / "seed1").exists()


def test_paired_difference_by_hand():
    diff = paired_difference({0: 50.0, 1: 60.0, 2: 70.0}, {0: 55.0, 1: 58.0, 2: 80.0})
    assert diff.seeds == [0, 1, 2] and diff.differences == [5.0, -2.0, 10.0]
    assert diff.mean == pytest.approx(13 / 3)
    assert diff.std == pytest.approx(statistics.stdev([5, -2, 10]))  # 6.03
    assert diff.sem == pytest.approx(statistics.stdev([5, -2, 10]) / math.sqrt(3))  # 3.48
    assert (diff.favour_arm, diff.favour_baseline, diff.ties) == (2, 1, 0)


def test_paired_difference_uses_only_the_seeds_both_arms_have():
    # Seed 3 only in the baseline, seed 4 only in the arm, seed 2 without a value, seed 1 tied.
    diff = paired_difference({0: 0.5, 1: 0.6, 2: None, 3: 0.9}, {0: 0.4, 1: 0.6, 2: 0.7, 4: 0.1})
    assert diff.seeds == [0, 1] and diff.n == 2
    assert (diff.favour_arm, diff.favour_baseline, diff.ties) == (0, 1, 1)
    one = paired_difference({0: 0.5}, {0: 0.7, 1: 0.2})
    assert one.mean == pytest.approx(0.2) and one.std is None and one.sem is None
    assert paired_difference({0: 0.5}, {1: 0.5}) is None


def test_histograms_are_read_and_averaged_over_seeds_at_the_last_common_step(tmp_path):
    a = load_run(write_run(tmp_path / "a", watch_hist={10: [9, 0, 1], 20: [2, 2, 0], 30: [1, 1, 1]}))
    b = load_run(write_run(tmp_path / "b", watch_hist={10: [0, 0, 5], 20: [0, 1, 3]}))
    c = load_run(write_run(tmp_path / "c", watch_hist={20: [0, 0, 0]}))  # not sampled at step 20
    assert a.histograms["watch/W/prob_hist"][20] == [2.0, 2.0, 0.0]
    assert "watch/W/prob_hist" not in a.series
    mean = histogram_mean([a, b, c], "watch/W/prob_hist")
    # Step 20: shares [0.5, 0.5, 0] and [0, 0.25, 0.75]; c sampled nothing and has no shares.
    assert mean.step == 20 and (mean.seeds, mean.sampled_seeds) == (3, 2)
    assert mean.share == pytest.approx([0.25, 0.375, 0.375])
    assert mean.low == pytest.approx([0.0, 0.25, 0.0]) and mean.high == pytest.approx([0.5, 0.5, 0.75])
    assert mean.mean_count == pytest.approx((4 + 4 + 0) / 3)
    assert histogram_mean([a], "watch/W/prob_hist").step == 30
    assert histogram_mean([a], "watch/X/prob_hist") is None


def test_report_sets_each_arm_against_the_baseline_seed_by_seed(tmp_path):
    shifts = {"grpo": [0.0, 0.1, 0.2], "lp_reg": [0.05, 0.08, 0.3]}  # diffs +5, -2, +10 points
    arms = {name: {"recipe": f"{name}.yaml", "per_seed": {
        seed: summarize_run(load_run(write_run(tmp_path / f"{name}{seed}", acc_shift=shift)), 40)
        for seed, shift in enumerate(seeds)}} for name, seeds in shifts.items()}
    summary = write_summary(tmp_path / "summary.json", arms, [0, 1, 2], [], [], baseline="grpo")
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["baseline"] == "grpo" and set(stored["paired_differences"]) == {"lp_reg"}
    final = stored["paired_differences"]["lp_reg"]["final_accuracy"]
    assert final["differences"] == pytest.approx([0.05, -0.02, 0.1])
    assert final["mean"] == pytest.approx(0.13 / 3) and final["n"] == 3
    assert (final["favour_arm"], final["favour_baseline"], final["ties"]) == (2, 1, 0)
    assert final["per_seed"]["1"] == pytest.approx(-0.02)
    assert stored["paired_differences"]["lp_reg"]["final_reward"]["ties"] == 3
    write_report(tmp_path / "report.md", summary, [], "lpreg compare")
    report = (tmp_path / "report.md").read_text()
    assert "## Against the baseline, grpo" in report
    assert "| lp_reg | acc. end | 3 | +4.3 pp | 6.0 | 3.5 | 2 / 1 / 0 |" in report
    from launch.experiments.report import paired_text

    lines = paired_text(summary)
    assert "against grpo" in lines[0] and any("+4.3 pp" in line and "2 / 1 / 0" in line for line in lines)


def test_watched_tokens_get_a_comparison_figure(tmp_path):
    hist = {20: [1, 3], 40: [2, 2]}
    runs = {"grpo": [load_run(write_run(tmp_path / "g0", watch_hist=hist))],
            "lp_reg": [load_run(write_run(tmp_path / "l0", watch_hist=hist)),
                       load_run(write_run(tmp_path / "l1", watch_hist={40: [0, 4]}))]}
    plots = plot_bands(runs, tmp_path / "plots", total_steps=40)
    watch = tmp_path / "plots" / "watch.png"
    assert watch in plots and watch.read_bytes().startswith(PNG_MAGIC)
    # Without histograms the curves are still drawn.
    plain = {"grpo": [load_run(write_run(tmp_path / "p0", watch_hist={}))]}
    assert (tmp_path / "p" / "watch.png") in plot_bands(plain, tmp_path / "p", total_steps=40)


def test_arms_may_have_seeds_of_their_own_and_another_baseline(tmp_path, capsys):
    out = tmp_path / "cmp"
    seeds_for = {"lp_reg_on_policy": [0]}
    planned = plan_runs(["grpo_on_policy", "lp_reg_on_policy"], [0, 1, 2], out, ["trainer.total_steps=40"],
                        seeds_for)
    assert [(r.arm, r.seed) for r in planned] == [("grpo_on_policy", 0), ("grpo_on_policy", 1),
                                                  ("grpo_on_policy", 2), ("lp_reg_on_policy", 0)]
    for run in planned:
        write_run(run.run_dir, lp_reg=run.arm.startswith("lp_reg"), acc_shift=0.01 * run.seed)
        _mark_finished(run, 30.0, out / "logs" / "x.log")
    argv = ["compare", "-c", "grpo_on_policy", "-c", "lp_reg_on_policy", "--seeds", "0,1,2",
            "--seeds-for", "lp_reg_on_policy=0", "--baseline", "lp_reg_on_policy", "--out", str(out),
            "trainer.total_steps=40", "--report-only"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 run(s) done now, 4 finished earlier" in printed and "not finished" not in printed
    assert "paired differences against lp_reg_on_policy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["lp_reg_on_policy"]["seeds"] == [0] and summary["seeds"] == [0, 1, 2]
    assert summary["paired_differences"]["grpo_on_policy"]["best_accuracy"]["seeds"] == [0]
    report = (out / "report.md").read_text()
    assert "Seeds: grpo_on_policy 0, 1, 2; lp_reg_on_policy 0." in report
    # A later command that names one arm only reports it, and says what it left out.
    assert main(["compare", "-c", "lp_reg_on_policy", "--seeds", "0", "--out", str(out),
                 "trainer.total_steps=40", "--report-only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == ["lp_reg_on_policy"] and summary["arms_left_out"] == ["grpo_on_policy"]
    assert "**Not in this report:** grpo_on_policy" in (out / "report.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--seeds-for", "nope=0"], "no -c recipe is named so"),
    (["--seeds-for", "grpo_on_policy"], "ARM=SEEDS"),
    (["--seeds-for", "grpo_on_policy=0,0"], "each seed once"),
    (["--seeds-for", "grpo_on_policy=0", "--seeds-for", "grpo_on_policy=1"], "twice"),
    (["--baseline", "nope"], "--baseline nope"),
])
def test_cli_refuses_bad_seeds_for_and_baseline(tmp_path, capsys, extra, message):
    argv = ["compare", "-c", "grpo_on_policy", "--out", str(tmp_path), "--report-only", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


FAKE_TRAIN = """
import json, pathlib, sys
run_dir, code = pathlib.Path(sys.argv[1]), int(sys.argv[2])
run_dir.mkdir(parents=True, exist_ok=True)
with (run_dir / "metrics.jsonl").open("a") as handle:
    for step in (1, 2):
        handle.write(json.dumps({"step": step, "actor/entropy": 0.3, "reward/mean": 0.5}) + "\\n")
(run_dir / "argv.json").write_text(json.dumps(sys.argv[3:]))
sys.exit(code)
"""


@pytest.fixture
def fake_train(monkeypatch):
    """``lpreg train`` replaced by a script that writes two steps and exits with the code
    chosen per arm, so that the bookkeeping around the runs is tested without a stack."""
    import sys

    from launch.experiments import compare

    codes = {}

    def command(run, resume):
        argv = [sys.executable, "-c", FAKE_TRAIN, str(run.run_dir), str(codes.get(run.arm, 0))]
        return argv + (["trainer.resume=auto"] if resume else [])

    monkeypatch.setattr(compare, "train_command", command)
    return codes


def test_a_failed_run_is_named_the_others_finish_and_a_second_call_retries_only_it(
        tmp_path, capsys, fake_train):
    argv = ["compare", "-c", "grpo_on_policy", "-c", "lp_reg_on_policy", "--seeds", "0",
            "--out", str(tmp_path), "trainer.total_steps=2"]
    fake_train["lp_reg_on_policy"] = 3
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "1 run(s) done now, 0 finished earlier, 1 not finished" in captured.out
    assert "lp_reg_on_policy seed 0 failed, exit 3" in captured.err
    assert (tmp_path / "runs" / "grpo_on_policy" / "seed0" / DONE_FILE).is_file()
    assert not (tmp_path / "runs" / "lp_reg_on_policy" / "seed0" / DONE_FILE).exists()
    fake_train["lp_reg_on_policy"] = 0
    assert main(argv) == 0
    assert "1 run(s) done now, 1 finished earlier" in capsys.readouterr().out
    # Started over without checkpoints: metrics.jsonl holds the new run's steps only.
    lines = (tmp_path / "runs" / "lp_reg_on_policy" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_a_child_refusing_its_settings_is_told_apart(tmp_path, capsys, fake_train):
    fake_train["grpo_on_policy"] = 2
    assert main(["compare", "-c", "grpo_on_policy", "--seeds", "0", "--out", str(tmp_path)]) == 1
    assert "its settings were refused (exit 2)" in capsys.readouterr().err


def test_an_interrupted_run_with_a_checkpoint_resumes(tmp_path, monkeypatch, fake_train):
    from launch.experiments import compare

    run = plan_runs(["grpo_on_policy"], [0], tmp_path, ["trainer.total_steps=2"])[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    monkeypatch.setattr(compare, "list_checkpoints", lambda root, warn: [(1, root / "step_1")])
    outcomes = compare.execute([run], tmp_path)
    assert [o.exit_code for o in outcomes] == [0]
    assert json.loads((run.run_dir / "argv.json").read_text()) == ["trainer.resume=auto"]
    assert len((run.run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # continued, not wiped


def test_a_started_run_with_other_settings_is_refused_naming_the_key(tmp_path, fake_train):
    from launch.experiments import compare

    run = plan_runs(["grpo_on_policy"], [0], tmp_path, ["trainer.total_steps=2"])[0]
    compare.write_record(run.run_dir / compare.STARTED_FILE,
                         {"config_digest": run.config_digest, "config": run.config_text})
    assert run.finished() is None  # same settings: started, not finished, may go on
    changed = plan_runs(["grpo_on_policy"], [0], tmp_path, ["trainer.total_steps=3"])[0]
    with pytest.raises(ConfigError, match=r"trainer.total_steps: 2 -> 3"):
        changed.finished()
    moved = plan_runs(["grpo_on_policy"], [0], tmp_path / "elsewhere", ["trainer.total_steps=2"])[0]
    assert moved.config_digest == run.config_digest  # where --out lives is not a setting


def test_a_record_cut_short_counts_as_not_finished(tmp_path):
    run = plan_runs(["grpo_on_policy"], [0], tmp_path, [])[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / DONE_FILE).write_text('{"config_digest": "ab')
    assert run.finished() is None


def test_stopping_a_run_reaches_processes_in_other_groups_of_its_session(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from launch.experiments.compare import _listen_to_ctrl_c, _stop_children

    # The child starts a grandchild in a process group of its own (as Ray's workers do)
    # and then waits; Ctrl-C ends the child, and the grandchild only goes with the sweep.
    script = ("import subprocess, sys, time\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
              "                     process_group=0)\n"
              f"open({str(tmp_path / 'grandchild')!r}, 'w').write(str(g.pid))\n"
              "time.sleep(300)\n")
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                             preexec_fn=_listen_to_ctrl_c)
    marker = tmp_path / "grandchild"
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    _stop_children([child], grace_s=10)
    assert child.poll() is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as stat:  # a zombie waits for init to reap it
            if stat.read().split()[2] == "Z":
                break
        time.sleep(0.05)
    else:
        raise AssertionError("the grandchild survived")
