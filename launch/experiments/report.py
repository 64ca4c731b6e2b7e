"""The comparison's outputs: ``summary.json``, one PNG per quantity, and ``report.md``.

Each plot has one line per arm, the mean over seeds, in a band from the lowest to the
highest seed. Per-step metrics are smoothed with a trailing mean over 2% of the run
first, so that the trend reads through the noise; evaluations are plotted as they are.
Every arm but the baseline is also set against it seed by seed (``PAIRED_KEYS``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from launch.experiments.spark_probe import PROBE_PROBLEMS, probe_definitions
from launch.experiments.summary import (
    ACCURACY_KEY,
    DEFINITIONS,
    ENTROPY_FRACTIONS,
    ENTROPY_KEY,
    PAIRED_KEYS,
    REGULARIZED_FRAC_KEY,
    REGULARIZED_TOKENS_KEY,
    REWARD_KEY,
    Band,
    PairedDifference,
    aggregate,
    band,
    histogram_mean,
    paired_differences,
)
from launch.reporting.plot import (
    HIST_SUFFIX,
    RunSeries,
    draw_histograms,
    watch_key,
    watched_strings,
)
from launch.training.step_metrics import LOW_PROB_MASS_KEY, PROB_BUCKET_KEYS

# (file stem, metric, title)
BAND_PLOTS = [
    ("entropy", ENTROPY_KEY, "policy entropy on its own responses"),
    ("accuracy", ACCURACY_KEY, "held-out greedy accuracy"),
    ("reward", REWARD_KEY, "training reward (mean)"),
    ("low_prob_mass", LOW_PROB_MASS_KEY, "low-probability mass: share of sampled tokens with p < 0.1"),
    ("regularized_frac", REGULARIZED_FRAC_KEY, "share of tokens Lp-Reg acted on"),
    ("regularized_tokens", REGULARIZED_TOKENS_KEY, "tokens Lp-Reg acted on, per step"),
]
BUCKETS_STEM = "sampled_prob"
WATCH_STEM = "watch"

# Columns of the tables: (summary key, heading, scale, decimals)
TABLE_COLUMNS = [
    ("initial_accuracy", "acc. start %", 100, 1),
    ("final_accuracy", "acc. end %", 100, 1),
    ("best_accuracy", "best acc. %", 100, 1),
    ("entropy@start", "entropy start", 1, 3),
    ("entropy@0.5", "entropy 50%", 1, 3),
    ("entropy@1", "entropy end", 1, 3),
    ("final_low_prob_mass", "p<0.1 share end %", 100, 2),
    ("regularized_frac", "regularised %", 100, 3),
    ("wall_s", "wall s / run", 1, 0),
]


def write_summary(path: Path, arms: dict[str, dict], seeds: list[int], overrides: list[str],
                  missing: list[str], baseline: str | None = None,
                  arms_left_out: list[str] | None = None) -> dict:
    """``arms``: name -> {"recipe": str, "per_seed": {seed: summary}, optionally "seeds": the
    seeds planned for it}; ``baseline`` (default: the first arm) is the arm the others are
    set against seed by seed. Returns what it wrote."""
    baseline = baseline or next(iter(arms), None)
    document = {
        "seeds": seeds,
        "overrides": overrides,
        "missing_runs": missing,
        "definitions": DEFINITIONS | (probe_definitions() if _probed(arms) else {}),
        "arms": {
            name: {"recipe": arm["recipe"],
                   "seeds": list(arm.get("seeds", seeds)),
                   "per_seed": {str(seed): summary for seed, summary in arm["per_seed"].items()},
                   "mean_std": {key: asdict(spread) if spread else None
                                for key, spread in aggregate(arm["per_seed"]).items()}}
            for name, arm in arms.items()
        },
        "baseline": baseline,
        "paired_differences": {
            name: {key: _paired_record(diff) for key, diff in by_key.items()}
            for name, by_key in (paired_differences(arms, baseline) if baseline else {}).items()
        },
        "arms_left_out": arms_left_out or [],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def _probed(arms: dict[str, dict]) -> bool:
    return any("spark_frac@start" in run for arm in arms.values() for run in arm["per_seed"].values())


# The spark task's decision position, before and after RL (launch.experiments.spark_probe).
SPARK_COLUMNS = [
    ("spark_frac", "spark %", 100, 1),
    ("decision_spark_prob", "P(W)", 1, 3),
    ("decision_distractor_prob", "P(distractors)", 1, 3),
    ("decision_entropy", "entropy", 1, 3),
    ("direct_accuracy", "direct acc. %", 100, 1),
    ("spark_accuracy", "spark acc. %", 100, 1),
]


def spark_rows(summary: dict) -> list[list[str]]:
    """Per arm, the decision position at the start and the end: mean ± sd over seeds."""
    rows = []
    for name, arm in summary["arms"].items():
        spreads = arm["mean_std"]
        if spreads.get("spark_frac@start") is None:
            continue
        for stage in ("start", "end"):
            rows.append([name, stage] + [_cell(spreads.get(f"{key}@{stage}"), scale, decimals)
                                         for key, _, scale, decimals in SPARK_COLUMNS])
    return rows


def plot_bands(runs_by_arm: dict[str, list[RunSeries]], out_dir: Path, total_steps: int) -> list[Path]:
    """One PNG per quantity any arm has; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    window = max(1, round(0.02 * total_steps))
    written = []
    for stem, key, title in BAND_PLOTS:
        bands = _bands(runs_by_arm, key, 1 if key == ACCURACY_KEY else window)
        if not bands:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for arm, curve in bands.items():
            _draw_band(ax, curve, f"{arm} ({len(runs_by_arm[arm])} seeds)",
                       "o-" if len(curve.steps) < 30 else "-")
        ax.set_title(f"{title}\nline: mean over seeds, band: min-max", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out_dir / f"{stem}.png"))
    buckets = _plot_buckets(plt, runs_by_arm, out_dir, window)
    watch = _plot_watch(plt, runs_by_arm, out_dir, window)
    return written + [p for p in (buckets, watch) if p]


