"""How well the behaviour proxy stands in for the exact one: Lp-Reg's decisions, compared.

With ``algorithm.stale_policy=behaviour`` the learner takes Lp-Reg's min-p proxy from what
vLLM reported while it generated: the top-K log-probs at each position and the sampled
token's own (``learner.proxy.top_k_proxy_log_prob``). This benchmark generates answers with
vLLM, then computes the exact proxy from the full logits of the same weights (transformers)
and counts, over every response token:

- how often the two agree on kept / filtered (the min-p filter's verdict on the sampled token);
- how far they agree on the regularised set: the tokens Lp-Reg acts on, the lowest-probability
  fraction ``rho`` of the negative-advantage tokens that the proxy rates above the policy.

Two behaviour proxies are compared for each K: from the top K only (an unlisted sampled
token reads as filtered), and with the sampled token's own log-prob joining the K, which is
what the learner uses.

    lpreg bench proxy [--top-logprobs 5,20] [--prompts 64] [key=value ...]

Overrides are config keys, as for ``lpreg train``: the model (``model.path``; the demo's
tiny model by default, built if missing), ``rollout.temperature``, ``rollout.top_p``,
``rollout.samples_per_prompt``, ``rollout.max_response_tokens``, ``algorithm.lp_reg_min_p``,
``algorithm.lp_reg_temperature`` and ``algorithm.lp_reg_neg_frac``.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def _top_lists(position_logprobs: dict, k: int) -> tuple[list[int], list[float]]:
    """The K most likely tokens at one position, most likely first, from vLLM's dict."""
    ranked = sorted(((entry.rank, token, entry.logprob) for token, entry in position_logprobs.items()
                     if entry.rank is not None and entry.rank <= k))
    return [token for _, token, _ in ranked], [logprob for _, _, logprob in ranked]


def regularized_set(log_prob, proxy, negative, rho: float):
    """Lp-Reg's targets over the whole batch: the ``floor(rho * N_neg)`` lowest-probability
    negative-advantage tokens (none when fewer than 2) that the proxy rates above the policy."""
    import torch

    from learner.losses import lp_reg_k

    selected = torch.zeros_like(negative)
    count = lp_reg_k(int(negative.sum()), rho)
    if count:
        candidates = torch.where(negative, log_prob, torch.full_like(log_prob, math.inf))
        selected[torch.topk(candidates, count, largest=False).indices] = True
    return selected & (log_prob < proxy)


