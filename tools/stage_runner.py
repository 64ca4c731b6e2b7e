"""What the single-rank DeepSpeed checks in tools/ share: a tiny model, one check per ZeRO
stage, a JSON report and PASS/FAIL.

    run_stages(argv, doc, name, check_stage, passed) -> exit status

``check_stage(stage, dtype, model_dir, work_dir, port) -> dict`` runs one stage and
returns what it found; ``passed(run) -> bool`` judges it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable


def run_stages(argv: list[str] | None, doc: str | None, name: str,
               check_stage: Callable[[int, str, str, str, int], dict],
               passed: Callable[[dict], bool]) -> int:
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="0,3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from conf.schema import TinyModelConfig
    from launch.models.tiny_model import build_tiny_model
    from learner.actor import free_port

    work_dir = tempfile.mkdtemp(prefix="lpreg-check-")
    model_dir = str(build_tiny_model(os.path.join(work_dir, "tiny"), TinyModelConfig(warm_start_steps=0)))
    port = free_port()
    runs = []
    for stage in [int(s) for s in args.stages.split(",")]:
        run = check_stage(stage, args.dtype, model_dir, work_dir, port)
        print(json.dumps(run), flush=True)
        runs.append(run)
    ok = all(passed(run) for run in runs)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ok": ok, "runs": runs}, handle, indent=2)
    print(f"{name}:", "PASS" if ok else "FAIL")
    return 0 if ok else 1
