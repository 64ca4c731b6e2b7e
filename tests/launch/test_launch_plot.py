"""``lpreg plot`` on synthetic run directories."""

import json
import math

import pytest

from launch.cli.main import main
from launch.reporting.plot import (
    FIGURES,
    load_run,
    plot_runs,
    run_names,
    shares,
    spread_steps,
    watched_strings,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps=6, lp_reg=True, eval_every=3, resumed_from=None):
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "reward/mean": 0.1 * step, "actor/entropy": 1.0 / step,
                  "response_length/mean": 10.0 + step, "response_length/clip_ratio": 0.1,
                  "timing/step_s": 2.0, "timing/rollout_s": 1.2, "timing/update_s": 0.6,
                  "timing/weight_sync_s": 0.2, "rollout/requests_per_worker": [4, 4],
                  "data/prompt_ids_hash": "abc", "reward/nan": math.nan,
                  "sampled_prob/below_0.01": 0.02 / step, "sampled_prob/above_0.9": 0.5}
        if lp_reg:
            record["lp_reg/regularized_frac"] = 0.01 * step
        if step % eval_every == 0:
            record["eval/accuracy"] = 0.05 * step
        records.append(record)
    if resumed_from is not None:  # the steps a resumed run did again come later in the file
        records += [{**r, "reward/mean": -1.0} for r in records[resumed_from:]]
    with (run_dir / "metrics.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.write('{"step": 99, "reward/me')  # a line cut short by a kill
    (run_dir / "eval.jsonl").write_text(
        json.dumps({"step": 0, "eval/accuracy": 0.0}) + "\n"
        + json.dumps({"step": 3, "eval/accuracy": 0.15}) + "\n"
        + json.dumps({"step": 6, "eval/accuracy": 0.9, "source": "lpreg eval"}) + "\n")
    return run_dir


def test_two_runs_share_each_figure(tmp_path):
    lp = write_run(tmp_path / "lp_reg")
    grpo = write_run(tmp_path / "grpo", lp_reg=False)  # GRPO logs no lp_reg/* metrics
    written = plot_runs([lp, grpo], tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted(f"{stem}.png" for stem, _, _ in FIGURES)
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_figures_without_any_data_are_skipped(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    written = plot_runs([run], tmp_path / "out")
    assert [p.name for p in written] == ["reward.png"]


def test_series_take_the_last_record_of_each_step_and_skip_non_numbers(tmp_path):
    run = load_run(write_run(tmp_path / "r", resumed_from=4))
    steps, values = run.series["reward/mean"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert values[-2:] == [-1.0, -1.0]
    assert "reward/nan" not in run.series and "rollout/requests_per_worker" not in run.series
    # Step 0 comes from eval.jsonl; the stand-alone evaluation is not on the curve.
    assert run.series["eval/accuracy"] == ([0, 3, 6], [0.0, pytest.approx(0.15), pytest.approx(0.3)])


def test_same_named_runs_are_told_apart(tmp_path):
    a, b = tmp_path / "x" / "demo", tmp_path / "y" / "demo"
    assert run_names([a, b]) == ["x/demo", "y/demo"]
    assert run_names([a, tmp_path / "other"]) == ["demo", "other"]


def test_cli_writes_pngs_and_names_a_missing_run(tmp_path, capsys):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(FIGURES) and all(p.endswith(".png") for p in printed)
    assert main(["plot", str(a)]) == 0
    assert (a / "plots" / "reward.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_restarts_are_found_where_the_count_goes_up(tmp_path):
    from launch.reporting.plot import restart_steps

    run_dir = tmp_path / "healed"
    run_dir.mkdir()
    counts = [0, 0, 1, 1, 1, 2]
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "rollout/restarts": c, "learner/restarts": int(s >= 4),
                    "timing/step_s": 1.0}) + "\n" for s, c in enumerate(counts, start=1)))
    run = load_run(run_dir)
    assert restart_steps(run, "rollout/restarts") == [3, 6]
    assert restart_steps(run, "learner/restarts") == [4]
    assert (tmp_path / "plots" / "timing.png") in plot_runs([run_dir], tmp_path / "plots")


def write_watch_run(run_dir, hist_every=2, steps=6):
    """A run that watched "wait" and "a/b" (a string may hold a slash); histograms of "wait"
    every ``hist_every`` steps, and at step 2 it was not sampled at all."""
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as handle:
        for step in range(1, steps + 1):
            record = {"step": step, "reward/mean": 0.1, "watch/wait/sampled_frac": 0.01 * step,
                      "watch/a/b/sampled_frac": 0.0}
            if step != 2:
                record["watch/wait/sampled_prob"] = 0.1 * step
            if step % hist_every == 0:
                record["watch/wait/prob_hist"] = [0] * 11 if step == 2 else [step, 1] + [0] * 9
            handle.write(json.dumps(record) + "\n")
    return run_dir


def test_watched_tokens_are_drawn_over_steps_and_as_histograms(tmp_path):
    run = load_run(write_watch_run(tmp_path / "spark"))
    assert watched_strings([run]) == ["wait", "a/b"]
    assert sorted(run.histograms["watch/wait/prob_hist"]) == [2, 4, 6]
    assert run.histograms["watch/wait/prob_hist"][4][:2] == [4.0, 1.0]
    written = plot_runs([tmp_path / "spark"], tmp_path / "plots")
    names = [p.name for p in written]
    assert "watch.png" in names and "watch_hist.png" in names
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
    # Two runs, one of them without histograms: the curves of both, the histograms of one.
    bare = write_watch_run(tmp_path / "bare", hist_every=100)
    written = plot_runs([tmp_path / "spark", bare], tmp_path / "two")
    assert {"watch.png", "watch_hist.png"} <= {p.name for p in written}


def test_histogram_steps_and_shares():
    assert spread_steps([10, 20, 30, 40, 50]) == [10, 30, 50]
    assert spread_steps([10, 20, 30, 40]) == [10, 30, 40]
    assert spread_steps([10, 20]) == [10, 20]
    assert shares([1, 3, 0]) == [0.25, 0.75, 0.0]
    assert shares([0, 0]) is None


def test_runs_without_watched_tokens_get_no_watch_figure(tmp_path):
    written = plot_runs([write_run(tmp_path / "r")], tmp_path / "plots")
    assert not {"watch.png", "watch_hist.png"} & {p.name for p in written}
