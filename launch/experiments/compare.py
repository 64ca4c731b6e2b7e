"""``lpreg compare``: the same budget under several recipes and seeds, then one report.

Every (arm, seed) is an ordinary ``lpreg train`` run in a child process, in its own run
directory under ``OUT/runs/ARM/seedS``. A run that finished leaves ``compare_run.json``
there, with the resolved config it ran; a later ``lpreg compare`` with the same settings
skips it, so an interrupted comparison picks up where it stopped. A run cut short
continues from its newest checkpoint when it has one and starts again otherwise.

By default each seed also seeds the tiny model's initialisation and warm start, so a seed's
runs start from a model of their own. ``--model-seed`` starts every run from one warm-started
model instead, as runs from one base model do: the seeds then vary only the problems and
the sampling, and one warm start serves them all.

Arms may run different seeds (``--seeds-for``): a comparison is what one command names, so
adding an arm later is the same command with one more ``-c``, and the finished runs of the
others are skipped, not lost from the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from conf.load import ConfigError, load_config, resolve_recipe
from conf.schema import LpregConfig
from launch.training.checkpoint import checkpoint_root, list_checkpoints

log = logging.getLogger("lpreg.compare")

DONE_FILE = "compare_run.json"
# Written before a run starts: a later call continues it only with the same settings.
STARTED_FILE = "compare_started.json"
# Keys ``lpreg compare`` sets itself for every run; overriding them would break the layout
# or make the seeds meaningless.
OWNED_KEYS = ("trainer.seed", "model.tiny.seed", "data.synthetic.seed", "trainer.output_dir",
              "trainer.run_name", "trainer.resume")


@dataclass(frozen=True)
class PlannedRun:
    """One arm under one seed: its resolved config and where it lives."""

    arm: str
    recipe: Path
    seed: int
    overrides: tuple[str, ...]  # everything passed to ``lpreg train`` after the recipe
    cfg: LpregConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.trainer.output_dir) / self.cfg.trainer.run_name

    @cached_property
    def config_text(self) -> str:
        """The resolved config minus where it lives, so that a moved ``--out`` still matches."""
        from omegaconf import OmegaConf

        tree = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        del tree["trainer"]["output_dir"]
        return OmegaConf.to_yaml(tree)

    @cached_property
    def config_digest(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()[:16]

    def finished(self) -> dict | None:
        """The record this run left when it finished with these very settings, or None.

        A finished (or started) run with other settings is an error, not a reason to run
        again: it would silently mix two experiments in one report."""
        self._check_same_settings(STARTED_FILE, "a started run")
        return self._check_same_settings(DONE_FILE, "a finished run")

    def _check_same_settings(self, name: str, what: str) -> dict | None:
        record = read_record(self.run_dir / name)
        if record is None or record.get("config_digest") == self.config_digest:
            return record
        differing = _differing_keys(record.get("config", ""), self.config_text)
        raise ConfigError(
            f"{self.run_dir} holds {what} of arm '{self.arm}', seed {self.seed}, with other "
            f"settings than this comparison's ({differing}); choose another --out, or remove "
            "that directory to run it again")


def read_record(path: Path) -> dict | None:
    """A JSON record, or None when it is missing or was cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_record(path: Path, record: dict) -> None:
    """Written whole or not at all: a half-written record would read as garbage later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(scratch, path)


def _differing_keys(old_yaml: str, new_yaml: str) -> str:
    from omegaconf import OmegaConf

    if not old_yaml:
        return "its settings are not recorded"
    old = _flatten(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = _flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def arm_name(recipe: str) -> str:
    return Path(recipe).name.removesuffix(".yaml")


def pick_arm(name: str, recipes: list[str], option: str) -> str:
    """The arm ``name`` means, given as an arm name or as the recipe given to ``-c``."""
    arms = [arm_name(r) for r in recipes]
    if arm_name(name) not in arms:
        raise ConfigError(f"{option} {name}: no -c recipe is named so (arms: {', '.join(arms)})")
    return arm_name(name)


def _check_seeds(seeds: list[int], option: str, example: str) -> None:
    if not seeds:
        raise ConfigError(f"{option}: give at least one seed, e.g. {example}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{option}: each seed once, got {','.join(map(str, seeds))}")


def arm_seeds(recipes: list[str], seeds: list[int],
              seeds_for: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Each arm's seeds: ``seeds_for``'s where it names the arm, ``seeds`` otherwise."""
    _check_seeds(seeds, "--seeds", "--seeds 0,1,2")
    chosen = {arm_name(r): list(seeds) for r in recipes}
    for name, own in (seeds_for or {}).items():
        arm = pick_arm(name, recipes, "--seeds-for")
        _check_seeds(own, f"--seeds-for {arm}", f"--seeds-for {arm}=0,1,2")
        chosen[arm] = list(own)
    return chosen


