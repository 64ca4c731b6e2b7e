"""The comparison's outputs: ``summary.json``, one PNG per quantity, and ``report.md``.

Each plot has one line per arm, the mean over seeds, in a band from the lowest to the
highest seed. Per-step metrics are smoothed with a trailing mean over 2% of the run
first, so that the trend reads through the noise; evaluations are plotted as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from launch.experiments.summary import (
    ACCURACY_KEY,
    DEFINITIONS,
    ENTROPY_FRACTIONS,
    ENTROPY_KEY,
    REGULARIZED_FRAC_KEY,
    REGULARIZED_TOKENS_KEY,
    REWARD_KEY,
    Band,
    aggregate,
    band,
)
from launch.reporting.plot import RunSeries
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
                  missing: list[str]) -> dict:
    """``arms``: name -> {"recipe": str, "per_seed": {seed: summary}}; returns what it wrote."""
    document = {
        "seeds": seeds,
        "overrides": overrides,
        "missing_runs": missing,
        "definitions": DEFINITIONS,
        "arms": {
            name: {"recipe": arm["recipe"],
                   "per_seed": {str(seed): summary for seed, summary in arm["per_seed"].items()},
                   "mean_std": {key: asdict(spread) if spread else None
                                for key, spread in aggregate(arm["per_seed"]).items()}}
            for name, arm in arms.items()
        },
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


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
    return written + ([buckets] if buckets else [])


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


def write_report(path: Path, summary: dict, plots: list[Path], command: str) -> None:
    """``report.md``: the table over seeds, the per-seed table, the plots, the definitions."""
    lines = ["# Comparison", "", f"Command: `{command}`", "",
             f"Seeds: {', '.join(map(str, summary['seeds']))}. Cells are mean ± sample standard "
             "deviation over seeds.", ""]
    if summary["missing_runs"]:
        lines += [f"**Not finished:** {', '.join(summary['missing_runs'])}. The numbers below "
                  "leave them out.", ""]
    lines += ["| arm | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
              "|---|" + "---|" * len(TABLE_COLUMNS)]
    for name, arm in summary["arms"].items():
        cells = [_cell(arm["mean_std"].get(key), scale, decimals, key != "wall_s")
                 for key, _, scale, decimals in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
