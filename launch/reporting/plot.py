"""``lpreg plot RUN_DIR [RUN_DIR ...]``: PNG figures of one run or several side by side.

Each figure is a topic (reward and accuracy, entropy, Lp-Reg, response length,
timing); each panel is one metric, with one line per run, so Lp-Reg and a GRPO
baseline read off the same axes. A metric no run has is left out, and a figure with
nothing to show is not written. Runs that watched tokens (``trainer.watch_tokens``) get two
more: each token's share and sampled probability over steps, and its histograms of sampled
probabilities at a few steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from launch.reporting.metrics import read_jsonl

log = logging.getLogger("lpreg")

# (file stem, title, [(metric key or key prefix, panel title)]); a key ending in "*"
# matches the first metric present that starts with it (eval/mean@8, eval/pass@8, ...).
FIGURES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("reward", "Reward and accuracy", [
        ("reward/mean", "train reward (mean)"),
        ("eval/accuracy", "held-out greedy accuracy"),
        ("eval/mean@*", "held-out mean@k"),
        ("eval/pass@*", "held-out pass@k"),
    ]),
    ("entropy", "Policy entropy", [
        ("actor/entropy", "entropy of the policy on its responses"),
        ("actor/low_prob_frac", "share of low-probability tokens"),
    ]),
    ("lp_reg", "Lp-Reg", [
        ("lp_reg/regularized_frac", "regularised fraction of tokens"),
        ("lp_reg/regularized_tokens", "tokens the regulariser acted on (per step)"),
        ("lp_reg/selected_frac", "selected fraction"),
        ("lp_reg/proxy_kl", "KL(proxy || policy) on regularised tokens"),
        ("lp_reg/filtered_frac", "tokens removed by the min-p filter"),
    ]),
    ("sampled_prob", "Probability of the sampled tokens (share of each step's tokens)", [
        ("sampled_prob/below_0.01", "p < 0.01"),
        ("sampled_prob/0.01_to_0.1", "0.01 <= p < 0.1"),
        ("sampled_prob/0.1_to_0.5", "0.1 <= p < 0.5"),
        ("sampled_prob/0.5_to_0.9", "0.5 <= p < 0.9"),
        ("sampled_prob/above_0.9", "p >= 0.9"),
        ("sampled_prob/below_0.1", "low-probability mass: p < 0.1"),
    ]),
    ("response_length", "Response length", [
        ("response_length/mean", "mean length (tokens)"),
        ("response_length/max", "max length (tokens)"),
        ("response_length/clip_ratio", "share cut at the length limit"),
    ]),
    ("timing", "Timing", [
        ("timing/step_s", "step (s)"),
        ("timing/rollout_s", "rollout (s)"),
        ("timing/update_s", "learner update (s)"),
        ("timing/weight_sync_s", "weight sync (s)"),
        ("timing/checkpoint_s", "checkpoint (s)"),
        ("perf/throughput", "throughput (tokens/s)"),
    ]),
]


@dataclass
class RunSeries:
    """One run's metrics as ``key -> (steps, values)``."""

    name: str
    path: Path
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    # watch/<string>/prob_hist -> {step: counts per bin}; lists, so not in ``series``.
    histograms: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def get(self, key: str) -> tuple[str, list[int], list[float]] | None:
        if key.endswith("*"):
            prefix = key[:-1]
            matches = sorted(k for k in self.series if k.startswith(prefix) and k.count("/") == 1)
            if not matches:
                return None
            key = matches[0]
        if key not in self.series:
            return None
        steps, values = self.series[key]
        return key, steps, values


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last one written: a resumed run repeats the steps it redid."""
    by_step: dict[int, dict] = {}
    for record in records:
        if isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def load_run(run_dir: str | Path, name: str | None = None) -> RunSeries:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "eval.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl or eval.jsonl (not a run directory?)")
    run = RunSeries(name=name or run_dir.name, path=run_dir)
    metrics = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    # eval.jsonl has the evaluation before the first step too; `lpreg eval` records
    # (with a "source") may use other settings and are not part of the curve.
    evals = latest_per_step([r for r in read_jsonl(run_dir / "eval.jsonl") if "source" not in r])
    for records, only_eval in ((metrics, False), (evals, True)):
        for record in records:
            for key, value in record.items():
                if key == "step" or (only_eval and not key.startswith("eval/")):
                    continue
                if key.startswith(WATCH_PREFIX) and key.endswith(HIST_SUFFIX) and _counts(value):
                    run.histograms.setdefault(key, {})[record["step"]] = [float(v) for v in value]
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if not math.isfinite(value):
                    continue
                steps, values = run.series.setdefault(key, ([], []))
                if only_eval and record["step"] in steps:
                    continue  # the same evaluation, already read from metrics.jsonl
                steps.append(record["step"])
                values.append(float(value))
    for key, (steps, values) in run.series.items():
        order = sorted(range(len(steps)), key=steps.__getitem__)
        run.series[key] = ([steps[i] for i in order], [values[i] for i in order])
    return run


def _counts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


WATCH_PREFIX = "watch/"
HIST_SUFFIX = "/prob_hist"
WATCH_SUFFIXES = ("/sampled_frac", "/sampled_prob", HIST_SUFFIX)


def watched_strings(runs: list[RunSeries]) -> list[str]:
    """The strings any run watched, in the order first met (a string may hold a "/")."""
    found: dict[str, None] = {}
    for run in runs:
        for key in [*run.series, *run.histograms]:
            for suffix in WATCH_SUFFIXES:
                if key.startswith(WATCH_PREFIX) and key.endswith(suffix):
                    found[key[len(WATCH_PREFIX):-len(suffix)]] = None
    return list(found)


def watch_key(string: str, suffix: str) -> str:
    return f"{WATCH_PREFIX}{string}{suffix}"


def spread_steps(steps: list[int], count: int = 3) -> list[int]:
    """``count`` steps out of ``steps`` (sorted): the first, the last and evenly between."""
    if len(steps) <= count:
        return list(steps)
    picks = [round(i * (len(steps) - 1) / (count - 1)) for i in range(count)]
    return [steps[i] for i in dict.fromkeys(picks)]


def shares(counts: list[float]) -> list[float] | None:
    """Counts as shares of their total; None when nothing was counted."""
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else None


def draw_histograms(ax, bars: list[tuple[str, list[float], list | None]], title: str) -> None:
    """Grouped bars over the watch histogram's bins: per entry a label, the share of each
    bin, and the error bars (matplotlib's yerr: below and above each bar) or None."""
    from launch.training.watch import hist_bin_labels

    labels = hist_bin_labels()
    width = 0.8 / max(1, len(bars))
    for i, (label, values, errors) in enumerate(bars):
        xs = [b - 0.4 + width * (i + 0.5) for b in range(len(values))]
        ax.bar(xs, values, width, label=label, yerr=errors, capsize=2 if errors else 0,
               error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_xlabel("probability the token was sampled at (bins)")
    ax.set_ylabel("share of its samples")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def run_names(run_dirs: list[Path]) -> list[str]:
    """Directory names, widened with their parents until they tell the runs apart."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in run_dirs]
        if len(set(names)) == len(names) or depth >= max(len(p.resolve().parts) for p in run_dirs):
            return names
        depth += 1


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write one PNG per topic into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, run_names(paths), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, panels in FIGURES:
        present = [(key, label) for key, label in panels if any(r.get(key) for r in runs)]
        breakdown = stem == "timing" and any(r.get(k) for r in runs for k, _ in PHASES)
        if not present:
            log.info("plot: no run has any %s metric; %s.png skipped", stem, stem)
            continue
        cols = min(2, len(present) + breakdown)
        rows = math.ceil((len(present) + breakdown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.8 * rows), squeeze=False)
        for ax, (key, label) in zip(axes.flat, present, strict=False):
            for run in runs:
                found = run.get(key)
                if found is None:
                    continue
                shown, steps, values = found
                style = "o-" if len(steps) < 30 else "-"
                ax.plot(steps, values, style, markersize=3, label=run.name)
                if key.endswith("*"):
                    label = f"{label} ({shown.removeprefix('eval/')})"
            if stem == "timing":
                _mark_restarts(ax, runs)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if breakdown:
            _plot_breakdown(axes.flat[len(present)], runs)
        for ax in list(axes.flat)[len(present) + breakdown:]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written + plot_watch(plt, runs, out_dir)


def plot_watch(plt, runs: list[RunSeries], out_dir: Path) -> list[Path]:
    """``watch.png``: per watched string, its share of the sampled tokens and its mean sampled
    probability over steps; ``watch_hist.png``: per string and run, the histogram of the
    probabilities it was sampled at, at the first, a middle and the last histogram step."""
    strings = watched_strings(runs)
    if not strings:
        return []
    written = []
    fig, axes = plt.subplots(len(strings), 2, figsize=(12.8, 3.6 * len(strings)), squeeze=False)
    for row, string in zip(axes, strings, strict=True):
        for ax, (suffix, label) in zip(row, WATCH_CURVES, strict=True):
            for run in runs:
                found = run.get(watch_key(string, suffix))
                if found is not None:
                    ax.plot(found[1], found[2], "o-" if len(found[1]) < 30 else "-", markersize=3,
                            label=run.name)
            ax.set_title(f"'{string}': {label}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.suptitle("Watched tokens")
    fig.tight_layout()
    written.append(out_dir / "watch.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    panels = [(string, run) for string in strings for run in runs
              if watch_key(string, HIST_SUFFIX) in run.histograms]
    if not panels:
        log.info("plot: no histogram of the watched tokens (trainer.watch_hist_every); "
                 "watch_hist.png skipped")
        return written
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, (string, run) in zip(axes.flat, panels, strict=False):
        histograms = run.histograms[watch_key(string, HIST_SUFFIX)]
        bars = []
        for step in spread_steps(sorted(histograms)):
            counts = histograms[step]
            values = shares(counts)
            # A step at which the token was never sampled still gets its legend entry: that
            # it vanished is the finding.
            bars.append((f"step {step} ({sum(counts):g} sampled)", values or [0.0] * len(counts), None))
        draw_histograms(ax, bars, f"'{string}' sampled at, {run.name}")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Probabilities at which each watched token was sampled")
    fig.tight_layout()
    written.append(out_dir / "watch_hist.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


WATCH_CURVES = (("/sampled_frac", "share of the sampled tokens"),
                ("/sampled_prob", "mean probability when sampled"))


RESTART_KEYS = {"rollout/restarts": ("rollout worker replaced", ":"),
                "learner/restarts": ("learner group rebuilt", "--")}


def restart_steps(run: RunSeries, key: str) -> list[int]:
    """Steps whose record shows a restart count higher than the step before."""
    found = run.get(key)
    if found is None:
        return []
    _, steps, counts = found
    return [s for s, prev, now in zip(steps, [0.0, *counts], counts, strict=False) if now > prev]


def _mark_restarts(ax, runs: list[RunSeries]) -> None:
    """A vertical line at each step in which an actor was replaced."""
    for key, (label, style) in RESTART_KEYS.items():
        steps = sorted({s for run in runs for s in restart_steps(run, key)})
        for i, step in enumerate(steps):
            ax.axvline(step, color="grey", linestyle=style, linewidth=1,
                       label=label if i == 0 else None)


PHASES = [("timing/rollout_s", "rollout"), ("timing/update_s", "update"),
          ("timing/weight_sync_s", "weight sync"), ("timing/checkpoint_s", "checkpoint")]


def _plot_breakdown(ax, runs: list[RunSeries]) -> None:
    """Mean seconds per step in each phase, stacked, one bar per run."""
    left = [0.0] * len(runs)
    for key, label in PHASES:
        # Checkpoints happen on some steps only: spread their time over all steps.
        means = []
        for run in runs:
            found = run.get(key)
            total_steps = max(1, len(run.series.get("timing/step_s", ([], []))[0]))
            if found is None:
                means.append(0.0)
            elif key == "timing/checkpoint_s":
                means.append(sum(found[2]) / total_steps)
            else:
                means.append(sum(found[2]) / len(found[2]))
        if any(means):
            ax.barh([r.name for r in runs], means, left=left, label=label)
            left = [a + b for a, b in zip(left, means, strict=True)]
    ax.set_title("mean time per step by phase (s)", fontsize=10)
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8)


def default_out_dir(run_dirs: list[str | Path]) -> Path:
    """``RUN_DIR/plots`` for one run; ``plots/`` here when comparing several."""
    return Path(run_dirs[0]) / "plots" if len(run_dirs) == 1 else Path("plots")