def plan_runs(recipes: list[str], seeds: list[int], out_dir: Path,
              overrides: list[str], seeds_for: dict[str, list[int]] | None = None,
              model_seed: int | None = None) -> list[PlannedRun]:
    """Every (arm, seed) run, each config loaded and checked before anything starts.
    ``seeds_for`` gives some arms (by arm name or recipe) seeds of their own; ``model_seed``,
    when given, is every run's ``model.tiny.seed`` in place of the run's seed."""
    if len(recipes) < 1:
        raise ConfigError("lpreg compare needs at least one -c RECIPE")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise ConfigError(f"config key '{key}' is set by lpreg compare for each run (use --seeds "
                              "and --out); leave it out of the overrides")
    names = [arm_name(r) for r in recipes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"two arms would share the name '{duplicated[0]}': give each -c a recipe "
                          "file with its own name")
    per_arm = arm_seeds(recipes, seeds, seeds_for)
    planned = []
    for recipe, name in zip(recipes, names, strict=True):
        path = resolve_recipe(recipe).resolve()
        for seed in per_arm[name]:
            tiny_seed = seed if model_seed is None else model_seed
            owned = [f"trainer.seed={seed}", f"model.tiny.seed={tiny_seed}", f"data.synthetic.seed={seed}",
                     f"trainer.output_dir={out_dir.resolve() / 'runs' / name}",
                     f"trainer.run_name=seed{seed}"]
            # The child runs exactly this config: its digest marks the run as finished.
            run_overrides = (*overrides, "trainer.progress_bar=false", *owned)
            cfg = load_config(str(path), run_overrides)
            planned.append(PlannedRun(name, path, seed, run_overrides, cfg))
    steps = {run.cfg.trainer.total_steps for run in planned}
    if len(steps) > 1:
        log.warning("the arms train for different numbers of steps (%s): their curves are compared "
                    "step by step", ", ".join(map(str, sorted(steps))))
    return planned


def train_command(run: PlannedRun, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "launch.cli", "train", "-c", str(run.recipe), *run.overrides]
    return command + (["trainer.resume=auto"] if resume else [])


def _prepare_restart(run: PlannedRun) -> bool:
    """Make a started but unfinished run ready to go on; True when it resumes from a checkpoint."""
    if not run.run_dir.exists():
        return False
    if list_checkpoints(checkpoint_root(run.run_dir), warn=False):
        log.info("%s seed %d: continuing the interrupted run from its newest checkpoint", run.arm, run.seed)
        return True
    # No checkpoint: start over, so that metrics.jsonl holds one run only.
    log.info("%s seed %d: an interrupted run without checkpoints; starting it again", run.arm, run.seed)
    shutil.rmtree(run.run_dir)
    return False


@dataclass
class RunOutcome:
    run: PlannedRun
    exit_code: int
    wall_s: float
    log_path: Path
    skipped: bool = False