def _paired_record(diff: PairedDifference | None) -> dict | None:
    if diff is None:
        return None
    return {**asdict(diff), "n": diff.n,
            "per_seed": {str(s): d for s, d in zip(diff.seeds, diff.differences, strict=True)}}


def _plot_watch(plt, runs_by_arm: dict[str, list[RunSeries]], out_dir: Path, window: int) -> Path | None:
    """Per watched string, one row: each arm's histogram of the probabilities it was sampled
    at, at the arm's last histogram step (mean over seeds, bars from the lowest to the highest
    seed), then its mean sampled probability and its share of the sampled tokens over steps."""
    strings = watched_strings([run for runs in runs_by_arm.values() for run in runs])
    if not strings:
        return None
    fig, axes = plt.subplots(len(strings), 3, figsize=(17, 3.8 * len(strings)), squeeze=False)
    for (hist_ax, prob_ax, frac_ax), string in zip(axes, strings, strict=True):
        bars = []
        for arm, runs in runs_by_arm.items():
            mean = histogram_mean(runs, watch_key(string, HIST_SUFFIX))
            if mean is None:
                continue
            errors = [[m - lo for m, lo in zip(mean.share, mean.low, strict=True)],
                      [hi - m for m, hi in zip(mean.share, mean.high, strict=True)]]
            bars.append((f"{arm}, step {mean.step} ({mean.sampled_seeds}/{mean.seeds} seeds sampled "
                         f"it, {mean.mean_count:.0f} times on average)", mean.share, errors))
        if bars:
            draw_histograms(hist_ax, bars, f"'{string}' sampled at, last histogram step\n"
                                           "bar: mean over seeds, whisker: min-max")
        else:
            hist_ax.set_visible(False)  # no arm logged histograms (trainer.watch_hist_every=0)
        for ax, suffix, title in ((prob_ax, "/sampled_prob", "mean probability when sampled"),
                                  (frac_ax, "/sampled_frac", "share of the sampled tokens")):
            for arm, curve in _bands(runs_by_arm, watch_key(string, suffix), window).items():
                _draw_band(ax, curve, arm)
            ax.set_title(f"'{string}': {title}\nline: mean over seeds, band: min-max", fontsize=9)
            if ax.has_data():
                ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / f"{WATCH_STEM}.png")


