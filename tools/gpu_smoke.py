"""GPU smoke test of the learner side: DeepSpeed on NCCL, every ZeRO stage, both losses.

    python tools/gpu_smoke.py [--stages 0,2,3] [--dtype bfloat16] [--json out.json]

It needs one CUDA GPU, torch, transformers and deepspeed; it needs neither Ray nor vLLM.
Each ZeRO stage builds a fresh tiny Qwen2 model, wraps it in the same ``Learner`` the
Ray actors use, takes optimizer steps with ``ppo_clip`` and ``lp_reg`` on a sampled
batch, and checks that the loss is finite, the weights moved, and the weight export
(gathered under ZeRO-3) returns every parameter at its full shape.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def _batch(tokenizer, num_sequences: int, prompt_len: int, response_len: int, seed: int):
    from learner.batch import build_train_batch
    from rollout.types import Sample

    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    samples = []
    for i in range(num_sequences):
        length = int(torch.randint(1, response_len + 1, (1,), generator=gen))
        samples.append(Sample(
            prompt_index=i // 4,
            prompt_token_ids=torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(),
            response_token_ids=torch.randint(3, vocab, (length,), generator=gen).tolist(),
            response_logprobs=[-4.0] * length, finish_reason="stop", weight_version=0,
            worker_index=0))
    advantages = torch.randn(num_sequences, generator=gen)
    return build_train_batch(samples, advantages, tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="0,2,3")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="dry run on CPU (gloo) to check the script itself")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        raise SystemExit("gpu_smoke needs a CUDA GPU (or --allow-cpu for a dry run)")

    import deepspeed

    from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig, TinyModelConfig
    from launch.models.tiny_model import build_tiny_model, load_tiny_model
    from learner.actor import Learner, free_port
    from learner.batch import shard_for_learners

    model_dir = build_tiny_model(tempfile.mkdtemp() + "/tiny",
                                 TinyModelConfig(warm_start_steps=0))
    _, tokenizer = load_tiny_model(model_dir)
    report: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "runs": []}
    port = free_port()
    for stage in [int(s) for s in args.stages.split(",")]:
        for loss in ("ppo_clip", "lp_reg"):
            learner_cfg = LearnerConfig(num_workers=1, zero_stage=stage, micro_batch_size=8,
                                        lr=1e-3, dist_backend="auto")
            algo = AlgorithmConfig(loss=loss, lp_reg_neg_frac=0.05)
            learner = Learner(0, 1, str(model_dir), ModelConfig(dtype=args.dtype), learner_cfg,
                              algo, temperature=1.0, seed=0)
            # The process group persists across engines; init_distributed is a no-op after.
            learner.setup("127.0.0.1", port)
            backend = torch.distributed.get_backend()
            before = {n: t.float().clone() for n, t in learner.export_weights()}
            start = time.perf_counter()
            metrics = {}
            for step in range(args.steps):
                batch = _batch(tokenizer, 16, 12, 24, seed=step)
                metrics = learner.train_step(shard_for_learners(batch, 1, 1)[0]).metrics
            if on_gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            after = dict(learner.export_weights())
            moved = sum(not torch.equal(before[n], after[n].float()) for n in before)
            shapes_ok = all(before[n].shape == after[n].shape for n in before)
            run = {"zero_stage": stage, "loss": loss, "backend": backend,
                   "finite": all(v == v for v in metrics.values()),
                   "params_moved": f"{moved}/{len(before)}", "full_shapes": shapes_ok,
                   "seconds": round(seconds, 3),
                   "grad_norm": metrics.get("actor/grad_norm"),
                   "lp_reg/regularized_frac": metrics.get("lp_reg/regularized_frac")}
            print(json.dumps(run), flush=True)
            report["runs"].append(run)
            del learner
            if on_gpu:
                torch.cuda.empty_cache()
    ok = all(r["finite"] and r["full_shapes"] and not r["params_moved"].startswith("0/")
             and r["backend"] == ("nccl" if on_gpu else "gloo") for r in report["runs"])
    report["ok"] = ok
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    print("GPU smoke:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
