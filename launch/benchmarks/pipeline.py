"""Lock-step against generation overlapping training, on the same workload, in one invocation.

Each variant is a real ``lpreg train`` run in its own process (its own Ray, vLLM engines and
DeepSpeed learners) with the same model, prompts and seed; only the pipeline keys differ:

- ``lock-step``: ``rollout.max_staleness=0``;
- ``stale-1``: ``rollout.max_staleness=1``;
- ``stale-1-partial``: ``rollout.max_staleness=1 rollout.partial_rollout=true``.

Reported: the median ``timing/step_s`` after the warm-up steps, per variant and layout
(rollout workers + learners), and each variant's ratio to lock-step in the same layout.

    lpreg bench pipeline [--layouts 1+1,2+2] [--steps 12] [--warmup 2] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "lock-step": ["rollout.max_staleness=0"],
    "stale-1": ["rollout.max_staleness=1"],
    "stale-1-partial": ["rollout.max_staleness=1", "rollout.partial_rollout=true"],
}
# 16 prompts x 8 samples, at most 32 new tokens: the workload the lock-step loop was
# measured on against its peers. A random tiny model writes to the cap, so every step
# generates the same number of tokens.
WORKLOAD = [
    "data.prompts_per_step=16", "rollout.samples_per_prompt=8", "rollout.max_response_tokens=32",
    "model.tiny.warm_start_steps=0", "trainer.eval_every=-1", "trainer.progress_bar=false",
    "verifier.truncated_reward=null", "learner.micro_batch_size=64",
]


def run_variant(name: str, layout: tuple[int, int], steps: int, extra: list[str],
                out: Path) -> list[float]:
    rollout, learners = layout
    run_name = f"{name}-{rollout}x{learners}"
    cmd = [sys.executable, "-m", "launch.cli", "train", *WORKLOAD, *VARIANTS[name],
           f"rollout.num_workers={rollout}", f"learner.num_workers={learners}",
           f"trainer.total_steps={steps}", f"trainer.run_name={run_name}",
           f"trainer.output_dir={out / 'runs'}", f"model.cache_dir={out / 'models'}", *extra]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    with (out / f"{run_name}.log").open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{run_name} failed (exit {code}); see {out / (run_name + '.log')}")
    records = [json.loads(line) for line in (out / "runs" / run_name / "metrics.jsonl").open()]
    return [r["timing/step_s"] for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="1+1,2+2", help="rollout workers+learners, comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to every run, e.g. model.path=/models/x")
    args = parser.parse_args(argv)
    layouts = [tuple(int(x) for x in item.split("+")) for item in args.layouts.split(",")]
    variants = args.variants.split(",")
    out = Path(args.out or tempfile.mkdtemp(prefix="lpreg-bench-pipeline-"))
    out.mkdir(parents=True, exist_ok=True)

    result: dict = {"workload": " ".join(WORKLOAD + args.overrides), "steps": args.steps,
                    "warmup": args.warmup, "s_per_step": {}, "ratio_to_lock_step": {}}
    for layout in layouts:
        key = f"{layout[0]}+{layout[1]}"
        result["s_per_step"][key] = {}
        for name in variants:
            times = run_variant(name, layout, args.steps, args.overrides, out)
            result["s_per_step"][key][name] = statistics.median(times[args.warmup:])
            print(f"{key} {name}: {result['s_per_step'][key][name]:.3f} s/step", file=sys.stderr)
        base = result["s_per_step"][key].get("lock-step")
        if base:
            result["ratio_to_lock_step"][key] = {
                name: seconds / base for name, seconds in result["s_per_step"][key].items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"workload: {result['workload']}")
        print(f"median s/step over steps {args.warmup + 1}-{args.steps}")
        for key, by_variant in result["s_per_step"].items():
            for name, seconds in by_variant.items():
                ratio = result["ratio_to_lock_step"].get(key, {}).get(name)
                shown = f"  ({ratio:.2f}x lock-step)" if ratio is not None else ""
                print(f"{key:>5} {name:<16} {seconds:8.3f}{shown}")
    print(f"runs and logs: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