def agreement(exact_proxy, behaviour_proxy, log_prob, negative, rho: float) -> dict[str, float]:
    from learner.proxy import FILTERED_LOG_PROB

    kept_exact = exact_proxy > FILTERED_LOG_PROB
    kept_behaviour = behaviour_proxy > FILTERED_LOG_PROB
    reg_exact = regularized_set(log_prob, exact_proxy, negative, rho)
    reg_behaviour = regularized_set(log_prob, behaviour_proxy, negative, rho)
    union = int((reg_exact | reg_behaviour).sum())
    both = int((reg_exact & reg_behaviour).sum())
    return {
        "kept_agreement": float((kept_exact == kept_behaviour).double().mean()),
        "regularized_exact": int(reg_exact.sum()),
        "regularized_behaviour": int(reg_behaviour.sum()),
        "regularized_both": both,
        "regularized_jaccard": both / union if union else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-logprobs", default="5,20", help="the K values to compare, e.g. 5,20")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from conf.load import load_config
    from launch.data.prepare import prompt_token_ids
    from launch.data.synthetic import synthetic_problems
    from launch.models.resolve import resolve_model_path
    from learner.advantages import compute_advantages
    from learner.proxy import min_p_proxy_log_prob, top_k_proxy_log_prob
    from verifier import MathVerifier

    cfg = load_config(overrides=args.overrides)
    top_ks = sorted({int(k) for k in args.top_logprobs.split(",") if k.strip()})
    if not top_ks or top_ks[0] < 1:
        parser.error("--top-logprobs: positive integers, e.g. 5,20")
    algo, rollout = cfg.algorithm, cfg.rollout
    model_path = resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    records = synthetic_problems(cfg.data.synthetic, args.prompts, seed=args.seed + 1)
    prompts = [prompt_token_ids(tokenizer, r, cfg.data.chat_template) for r in records]

    llm = LLM(model=model_path, dtype="float32", seed=args.seed, max_logprobs=max(top_ks),
              gpu_memory_utilization=rollout.gpu_memory_utilization,
              max_model_len=rollout.max_model_len, enforce_eager=rollout.enforce_eager,
              logprobs_mode="processed_logprobs")
    params = SamplingParams(n=rollout.samples_per_prompt, temperature=rollout.temperature,
                            top_p=rollout.top_p, max_tokens=rollout.max_response_tokens,
                            seed=args.seed, logprobs=max(top_ks))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    samples = [(prompt, out) for prompt, request in zip(prompts, outputs, strict=True)
               for out in request.outputs]
    answers = [r.answer for r, request in zip(records, outputs, strict=True) for _ in request.outputs]

    verifier = MathVerifier.from_config(cfg.verifier)
    try:
        scores = torch.tensor(verifier.score_batch([o.text for _, o in samples], answers))
    finally:
        verifier.close()
    group = torch.arange(len(records)).repeat_interleave(rollout.samples_per_prompt)
    advantages = compute_advantages("grpo", scores, group)

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    log_prob, exact, negative, per_k = [], [], [], {k: ([], [], []) for k in top_ks}
    with torch.no_grad():
        for (prompt, out), advantage in zip(samples, advantages.tolist(), strict=True):
            response = list(out.token_ids)
            if not response:
                continue
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
            tokens = torch.tensor(response)
            scaled = logits / rollout.temperature
            log_prob.append(torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0])
            exact.append(min_p_proxy_log_prob(logits, tokens, algo.lp_reg_min_p,
                                              algo.lp_reg_temperature))
            negative.append(torch.full((len(response),), advantage < 0))
            sampled = torch.tensor([pos[t].logprob for pos, t in zip(out.logprobs, response, strict=True)],
                                   dtype=torch.float64)
            for k in top_ks:
                lists = [_top_lists(pos, k) for pos in out.logprobs]
                top_ids = torch.tensor([ids_ for ids_, _ in lists])
                top_lp = torch.tensor([lp for _, lp in lists], dtype=torch.float64)
                without, _ = top_k_proxy_log_prob(top_lp, top_ids, tokens, algo.lp_reg_min_p,
                                                  algo.lp_reg_temperature, rollout.temperature)
                with_sampled, _ = top_k_proxy_log_prob(top_lp, top_ids, tokens, algo.lp_reg_min_p,
                                                       algo.lp_reg_temperature, rollout.temperature,
                                                       sampled_log_probs=sampled)
                for store, value in zip(per_k[k], (without, with_sampled, sampled), strict=True):
                    store.append(value)
    log_prob, exact, negative = torch.cat(log_prob), torch.cat(exact), torch.cat(negative)
    rho = algo.lp_reg_neg_frac
    report = {"model": model_path, "tokens": int(log_prob.numel()),
              "negative_tokens": int(negative.sum()), "rho": rho, "kappa": algo.lp_reg_min_p,
              "filtered_frac_exact": float((exact <= -1e3).double().mean()),
              "vllm_vs_learner_max_abs_diff": float((torch.cat(per_k[top_ks[0]][2]) - log_prob).abs().max()),
              "top_k": {}}
    for k in top_ks:
        without, with_sampled = torch.cat(per_k[k][0]), torch.cat(per_k[k][1])
        report["top_k"][str(k)] = {
            "top_k_only": agreement(exact, without, log_prob, negative, rho),
            "with_sampled_token": agreement(exact, with_sampled, log_prob, negative, rho)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['tokens']} response tokens ({report['negative_tokens']} with negative advantage), "
          f"rho={rho}, kappa={algo.lp_reg_min_p}; exact proxy filters "
          f"{100 * report['filtered_frac_exact']:.1f}% of sampled tokens")
    print(f"{'K':>3}  {'behaviour proxy':<20} {'kept/filtered agree':>20} "
          f"{'regularised: exact / behaviour / both':>38} {'Jaccard':>8}")
    for k in top_ks:
        for name, label in (("top_k_only", "top-K only"), ("with_sampled_token", "top-K + sampled")):
            a = report["top_k"][str(k)][name]
            counts = f"{a['regularized_exact']} / {a['regularized_behaviour']} / {a['regularized_both']}"
            print(f"{k:>3}  {label:<20} {100 * a['kept_agreement']:>19.2f}% {counts:>38} "
                  f"{a['regularized_jaccard']:>8.3f}")
    return 0
