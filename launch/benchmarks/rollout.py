"""Rollout throughput: a RolloutWorker actor against vllm.LLM.generate called directly.

Both engines run on the same model, prompts, seeds, thread count and sampling settings:
temperature, top-p, the same log-probs (the sampled token's, plus the top K with
--top-logprobs), the same answer length. They are measured in alternating rounds of one
run, never at the same time, so they do not contend for the cores and slow drift of a
shared machine hits both alike.

    lpreg bench rollout [--model DIR] [--prompts 8] [--n 4] [--max-tokens 256]
                        [--max-model-len N] [--top-logprobs 0] [--rounds 3] [--workers 1,2,3]

Without --model it builds a random tiny model (head_dim 64, as CPU attention needs) whose
context fits the prompts plus --max-tokens, and which has no end-of-sequence token: every
answer on both sides runs to exactly --max-tokens, as ``ignore_eos`` would make it (the
rollout worker has no such setting). For 2,048-token answers, on two cores:

    lpreg bench rollout --max-tokens 2048

A model given with --model stops at its own end-of-sequence token, on both sides alike;
the mean answer length of each side is reported. --max-model-len defaults to the model's
``max_position_embeddings``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

_ROUND_IDS = itertools.count()
WARM_UP_TOKENS = 32  # a short first round loads what both engines load lazily


def build_endless_model(output_dir: Path, max_position_embeddings: int) -> Path:
    """A random tiny model that never stops early: its end-of-sequence token is an ordinary
    token, so answers run to max tokens in both engines without ``ignore_eos``."""
    from conf.schema import TinyModelConfig
    from launch.models.tiny_model import build_tiny_model

    path = build_tiny_model(output_dir, TinyModelConfig(
        warm_start_steps=0, max_position_embeddings=max_position_embeddings))
    # vLLM stops at the tokenizer's end-of-sequence token and at the generation config's.
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):
        settings = json.loads((path / name).read_text())
        settings[key] = None
        (path / name).write_text(json.dumps(settings, indent=2))
    return path


def _direct_engine(model_path: str, cfg):
    from vllm import LLM

    # The engine arguments the rollout worker gives its own LLM.
    return LLM(model=model_path, dtype="float32", seed=0,
               gpu_memory_utilization=cfg.gpu_memory_utilization,
               max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
               max_logprobs=max(20, cfg.top_logprobs), enforce_eager=cfg.enforce_eager,
               logprobs_mode="processed_logprobs")


def _direct_round(llm, prompt_ids, args, max_tokens: int) -> tuple[float, int]:
    from vllm import SamplingParams

    # What the rollout worker asks for each sample; n samples with seed s give sample j
    # the seed s + j, as the worker does.
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=1,
                            logprobs=args.top_logprobs, flat_logprobs=True,
                            detokenize=args.top_logprobs == 0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _pool_round(pool, prompt_ids, args, max_tokens: int) -> tuple[float, int]:
    from rollout.types import GroupRequest, SamplingSettings

    sampling = SamplingSettings(samples_per_prompt=args.n, temperature=1.0, top_p=1.0,
                                max_response_tokens=max_tokens, seed=1)
    round_id = next(_ROUND_IDS)  # group ids are unique per run
    start = time.perf_counter()
    groups = pool.generate([GroupRequest(pool.group_id(f"bench{round_id}-{i}"), ids, sampling)
                            for i, ids in enumerate(prompt_ids)])
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.response_token_ids) for g in groups for s in g.samples)


def _prompt_ids(tokenizer, count: int) -> list[list[int]]:
    from conf.schema import SyntheticTaskConfig
    from launch.data.synthetic import synthetic_problems

    return [tokenizer(r.prompt)["input_ids"]
            for r in synthetic_problems(SyntheticTaskConfig(), count, seed=0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random tiny model "
                                        "that never stops before --max-tokens)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length")
    parser.add_argument("--max-model-len", type=int,
                        help="engine context (default: the model's max_position_embeddings)")
    parser.add_argument("--top-logprobs", type=int, default=0,
                        help="also the K most likely tokens' log-probs at each position")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="",
                        help="also time one step at these rollout worker counts, e.g. 1,2,3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Same threads for both engines: Ray gives a one-CPU actor one OpenMP thread, and
    # torch reads this only when it is first imported.
    os.environ["OMP_NUM_THREADS"] = "1"

    from transformers import AutoConfig, AutoTokenizer

    from launch.models.tiny_model import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="lpreg-bench-") as scratch:
        if args.model:
            model_path = args.model
        else:
            longest_prompt = max(map(len, _prompt_ids(build_tokenizer(), args.prompts)))
            model_path = str(build_endless_model(Path(scratch) / "endless",
                                                 longest_prompt + args.max_tokens))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompt_ids = _prompt_ids(tokenizer, args.prompts)
        max_model_len = (args.max_model_len
                         or AutoConfig.from_pretrained(model_path).max_position_embeddings)
        needed = max(map(len, prompt_ids)) + args.max_tokens
        if needed > max_model_len:
            parser.error(f"prompts plus --max-tokens need {needed} positions; the model "
                         f"takes {max_model_len}")
        result = _measure(model_path, prompt_ids, max_model_len, args)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"workload: {result['workload']}")
        print(f"vllm.LLM.generate directly : {result['direct_llm_tokens_per_s']:10.0f} tokens/s"
              f"  ({result['direct_llm_tokens_per_answer']:.0f} tokens per answer)")
        print(f"RolloutWorker through Ray  : {result['rollout_worker_tokens_per_s']:10.0f} tokens/s"
              f"  ({result['rollout_worker_tokens_per_answer']:.0f} tokens per answer)")
        print(f"ratio                      : {result['ratio_worker_over_direct']:10.3f}")
        for count, seconds in result.get("rollout_s_per_step_by_workers", {}).items():
            print(f"{count} rollout worker(s)       : {seconds:10.3f} s per step")
    return 0


def _measure(model_path: str, prompt_ids: list[list[int]], max_model_len: int, args) -> dict:
    import ray

    from conf.schema import ModelConfig, RolloutConfig
    from launch.cluster.rollout_pool import RolloutPool
    from rollout.worker import engine_env

    cfg = RolloutConfig(num_workers=1, samples_per_prompt=args.n, max_response_tokens=args.max_tokens,
                        cpus_per_worker=1, max_model_len=max_model_len,
                        top_logprobs=args.top_logprobs)
    os.environ.update(engine_env(cfg))
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    pool = RolloutPool(1, model_path, ModelConfig(), cfg, seed=0)
    direct = _direct_engine(model_path, cfg)

    _direct_round(direct, prompt_ids, args, WARM_UP_TOKENS)
    _pool_round(pool, prompt_ids, args, WARM_UP_TOKENS)
    direct_tps, actor_tps, direct_tokens, actor_tokens = [], [], 0, 0
    for _ in range(args.rounds):
        seconds, tokens = _direct_round(direct, prompt_ids, args, args.max_tokens)
        direct_tps.append(tokens / seconds)
        direct_tokens += tokens
        seconds, tokens = _pool_round(pool, prompt_ids, args, args.max_tokens)
        actor_tps.append(tokens / seconds)
        actor_tokens += tokens
    pool.shutdown()
    del direct

    answers = args.rounds * len(prompt_ids) * args.n
    result = {
        "workload": f"{len(prompt_ids)} prompts x n={args.n}, max {args.max_tokens} tokens, "
                    f"top-{args.top_logprobs} log-probs, max_model_len {max_model_len}",
        "direct_llm_tokens_per_s": statistics.median(direct_tps),
        "rollout_worker_tokens_per_s": statistics.median(actor_tps),
        "direct_llm_tokens_per_answer": direct_tokens / answers,
        "rollout_worker_tokens_per_answer": actor_tokens / answers,
        # Every round, to see how much the neighbours on a shared machine moved them.
        "direct_llm_tokens_per_s_by_round": direct_tps,
        "rollout_worker_tokens_per_s_by_round": actor_tps,
    }
    result["ratio_worker_over_direct"] = (result["rollout_worker_tokens_per_s"]
                                          / result["direct_llm_tokens_per_s"])

    if args.workers:
        scaling = {}
        for count in [int(c) for c in args.workers.split(",")]:
            pool = RolloutPool(count, model_path, ModelConfig(), cfg, seed=0)
            _pool_round(pool, prompt_ids, args, WARM_UP_TOKENS)
            times = [_pool_round(pool, prompt_ids, args, args.max_tokens)[0]
                     for _ in range(args.rounds)]
            scaling[count] = statistics.median(times)
            pool.shutdown()
        result["rollout_s_per_step_by_workers"] = scaling
    ray.shutdown()
    return result
