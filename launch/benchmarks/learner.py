"""A learner update on long-tailed response lengths: count-based vs token-budget micro-batches.

RL responses are long-tailed: most are short, a few run to the length cap. Count-based
micro-batches pad every row to the longest response among them, so nearly every
micro-batch pays for a capped response in every row. Token-budget micro-batches
(``learner.max_tokens_per_micro_batch``) group sequences by length and pad each group only
to its own longest, so the work follows the real tokens and the memory follows the budget.

Variants, side by side on the same batch and the same tiny Qwen2-architecture model:
- ``count``: ``learner.micro_batch_size`` sequences per micro-batch (today's default);
- ``tokens``: a token budget;
- ``tokens+ckpt``: the same budget with gradient checkpointing.

Response lengths are lognormal (``--median``, ``--sigma``) capped at ``--cap``; prompts are
uniform in ``--prompt-min``..``--prompt-max``. One update is ``learner.step.train_on_shard``
on one rank with a plain torch AdamW step and gradient clipping: on one rank DeepSpeed
wraps the same backward and optimizer step, and what it adds does not depend on how the
micro-batches are cut, so the bench leaves it out.

Each variant runs in a fresh process: one warm-up update (which also allocates the
optimizer state), then ``--repeats`` timed updates. Time is the median over repeats, by
default this process's CPU time on CPU (other programs on a shared machine do not inflate
it) and wall time on CUDA. Peak memory on CPU is the resident-set high-water mark the timed
updates add over what the process held before them (``/proc/self/clear_refs`` resets it);
on CUDA it is ``torch.cuda.max_memory_allocated`` over the same updates minus the memory
held before.

Targets, reported and not asserted: the token budget at most 0.6x the count-based update
time, and peak memory that grows with the budget rather than with the longest response
times the micro-batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("count", "tokens", "tokens+ckpt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpreg bench learner", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sequences", type=int, default=32, help="sequences in the update")
    p.add_argument("--median", type=float, default=128.0, help="median response length")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of response lengths")
    p.add_argument("--cap", type=int, default=1024, help="longest response (the rollout's max tokens)")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per count-based micro-batch")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget per micro-batch")
    p.add_argument("--logits-chunk-tokens", type=int, default=0, help="chunked logits in every variant")
    p.add_argument("--loss", default="lp_reg")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2, help="head_dim = hidden / heads; CPU attention wants 64")
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--clock", choices=["wall", "process"], default=None,
                   help="default: process CPU time on CPU, wall time on CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def make_batch(args: argparse.Namespace):
    from learner.batch import build_train_batch
    from rollout.types import Sample

    gen = torch.Generator().manual_seed(args.seed)
    normal = torch.randn(args.sequences, generator=gen, dtype=torch.float64)
    lengths = (math.log(args.median) + args.sigma * normal).exp().round().clamp(1, args.cap).long()
    samples = []
    for i, length in enumerate(lengths.tolist()):
        prompt_length = int(torch.randint(args.prompt_min, args.prompt_max + 1, (1,), generator=gen))
        samples.append(Sample(
            prompt_index=i // 8,
            prompt_token_ids=torch.randint(3, args.vocab, (prompt_length,), generator=gen).tolist(),
            response_token_ids=torch.randint(3, args.vocab, (length,), generator=gen).tolist(),
            response_logprobs=[-2.0] * length, finish_reason="stop", weight_version=0,
            worker_index=0))
    advantages = torch.randn(args.sequences, generator=gen)
    return build_train_batch(samples, advantages, pad_token_id=0)


def make_model(args: argparse.Namespace, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.cap + args.prompt_max,
                         tie_word_embeddings=True, use_cache=False)
    model = Qwen2ForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """In a fresh process: median update time and the peak memory the updates add."""
    from conf.schema import AlgorithmConfig
    from learner.batch import padded_cost, shard_for_learners
    from learner.step import train_on_shard

    cuda = args.device.startswith("cuda")
    wall = (args.clock or ("wall" if cuda else "process")) == "wall"
    clock = time.perf_counter if wall else time.process_time
    model = make_model(args, checkpointing=variant == "tokens+ckpt")
    batch = make_batch(args)
    budget = 0 if variant == "count" else args.max_tokens
    (shard,) = shard_for_learners(batch, 1, 1, micro_batch_size=args.micro_batch_size,
                                  max_tokens_per_micro_batch=budget)
    micro_batches = shard.mini_batches[0]
    padded = sum(padded_cost(list(zip(m.prompt_lengths.tolist(), m.response_lengths.tolist(), strict=True)))
                 for m in micro_batches)
    algo = AlgorithmConfig(loss=args.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses: list[float] = []

    def backward(loss, boundary):
        losses.append(float(loss))
        loss.backward()

    def optimizer_step():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"actor/grad_norm": float(norm)}

    def update() -> dict:
        return train_on_shard(model, shard, algo, temperature=1.0, world_size=1, backward=backward,
                              optimizer_step=optimizer_step, logits_chunk_tokens=args.logits_chunk_tokens)

    first = update()  # warm-up; its loss and gradient norm are those of the same weights in every variant
    first_loss = sum(losses)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the high-water mark starts again from the current resident size
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        update()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else (_status_kib("VmHWM") - before) * 1024
    return {
        "variant": variant, "micro_batches": len(micro_batches),
        "real_tokens": sum(batch.sequence_lengths()),
        "padded_tokens": padded, "update_s": statistics.median(times), "times_s": times,
        "peak_memory_mib": peak / 2**20, "first_loss": first_loss,
        "first_grad_norm": first["actor/grad_norm"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_variant(args, args.child)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    lengths = make_batch(args).response_lengths.float()
    print(f"responses: {args.sequences}, median {lengths.median():.0f}, mean {lengths.mean():.0f}, "
          f"longest {lengths.max():.0f} (cap {args.cap}), "
          f"{sum(make_batch(args).sequence_lengths())} real tokens with prompts;  "
          f"micro_batch_size {args.micro_batch_size}, budget {args.max_tokens} tokens;  "
          f"torch {torch.__version__}, threads {args.threads}")
    results = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for variant in variants:
        cmd = [sys.executable, "-m", "launch.benchmarks.learner", *argv, "--child", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:12s} micro-batches {r['micro_batches']:3d}  padded tokens {r['padded_tokens']:7d}"
              f"  update {r['update_s']:7.3f} s  peak +{r['peak_memory_mib']:8.1f} MiB"
              f"  loss {r['first_loss']:+.6f}  grad norm {r['first_grad_norm']:.6f}")
    report: dict = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "results": results}
    if "count" in results:
        base = results["count"]
        for variant in (v for v in variants if v != "count"):
            r = results[variant]
            base_memory = base["peak_memory_mib"]
            ratios = {"time": r["update_s"] / base["update_s"],
                      "memory": r["peak_memory_mib"] / base_memory if base_memory else None}
            report[f"{variant}/count"] = ratios
            memory = f"{ratios['memory']:.2f}x" if ratios["memory"] is not None else "n/a"
            print(f"{variant} / count: time {ratios['time']:.2f}x (target <= 0.6x), peak memory {memory}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
