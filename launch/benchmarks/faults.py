"""What faults cost a run: time to detect, time to recover, extra wall time.

Two real ``lpreg train`` runs with the same seed and workload, one after the other: one
left alone, one that takes a fault of each kind once the run is under way, each after the
previous one has healed:

- ``rollout-kill``: SIGKILL rollout-0 (Ray reports the death at once);
- ``rollout-hang``: SIGSTOP rollout-1 (found by its deadline, ``rollout.timeout_s``);
- ``learner-kill``: SIGKILL learner-1 (the group is rebuilt from the newest checkpoint).

Detection is timed from the signal to the run's log line naming the fault; recovery from
that line to the one that reports the replacement serving (for the learners, the rebuild,
restore and weight push). Extra wall time is the faulted run's training time, from its
first step to its last (steps redone after the learner recovery included), minus the
clean run's.

    lpreg bench faults [--steps 60] [--timeout 15] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

WORKLOAD = [
    "rollout.num_workers=2", "learner.num_workers=2", "learner.micro_batch_size=8",
    "data.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_response_tokens=64",
    "model.tiny.warm_start_steps=0", "trainer.eval_every=-1", "trainer.progress_bar=false",
    "verifier.truncated_reward=null", "trainer.save_every=10", "trainer.keep_last=0",
    "rollout.max_restarts=2", "trainer.max_restarts=1",
]
DETECTED = {"rollout-kill": r"rollout-0 \(pid \d+, \w+\) died",
            "rollout-hang": r"rollout-1 \(pid \d+, \w+\) (did not|made no)",
            "learner-kill": r"lpreg a learner rank died"}
RECOVERED = {"rollout-kill": r"recovered rollout-0", "rollout-hang": r"recovered rollout-1",
             "learner-kill": r"recovered the learners"}


class Run:
    def __init__(self, name: str, args: list[str], out: Path):
        self.run_dir = out / "runs" / name
        self.log_path = out / f"{name}.log"
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", *args, f"trainer.run_name={name}",
             f"trainer.output_dir={out / 'runs'}", f"model.cache_dir={out / 'models'}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def steps(self) -> list[dict]:
        from launch.reporting.metrics import read_metrics

        return read_metrics(self.run_dir)

    def actor_pid(self, kind: str, name: str) -> tuple[int | None, str | None]:
        try:
            actors = json.loads((self.run_dir / "actors.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None, None
        entry = next((a for a in actors.get(kind, []) if a["name"] == name), {})
        return entry.get("pid"), entry.get("state")

    def wait(self, condition, what: str, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.proc.poll() is not None:
                raise SystemExit(f"the run ended before {what}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; see {self.log_path}")
            time.sleep(0.05)

    def finish(self) -> int:
        code = self.proc.wait()
        self._log.close()
        return code

    def log_time(self, pattern: str, after: float = 0.0) -> float | None:
        """Epoch time of the first log line matching ``pattern`` at or after ``after``.

        Log lines carry the time of day; the day is the log file's (runs here are minutes).
        """
        day = datetime.fromtimestamp(self.log_path.stat().st_mtime).date()
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = re.match(r"^(\d\d:\d\d:\d\d) lpreg (.*)", line)
            if match and re.search(pattern, line):
                stamp = datetime.combine(day, datetime.strptime(match.group(1), "%H:%M:%S").time())
                if stamp.timestamp() >= int(after):
                    return stamp.timestamp()
        return None


def training_seconds(run: Run, steps: int) -> float:
    """Wall time from the first step's log line to the last step's (whole seconds): the
    steps redone after a learner recovery and the recoveries themselves included."""
    first = run.log_time(rf"lpreg step 1/{steps} ")
    last = run.log_time(rf"lpreg step {steps}/{steps} ")
    return last - first


def inject(run: Run, kind: str, name: str, sig: int) -> float:
    pid, _ = run.actor_pid(kind, name)
    sent = time.time()
    os.kill(pid, sig)
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=15.0, help="rollout.timeout_s of both runs")
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lpreg-bench-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [*WORKLOAD, f"trainer.total_steps={args.steps}", f"rollout.timeout_s={args.timeout}",
              *args.overrides]

    clean = Run("clean", common, out)
    if clean.finish() != 0:
        raise SystemExit(f"the clean run failed; see {clean.log_path}")

    faulted = Run("faulted", common, out)
    sent: dict[str, float] = {}
    faulted.wait(lambda: len(faulted.steps()) >= 3, "step 3")
    old, _ = faulted.actor_pid("rollout", "rollout-0")
    sent["rollout-kill"] = inject(faulted, "rollout", "rollout-0", signal.SIGKILL)
    faulted.wait(lambda: faulted.actor_pid("rollout", "rollout-0") not in ((old, "live"),)
                 and faulted.actor_pid("rollout", "rollout-0")[1] == "live", "rollout-0's replacement")
    old, _ = faulted.actor_pid("rollout", "rollout-1")
    sent["rollout-hang"] = inject(faulted, "rollout", "rollout-1", signal.SIGSTOP)
    faulted.wait(lambda: faulted.actor_pid("rollout", "rollout-1")[0] != old
                 and faulted.actor_pid("rollout", "rollout-1")[1] == "live", "rollout-1's replacement")
    faulted.wait(lambda: max((r["step"] for r in faulted.steps()), default=0) > 10, "a checkpoint")
    sent["learner-kill"] = inject(faulted, "learner", "learner-1", signal.SIGKILL)
    if faulted.finish() != 0:
        raise SystemExit(f"the faulted run failed; see {faulted.log_path}")

    result: dict = {"workload": " ".join(common), "faults": {}}
    for fault, at in sent.items():
        detected = faulted.log_time(DETECTED[fault], at)
        recovered = faulted.log_time(RECOVERED[fault], at)
        result["faults"][fault] = {
            "detect_s": None if detected is None else max(0.0, detected - at),
            "recover_s": None if recovered is None or detected is None else recovered - detected,
        }
    result["clean_training_s"] = training_seconds(clean, args.steps)
    result["faulted_training_s"] = training_seconds(faulted, args.steps)
    result["extra_s"] = result["faulted_training_s"] - result["clean_training_s"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"workload: {result['workload']}")
        print("(log lines carry whole seconds: detection and recovery are +-1 s)")
        for fault, numbers in result["faults"].items():
            print(f"{fault:<13} detect {numbers['detect_s']} s, recover {numbers['recover_s']} s")
        print(f"training time: clean {result['clean_training_s']:.1f} s, faulted "
              f"{result['faulted_training_s']:.1f} s, extra {result['extra_s']:.1f} s")
    print(f"runs and logs: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
