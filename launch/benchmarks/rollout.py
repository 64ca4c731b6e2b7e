"""Rollout throughput: a RolloutWorker actor against vllm.LLM.generate called directly.

Both engines run in-process, on the same model, prompts, seeds and thread count. They
are measured in alternating rounds, never at the same time, so they do not contend for
the cores and slow drift of a shared machine hits both alike.

    lpreg bench rollout [--prompts 64] [--n 4] [--max-tokens 64] [--rounds 5] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

_ROUND_IDS = itertools.count()


def _direct_engine(model_path: str, cfg):
    from vllm import LLM

    return LLM(model=model_path, dtype="float32", seed=0,
               gpu_memory_utilization=cfg.gpu_memory_utilization,
               max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
               logprobs_mode="processed_logprobs")


def _direct_round(llm, prompt_ids, args) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens,
                            logprobs=0, seed=1)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _pool_round(pool, prompt_ids, args) -> tuple[float, int]:
    from rollout.types import GroupRequest, SamplingSettings

    sampling = SamplingSettings(samples_per_prompt=args.n, temperature=1.0, top_p=1.0,
                                max_response_tokens=args.max_tokens, seed=1)
    round_id = next(_ROUND_IDS)  # group ids are unique per run
    start = time.perf_counter()
    groups = pool.generate([GroupRequest(f"bench{round_id}-{i}", ids, sampling)
                            for i, ids in enumerate(prompt_ids)])
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.response_token_ids) for g in groups for s in g.samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a fresh tiny model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default="",
                        help="also time one step at these rollout worker counts, e.g. 1,2,3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Same threads for both engines: Ray gives a one-CPU actor one OpenMP thread, and
    # torch reads this only when it is first imported.
    os.environ["OMP_NUM_THREADS"] = "1"

    import ray
    from transformers import AutoTokenizer

    from conf.schema import ModelConfig, RolloutConfig, SyntheticTaskConfig, TinyModelConfig
    from launch.cluster.rollout_pool import RolloutPool
    from launch.data.synthetic import synthetic_problems
    from launch.models.tiny_model import build_tiny_model
    from rollout.worker import engine_env

    cfg = RolloutConfig(num_workers=1, samples_per_prompt=args.n, max_response_tokens=args.max_tokens,
                        cpus_per_worker=1)
    model_path = args.model or str(build_tiny_model(tempfile.mkdtemp() + "/tiny",
                                                    TinyModelConfig(warm_start_steps=0)))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [tokenizer(r.prompt)["input_ids"]
                  for r in synthetic_problems(SyntheticTaskConfig(), args.prompts, seed=0)]

    os.environ.update(engine_env(cfg))
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    pool = RolloutPool(1, model_path, ModelConfig(), cfg, seed=0)
    direct = _direct_engine(model_path, cfg)

    _direct_round(direct, prompt_ids, args)  # warm-up, both sides
    _pool_round(pool, prompt_ids, args)
    direct_tps, actor_tps = [], []
    for _ in range(args.rounds):
        seconds, tokens = _direct_round(direct, prompt_ids, args)
        direct_tps.append(tokens / seconds)
        seconds, tokens = _pool_round(pool, prompt_ids, args)
        actor_tps.append(tokens / seconds)
    pool.shutdown()
    del direct

    result = {
        "workload": f"{args.prompts} prompts x n={args.n}, max {args.max_tokens} tokens",
        "direct_llm_tokens_per_s": statistics.median(direct_tps),
        "rollout_worker_tokens_per_s": statistics.median(actor_tps),
    }
    result["ratio_worker_over_direct"] = (result["rollout_worker_tokens_per_s"]
                                          / result["direct_llm_tokens_per_s"])

    if args.workers:
        scaling = {}
        for count in [int(c) for c in args.workers.split(",")]:
            pool = RolloutPool(count, model_path, ModelConfig(), cfg, seed=0)
            _pool_round(pool, prompt_ids, args)  # warm-up
            times = [_pool_round(pool, prompt_ids, args)[0] for _ in range(args.rounds)]
            scaling[count] = statistics.median(times)
            pool.shutdown()
        result["rollout_s_per_step_by_workers"] = scaling
    ray.shutdown()

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"workload: {result['workload']}")
        print(f"vllm.LLM.generate directly : {result['direct_llm_tokens_per_s']:10.0f} tokens/s")
        print(f"RolloutWorker through Ray  : {result['rollout_worker_tokens_per_s']:10.0f} tokens/s")
        print(f"ratio                      : {result['ratio_worker_over_direct']:10.3f}")
        for count, seconds in result.get("rollout_s_per_step_by_workers", {}).items():
            print(f"{count} rollout worker(s)       : {seconds:10.3f} s per step")
    return 0