def _bands(runs_by_arm: dict[str, list[RunSeries]], key: str, window: int) -> dict[str, Band]:
    """Each arm's band of ``key``; arms without the metric are left out."""
    bands = {arm: band(runs, key, window) for arm, runs in runs_by_arm.items()}
    return {arm: curve for arm, curve in bands.items() if curve is not None}


def _draw_band(ax, curve: Band, label: str, style: str = "-") -> None:
    (line,) = ax.plot(curve.steps, curve.mean, style, markersize=3, label=label)
    ax.fill_between(curve.steps, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_buckets(plt, runs_by_arm: dict[str, list[RunSeries]], out_dir: Path, window: int) -> Path | None:
    """The sampled-token probability distribution over training: one panel per bucket, log
    scale, so that the thin low-probability tail is as readable as the bulk."""
    panels = {key: _bands(runs_by_arm, key, window) for key in PROB_BUCKET_KEYS}
    panels = {key: bands for key, bands in panels.items() if bands}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
    for ax, (key, bands) in zip(axes.flat, panels.items(), strict=True):
        for arm, curve in bands.items():
            _draw_band(ax, curve, arm)
        # Linear near 0, so that a step without a single token in the bucket still shows.
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(key.removeprefix("sampled_prob/").replace("_", " ").replace("to", "-"), fontsize=9)
    axes.flat[0].set_ylabel("share of sampled tokens")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("probability of the sampled tokens (p), by bucket", fontsize=10)
    return _save(plt, fig, out_dir / f"{BUCKETS_STEM}.png")


def _cell(spread: dict | None, scale: float, decimals: int, with_std: bool = True) -> str:
    if spread is None:
        return "—"
    mean, std = spread["mean"] * scale, spread["std"] * scale
    if not with_std or spread["n"] < 2:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _value(value: float | None, scale: float, decimals: int) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value * scale:.{decimals}f}"


def _seeds_line(summary: dict) -> str:
    per_arm = {name: arm.get("seeds", summary["seeds"]) for name, arm in summary["arms"].items()}
    if len({tuple(seeds) for seeds in per_arm.values()}) <= 1:
        return f"Seeds: {', '.join(map(str, summary['seeds']))}."
    listed = (f"{name} {', '.join(map(str, seeds))}" for name, seeds in per_arm.items())
    return "Seeds: " + "; ".join(listed) + "."


# The paired table's rows: (summary key, name, scale, decimals, unit); accuracies in
# percentage points, since a difference of percentages is not a percentage.
PAIRED_COLUMNS = {key: (heading.removesuffix(" %"), scale, decimals, " pp" if scale == 100 else "")
                  for key, heading, scale, decimals in TABLE_COLUMNS if key in PAIRED_KEYS}
PAIRED_COLUMNS["final_reward"] = ("reward end", 1, 3, "")


def _signed(value: float | None, scale: float, decimals: int) -> str:
    return "—" if value is None else f"{value * scale:+.{decimals}f}"


