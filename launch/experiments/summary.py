"""What one run did, in the numbers an Lp-Reg comparison is judged by, and their spread over seeds.

Per-step metrics are noisy, so a value "at" a point of training is the mean over a
window of steps ending there (``window_steps``: 5% of the run, at least one step).
Held-out accuracy is read at the evaluations themselves.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from launch.reporting.plot import RunSeries
from launch.training.step_metrics import LOW_PROB_MASS_KEY

ENTROPY_KEY = "actor/entropy"
ACCURACY_KEY = "eval/accuracy"
REWARD_KEY = "reward/mean"
REGULARIZED_FRAC_KEY = "lp_reg/regularized_frac"
REGULARIZED_TOKENS_KEY = "lp_reg/regularized_tokens"
# Fractions of training at which entropy is reported, besides the start.
ENTROPY_FRACTIONS = (0.25, 0.5, 0.75, 1.0)

# summary key -> what it means; report.md prints these under its tables.
DEFINITIONS = {
    "initial_accuracy": "held-out greedy accuracy before the first step",
    "final_accuracy": "held-out greedy accuracy after the last step",
    "best_accuracy": "best held-out greedy accuracy at any evaluation after the first step",
    "entropy@start": "policy entropy on its own responses, mean over the first 5% of steps",
    **{f"entropy@{f:g}": f"policy entropy, mean over the 5% of steps ending at {f:.0%} of training"
       for f in ENTROPY_FRACTIONS},
    "final_reward": "mean training reward over the last 5% of steps",
    "low_prob_mass": "share of sampled tokens with probability < 0.1, mean over all steps",
    "final_low_prob_mass": "share of sampled tokens with probability < 0.1, last 5% of steps",
    "regularized_frac": "share of response tokens Lp-Reg acted on (each micro-batch's share, "
                        "averaged over micro-batches and steps)",
    "regularized_tokens": "response tokens Lp-Reg acted on, summed over the run (a token "
                          "trained on in several epochs counts once per epoch)",
    "wall_s": "wall time of the lpreg train that finished the run, start-up included (s)",
}


def window_steps(total_steps: int) -> int:
    return max(1, round(0.05 * total_steps))


def _mean_between(run: RunSeries, key: str, first: int, last: int) -> float | None:
    found = run.get(key)
    if found is None:
        return None
    values = [v for s, v in zip(found[1], found[2], strict=True) if first <= s <= last]
    return statistics.fmean(values) if values else None


def summarize_run(run: RunSeries, total_steps: int, wall_s: float | None = None) -> dict[str, float | None]:
    """The comparison's numbers for one finished run; ``None`` where the run has no such metric
    (a GRPO run has no regularised tokens)."""
    window = window_steps(total_steps)
    summary: dict[str, float | None] = {}
    evals = run.get(ACCURACY_KEY)
    if evals is not None:
        steps, accuracies = evals[1], evals[2]
        summary["initial_accuracy"] = accuracies[0] if steps[0] == 0 else None
        after = [a for s, a in zip(steps, accuracies, strict=True) if s > 0]
        summary["final_accuracy"] = after[-1] if after else None
        summary["best_accuracy"] = max(after) if after else None
    else:
        summary.update(initial_accuracy=None, final_accuracy=None, best_accuracy=None)
    summary["entropy@start"] = _mean_between(run, ENTROPY_KEY, 1, window)
    for fraction in ENTROPY_FRACTIONS:
        end = max(1, round(fraction * total_steps))
        summary[f"entropy@{fraction:g}"] = _mean_between(run, ENTROPY_KEY, end - window + 1, end)
    last = (total_steps - window + 1, total_steps)
    summary["final_reward"] = _mean_between(run, REWARD_KEY, *last)
    summary["low_prob_mass"] = _mean_between(run, LOW_PROB_MASS_KEY, 1, total_steps)
    summary["final_low_prob_mass"] = _mean_between(run, LOW_PROB_MASS_KEY, *last)
    summary["regularized_frac"] = _mean_between(run, REGULARIZED_FRAC_KEY, 1, total_steps)
    tokens = run.get(REGULARIZED_TOKENS_KEY)
    summary["regularized_tokens"] = sum(tokens[2]) if tokens is not None else None
    summary["wall_s"] = wall_s
    return summary


@dataclass(frozen=True)
class Spread:
    """One number over seeds: mean, sample standard deviation (0 for one seed), min and max."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))


def aggregate(per_seed: dict[int, dict[str, float | None]]) -> dict[str, Spread | None]:
    """Each summary key's spread over the seeds that have it; ``None`` when none does."""
    keys = list(dict.fromkeys(k for summary in per_seed.values() for k in summary))
    spreads: dict[str, Spread | None] = {}
    for key in keys:
        values = [s[key] for s in per_seed.values()
                  if s.get(key) is not None and math.isfinite(s[key])]
        spreads[key] = Spread.of(values) if values else None
    return spreads


