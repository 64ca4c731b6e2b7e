"""What the single-rank DeepSpeed checks in tools/ share: a tiny model, one check per ZeRO
stage, a JSON report and PASS/FAIL.

    run_stages(argv, doc, name, check_stage, passed) -> exit status
    random_batch(tokenizer, seed) -> a small ragged training batch of random tokens

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


def random_batch(tokenizer, seed: int):
    """Eight random responses of 2-9 tokens to 6-token prompts, in two GRPO groups."""
    import torch

    from learner.batch import build_train_batch
    from rollout.types import Sample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        length = int(torch.randint(2, 10, (1,), generator=gen))
        samples.append(Sample(
            prompt_index=i // 4,
            prompt_token_ids=torch.randint(3, len(tokenizer), (6,), generator=gen).tolist(),
            response_token_ids=torch.randint(3, len(tokenizer), (length,), generator=gen).tolist(),
            response_logprobs=[-4.0] * length, finish_reason="stop", weight_version=0,
            worker_index=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    return build_train_batch(samples, advantages, tokenizer.pad_token_id)