def paired_rows(summary: dict) -> list[list[str]]:
    """The paired differences as text cells: arm, metric, seeds, mean, sd, s.e., and how many
    seeds favour the arm / the baseline / neither."""
    rows = []
    for name, by_key in summary.get("paired_differences", {}).items():
        for key, diff in by_key.items():
            heading, scale, decimals, unit = PAIRED_COLUMNS[key]
            if diff is None:
                rows.append([name, heading, "0", "—", "—", "—", "—"])
                continue
            spread = [_value(diff[k], scale, decimals) for k in ("std", "sem")]
            rows.append([name, heading, str(diff["n"]), _signed(diff["mean"], scale, decimals) + unit,
                         *spread, f"{diff['favour_arm']} / {diff['favour_baseline']} / {diff['ties']}"])
    return rows


PAIRED_HEADINGS = ["arm", "metric", "seeds", "mean arm − baseline", "sd", "s.e.",
                   "seeds arm / baseline / tie"]


def paired_text(summary: dict) -> list[str]:
    """The paired table for a terminal: aligned columns, a heading naming the baseline."""
    rows = paired_rows(summary)
    if not rows:
        return []
    table = [PAIRED_HEADINGS, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(PAIRED_HEADINGS))]
    lines = [f"paired differences against {summary['baseline']} (per seed, over the seeds both finished):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in table]
    return lines


def write_report(path: Path, summary: dict, plots: list[Path], command: str) -> None:
    """``report.md``: the table over seeds, the paired differences against the baseline, the
    per-seed table, the plots, the definitions."""
    lines = ["# Comparison", "", f"Command: `{command}`", "",
             f"{_seeds_line(summary)} Cells are mean ± sample standard deviation over seeds.", ""]
    if summary["missing_runs"]:
        lines += [f"**Not finished:** {', '.join(summary['missing_runs'])}. The numbers below "
                  "leave them out.", ""]
    if summary.get("arms_left_out"):
        lines += [f"**Not in this report:** {', '.join(summary['arms_left_out'])}, which have runs "
                  "in this directory but no `-c` in the command.", ""]
    lines += ["| arm | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
              "|---|" + "---|" * len(TABLE_COLUMNS)]
    for name, arm in summary["arms"].items():
        cells = [_cell(arm["mean_std"].get(key), scale, decimals, key != "wall_s")
                 for key, _, scale, decimals in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = paired_rows(summary)
    if rows:
        lines += ["", f"## Against the baseline, {summary['baseline']}", "",
                  "Each seed's arm − baseline, over the seeds both finished: the mean, its sample "
                  "standard deviation (sd) and standard error (s.e. = sd / √seeds), and how many "
                  "seeds favour each (higher is better for all three metrics; see "
                  "docs/compare.md for how to read it).", "",
                  "| " + " | ".join(PAIRED_HEADINGS) + " |", "|---" * len(PAIRED_HEADINGS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    spark = spark_rows(summary)
    if spark:
        lines += ["", "## The decision position", "",
                  "Just after the first answer, where the spark `W`, a distractor or the end "
                  "follows: each arm's policy before RL and at its last checkpoint, sampled at "
                  f"temperature 1 on {PROBE_PROBLEMS} held-out problems, 4 responses each "
                  "(definitions below).", "",
                  "| arm | model | " + " | ".join(c[1] for c in SPARK_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(SPARK_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in spark]
    lines += ["", "## Per seed", "",
              "| arm | seed | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
              "|---|---|" + "---|" * len(TABLE_COLUMNS)]
    for name, arm in summary["arms"].items():
        for seed, run in arm["per_seed"].items():
            cells = [_value(run.get(key), scale, decimals) for key, _, scale, decimals in TABLE_COLUMNS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    fractions = ", ".join(f"{f:.0%}" for f in ENTROPY_FRACTIONS)
    lines += ["", f"Entropy at {fractions} of training is in `summary.json`.", "", "## Plots", ""]
    for plot in plots:
        lines += [f"![{plot.stem}](plots/{plot.name})", ""]
    lines += ["## Definitions", ""]
    lines += [f"- `{key}`: {meaning}" for key, meaning in summary["definitions"].items()]
    path.write_text("\n".join(lines) + "\n")