@dataclass(frozen=True)
class Band:
    """One metric of one arm over training: the mean over seeds and the min-max band."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def smooth(steps: list[int], values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    if window <= 1:
        return steps, values
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return steps, out


def band(runs: list[RunSeries], key: str, window: int = 1) -> Band | None:
    """The seeds' curves of ``key`` on the steps all of them logged, each smoothed first."""
    curves = []
    for run in runs:
        found = run.get(key)
        if found is not None:
            steps, values = smooth(found[1], found[2], window)
            curves.append(dict(zip(steps, values, strict=True)))
    if not curves:
        return None
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        return None
    columns = [[c[s] for c in curves] for s in common]
    return Band(common, [statistics.fmean(col) for col in columns],
                [min(col) for col in columns], [max(col) for col in columns])


# Summary keys whose paired difference against the baseline arm is reported: the outcomes a
# comparison is judged by, each higher-is-better, so that a positive difference favours the arm.
PAIRED_KEYS = ("best_accuracy", "final_accuracy", "final_reward")


@dataclass(frozen=True)
class PairedDifference:
    """``arm - baseline`` of one summary key, seed by seed, over the seeds both arms have.

    Seeds share the data order, the tiny model and the sampling seed, so the per-seed
    difference cancels what the seed alone decides; its spread is the honest uncertainty
    of the comparison, often smaller than the two arms' spreads side by side suggest."""

    seeds: list[int]
    differences: list[float]
    mean: float
    std: float | None  # sample standard deviation; None for one seed
    sem: float | None  # standard error of the mean, std / sqrt(n)
    favour_arm: int
    favour_baseline: int
    ties: int

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_difference(baseline: dict[int, float | None],
                      arm: dict[int, float | None]) -> PairedDifference | None:
    """Per-seed ``arm - baseline``; None when no seed has a finite value in both."""
    def usable(value):
        return value is not None and math.isfinite(value)

    seeds = sorted(s for s in baseline.keys() & arm.keys() if usable(baseline[s]) and usable(arm[s]))
    if not seeds:
        return None
    differences = [arm[s] - baseline[s] for s in seeds]
    # Accuracies are shares of the same held-out set: equal ones may still differ in the last bit.
    tied = [math.isclose(arm[s], baseline[s], rel_tol=1e-9, abs_tol=1e-12) for s in seeds]
    std = statistics.stdev(differences) if len(differences) > 1 else None
    return PairedDifference(
        seeds=seeds, differences=differences, mean=statistics.fmean(differences), std=std,
        sem=std / math.sqrt(len(differences)) if std is not None else None,
        favour_arm=sum(d > 0 and not t for d, t in zip(differences, tied, strict=True)),
        favour_baseline=sum(d < 0 and not t for d, t in zip(differences, tied, strict=True)),
        ties=sum(tied))


def paired_differences(arms: dict[str, dict], baseline: str) -> dict[str, dict[str, PairedDifference | None]]:
    """Every arm but the baseline against it, for each of ``PAIRED_KEYS``; ``arms`` as
    ``write_summary`` takes them."""
    base = arms[baseline]["per_seed"]
    return {name: {key: paired_difference({s: v.get(key) for s, v in base.items()},
                                          {s: v.get(key) for s, v in arm["per_seed"].items()})
                   for key in PAIRED_KEYS}
            for name, arm in arms.items() if name != baseline}


@dataclass(frozen=True)
class HistogramMean:
    """A watched token's sampled-probability histogram at one step, over an arm's seeds.

    Each seed's counts become shares of that seed's samples of the token first, so that
    every seed weighs the same whether it sampled the token often or rarely; a seed that did
    not sample it at that step has no shares and is left out of them."""

    step: int
    share: list[float]  # mean over the seeds that sampled the token
    low: list[float]
    high: list[float]
    sampled_seeds: int  # seeds that sampled the token at ``step``
    seeds: int  # seeds with a histogram at ``step``
    mean_count: float  # times the token was sampled at ``step``, mean over ``seeds``


def histogram_mean(runs: list[RunSeries], key: str) -> HistogramMean | None:
    """``key``'s histogram at the last step at which every seed that logs it logged one."""
    found = [run.histograms[key] for run in runs if key in run.histograms]
    common = set.intersection(*(set(h) for h in found)) if found else set()
    if not common:
        return None
    step = max(common)
    counts = [found_run[step] for found_run in found]
    shares = [[c / sum(seed) for c in seed] for seed in counts if sum(seed) > 0]
    bins = len(counts[0])
    columns = [[seed[i] for seed in shares] for i in range(bins)] if shares else [[0.0]] * bins
    return HistogramMean(step=step, share=[statistics.fmean(c) for c in columns],
                         low=[min(c) for c in columns], high=[max(c) for c in columns],
                         sampled_seeds=len(shares), seeds=len(counts),
                         mean_count=statistics.fmean(sum(seed) for seed in counts))
