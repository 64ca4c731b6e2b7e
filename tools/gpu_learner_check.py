"""One learner step at real lengths on one device: peak memory and tokens/s, as JSON.

    python tools/gpu_learner_check.py [--json out.json]                 # GPU: Qwen3-1.7B shape
    python tools/gpu_learner_check.py --layers 2 --hidden 128 --heads 2 --kv-heads 1 \\
        --head-dim 64 --intermediate 256 --vocab 4096 --response-tokens 512 --prompt-tokens 32

The ``Learner`` actor class itself, without Ray: DeepSpeed ZeRO-3 at world size 1 (NCCL on
a GPU, gloo on CPU), gradient checkpointing, token-budget micro-batches and chunked logits,
on a randomly initialised model. The default shape is Qwen3-1.7B's as published in its
Hugging Face ``config.json`` (Qwen/Qwen3-1.7B): hidden 2048, 28 layers, 16 attention heads,
8 KV heads, head_dim 128, intermediate 6144, vocabulary 151,936, tied embeddings, RoPE theta
1e6. That gives 1.72 B parameters, 1.41 B outside the embedding, as the model card says
(1.7 B and 1.4 B): the script prints its count to check. bf16 weights by default.

Each loss (``--losses``, default lp_reg and ppo_clip) trains ``--steps`` steps on the same
batch of ``--sequences`` sequences of ``--prompt-tokens`` + ``--response-tokens`` random
tokens. Peak memory is ``torch.cuda.max_memory_allocated`` per loss on a GPU, the process
RSS high-water mark on CPU (which never goes down, so later losses read at least the
earlier peaks). The first step of the first loss also allocates the optimizer state.
Exit status 0 when every step made exactly one optimizer step per mini-batch and finite
metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape (default: Qwen3-1.7B)")
    shape.add_argument("--layers", type=int, default=28)
    shape.add_argument("--hidden", type=int, default=2048)
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--head-dim", type=int, default=128)
    shape.add_argument("--intermediate", type=int, default=6144)
    shape.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=8192)
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=32768)
    parser.add_argument("--logits-chunk-tokens", type=int, default=2048)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--losses", default="lp_reg,ppo_clip")
    parser.add_argument("--steps", type=int, default=1, help="learner steps per loss")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, directory: str) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(40_960, args.prompt_tokens + args.response_tokens),
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    model.save_pretrained(directory, safe_serialization=True)
    return {"parameters": total, "non_embedding_parameters": total - embedding}


def make_batch(args: argparse.Namespace):
    from learner.batch import build_train_batch
    from rollout.types import Sample

    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(args.sequences):
        prompt = torch.randint(3, args.vocab, (args.prompt_tokens,), generator=gen).tolist()
        response = torch.randint(3, args.vocab, (args.response_tokens,), generator=gen).tolist()
        samples.append(Sample(prompt_index=i // 2, prompt_token_ids=prompt, response_token_ids=response,
                              response_logprobs=[-1.0] * len(response), finish_reason="length",
                              weight_version=0, worker_index=0))
    advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(args.sequences)])
    return build_train_batch(samples, advantages, pad_token_id=0)


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
    from learner.actor import Learner, free_port
    from learner.batch import shard_for_learners

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = tempfile.mkdtemp(prefix="lpreg-learner-check-")
    start = time.perf_counter()
    sizes = build_model(args, work)
    print(json.dumps({"model": sizes, "build_s": round(time.perf_counter() - start, 1)}), flush=True)

    cfg = LearnerConfig(
        num_workers=1, zero_stage=args.zero_stage, micro_batch_size=1, lr=1e-6,
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        logits_chunk_tokens=args.logits_chunk_tokens)
    algo = AlgorithmConfig(loss="lp_reg", clip_ratio_low=1.0, clip_ratio_high=9.0)
    learner = Learner(0, 1, work, ModelConfig(path=work, dtype=args.dtype), cfg, algo,
                      temperature=1.0, seed=0, total_optimizer_steps=0)
    start = time.perf_counter()
    learner.setup("127.0.0.1", free_port())
    setup_s = time.perf_counter() - start

    batch = make_batch(args)
    tokens = int(batch.prompt_lengths.sum() + batch.response_lengths.sum())
    runs = []
    ok = True
    for loss in args.losses.split(","):
        learner.algo = AlgorithmConfig(loss=loss, clip_ratio_low=1.0, clip_ratio_high=9.0)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.steps):
            (shard,) = shard_for_learners(
                batch, 1, 1, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
            start = time.perf_counter()
            result = learner.train_step(shard)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            finite = all(math.isfinite(v) for v in result.metrics.values())
            ok = ok and finite and result.num_optimizer_steps == 1
            run = {
                "loss": loss, "step": step, "device": device, "dtype": args.dtype,
                "zero_stage": args.zero_stage, "seconds": round(seconds, 3),
                "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                "response_tokens_per_s": round(float(batch.num_tokens()) / seconds, 1),
                "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3),
                "micro_batches": len(shard.mini_batches[0]),
                "num_optimizer_steps": result.num_optimizer_steps,
                "metrics": {k: round(v, 6) for k, v in sorted(result.metrics.items())},
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
    report = {"ok": ok, "setup_s": round(setup_s, 1), "model": sizes, "args": vars(args), "runs": runs}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    print("learner check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
