"""``lpreg plot RUN_DIR [RUN_DIR ...]``: PNG figures of one run or several side by side.

Each figure is a topic (reward and accuracy, entropy, Lp-Reg, response length,
timing); each panel is one metric, with one line per run, so Lp-Reg and a GRPO
baseline read off the same axes. A metric no run has is left out, and a figure with
nothing to show is not written.
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
    return written


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