def execute(planned: list[PlannedRun], out_dir: Path, parallel: int = 1,
            start_runs: bool = True) -> list[RunOutcome]:
    """Run what has not finished, ``parallel`` at a time; the finished ones are reported as
    skipped. With ``start_runs`` False nothing starts: the outcomes are the finished runs."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcomes: list[RunOutcome] = []
    pending = []
    for run in planned:
        record = run.finished()
        if record is not None:
            log.info("%s seed %d: finished earlier (%.0f s), not run again", run.arm, run.seed,
                     record["wall_s"])
            outcomes.append(RunOutcome(run, 0, record["wall_s"], Path(record["log"]), skipped=True))
        elif start_runs:
            pending.append(run)
    running: list[tuple[PlannedRun, subprocess.Popen, float, Path]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                resume = _prepare_restart(run)
                write_record(run.run_dir / STARTED_FILE, {"config_digest": run.config_digest,
                                                          "config": run.config_text})
                log_path = logs / f"{run.arm}-seed{run.seed}.log"
                command = train_command(run, resume)
                log.info("%s seed %d: starting (log: %s)", run.arm, run.seed, log_path)
                with log_path.open("a") as handle:
                    handle.write(f"$ {' '.join(command)}\n")
                    handle.flush()
                    started = time.monotonic()
                    # Its own session: the child and its private Ray stop as one group.
                    running.append((run, subprocess.Popen(
                        command, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(),
                        start_new_session=True, preexec_fn=_listen_to_ctrl_c), started, log_path))
            time.sleep(1.0)
            for entry in list(running):
                run, process, started, log_path = entry
                code = process.poll()
                if code is None:
                    continue
                running.remove(entry)
                wall_s = time.monotonic() - started
                outcomes.append(RunOutcome(run, code, wall_s, log_path))
                if code == 0:
                    _mark_finished(run, wall_s, log_path)
                    log.info("%s seed %d: finished in %.0f s", run.arm, run.seed, wall_s)
                else:
                    log.error("%s seed %d: lpreg train exited with status %d after %.0f s; see %s",
                              run.arm, run.seed, code, wall_s, log_path)
    finally:
        _stop_children([process for _, process, _, _ in running])
    return outcomes


def _listen_to_ctrl_c() -> None:
    """In the child, before it runs: a shell starts background jobs with Ctrl-C ignored, and
    the child would inherit that and shrug off the SIGINT that asks it to stop cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_children(processes: list[subprocess.Popen], grace_s: float = 60.0) -> None:
    """Interrupted: each child gets Ctrl-C (it shuts its Ray down); whatever is left of its
    session after ``grace_s`` is killed."""
    for process in processes:
        _signal_group(process.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        # Ray's workers put themselves in process groups of their own, inside the session.
        _signal_group(process.pid, signal.SIGKILL)
        for pid in session_members(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def session_members(sid: int) -> list[int]:
    """Every live process of session ``sid`` (Linux: read from /proc; elsewhere none)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return members


def _build_models_once(planned: list[PlannedRun]) -> None:
    """Bootstrap each tiny model the runs share here, one at a time, so that runs started
    side by side never build the same model directory together."""
    from launch.models.resolve import resolve_model_path

    built = set()
    for run in planned:
        model = (run.cfg.model.cache_dir, repr(run.cfg.model.tiny), repr(run.cfg.data.synthetic))
        if run.cfg.model.path is None and model not in built and run.finished() is None:
            built.add(model)
            resolve_model_path(run.cfg)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _mark_finished(run: PlannedRun, wall_s: float, log_path: Path) -> None:
    record = {"arm": run.arm, "seed": run.seed, "recipe": str(run.recipe),
              "overrides": list(run.overrides), "config_digest": run.config_digest,
              "wall_s": wall_s, "log": str(log_path), "config": run.config_text}
    write_record(run.run_dir / DONE_FILE, record)


@dataclass
class ComparisonResult:
    summary_path: Path
    report_path: Path
    plots: list[Path]
    outcomes: list[RunOutcome]
    missing: list[str]  # "arm seed S" of every planned run without a finished result
    summary: dict  # what summary.json holds

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.exit_code != 0]

    @property
    def ran(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.skipped]


def arms_in(out_dir: Path) -> list[str]:
    """Arms with at least one finished run under ``out_dir``, by name."""
    runs = out_dir / "runs"
    found = runs.glob(f"*/*/{DONE_FILE}") if runs.is_dir() else []
    return sorted({path.parent.parent.name for path in found})


def run_comparison(recipes: list[str], seeds: list[int], out_dir: str | Path, overrides: list[str],
                   parallel: int = 1, command: str = "lpreg compare",
                   start_runs: bool = True, seeds_for: dict[str, list[int]] | None = None,
                   baseline: str | None = None, model_seed: int | None = None) -> ComparisonResult:
    """Plan, run what is not finished (unless ``start_runs`` is False), and write
    ``summary.json``, the plots and ``report.md`` of every finished run. ``baseline`` (an arm
    name or recipe; default the first) is the arm the others are set against seed by seed."""
    from launch.experiments.report import plot_bands, write_report, write_summary
    from launch.experiments.spark_probe import probe_run
    from launch.experiments.summary import summarize_run
    from launch.reporting.plot import load_run

    if parallel < 1:
        raise ConfigError(f"--parallel must be 1 or more, got {parallel}")
    out_dir = Path(out_dir)
    planned = plan_runs(recipes, seeds, out_dir, overrides, seeds_for, model_seed)
    baseline = pick_arm(baseline, recipes, "--baseline") if baseline else planned[0].arm
    if parallel > 1 and start_runs:
        _build_models_once(planned)
    outcomes = execute(planned, out_dir, parallel, start_runs)
    by_run = {(o.run.arm, o.run.seed): o for o in outcomes}
    arms: dict[str, dict] = {}
    runs_by_arm: dict[str, list] = {}
    missing = []
    probed_starts: dict[Path, dict] = {}
    for run in planned:
        arm = arms.setdefault(run.arm, {"recipe": str(run.recipe), "seeds": [], "per_seed": {}})
        arm["seeds"].append(run.seed)
        outcome = by_run.get((run.arm, run.seed))
        if outcome is None or outcome.exit_code != 0:
            missing.append(f"{run.arm} seed {run.seed}")
            continue
        series = load_run(run.run_dir, name=f"{run.arm}/seed{run.seed}")
        arm["per_seed"][run.seed] = (summarize_run(series, run.cfg.trainer.total_steps, outcome.wall_s)
                                     | probe_run(run.run_dir, run.cfg, run.config_digest, probed_starts))
        runs_by_arm.setdefault(run.arm, []).append(series)
    # Another command's arms in this --out are not part of this one's report; say so, since
    # the report it overwrote may have shown them.
    left_out = [name for name in arms_in(out_dir) if name not in arms]
    if left_out:
        log.warning("%s: finished runs of %s, which this command does not name with -c; the report "
                    "leaves them out (name every arm to report them together)", out_dir,
                    ", ".join(left_out))
    summary_path = out_dir / "summary.json"
    all_seeds = sorted({run.seed for run in planned})
    summary = write_summary(summary_path, arms, all_seeds, overrides, missing, baseline, left_out)
    total_steps = max(run.cfg.trainer.total_steps for run in planned)
    plots = plot_bands(runs_by_arm, out_dir / "plots", total_steps) if runs_by_arm else []
    report_path = out_dir / "report.md"
    write_report(report_path, summary, plots, command)
    return ComparisonResult(summary_path, report_path, plots, outcomes, missing, summary)
