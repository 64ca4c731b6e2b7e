"""Token-watch metrics: how often chosen tokens are sampled, and at what probability.

A "reasoning spark" such as ``wait`` or ``however`` is a rare token; whether RL keeps it
alive shows in two numbers per step: its share of the sampled response tokens and the
probability the generating policy gave it when it was sampled (the rollout log-probs the
samples carry, so no extra pass). ``trainer.watch_tokens`` names the strings; each is
watched as the token the tokenizer makes of it, alone and after a space (a BPE tokenizer
has a separate token for `` wait``), and a string of several tokens by its first token.
"""

from __future__ import annotations

import torch

# Bin edges of the sampled-probability histograms (watch/<string>/prob_hist): finer in the
# tail, where a spark starts. Bin i holds probabilities in [edges[i-1], edges[i]).
WATCH_HIST_EDGES = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def watch_token_ids(tokenizer, strings: list[str]) -> dict[str, frozenset[int]]:
    """The token ids each string is watched as: the first token of the string and of the
    string after a space. A leading-space form whose first token is the space alone (a
    tokenizer that spells spaces as their own token) adds nothing."""
    def first(text: str) -> int | None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if ids else None

    space = first(" ")
    watched = {}
    for string in strings:
        ids = {first(string)}
        if not string.startswith(" "):
            spaced = first(" " + string)
            if spaced != space:
                ids.add(spaced)
        watched[string] = frozenset(i for i in ids if i is not None)
    return watched


def _sampled_tokens(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's own response tokens of all samples and their sampled log-probs, flat;
    tool observations (mask 0) are left out."""
    ids, logprobs = [], []
    for s in samples:
        mask = getattr(s, "response_mask", None) or [1] * len(s.response_token_ids)
        for token, lp, keep in zip(s.response_token_ids, s.response_logprobs, mask, strict=True):
            if keep:
                ids.append(token)
                logprobs.append(lp)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(logprobs, dtype=torch.float64)


def watch_metrics(samples, watched: dict[str, frozenset[int]], histogram: bool = False) -> dict:
    """Per watched string: ``watch/<string>/sampled_frac``, its share of all sampled response
    tokens; ``watch/<string>/sampled_prob``, the mean probability it was sampled at (left out
    when it was not sampled); with ``histogram``, ``watch/<string>/prob_hist``, the counts of
    its sampled probabilities in the bins of ``WATCH_HIST_EDGES`` (a list, one more than the
    edges)."""
    if not watched:
        return {}
    ids, logprobs = _sampled_tokens(samples)
    total = max(1, ids.numel())
    probs = logprobs.exp()
    edges = torch.tensor(WATCH_HIST_EDGES, dtype=torch.float64)
    metrics: dict = {}
    for string, token_ids in watched.items():
        hit = torch.isin(ids, torch.tensor(sorted(token_ids), dtype=torch.long))
        count = int(hit.sum())
        metrics[f"watch/{string}/sampled_frac"] = count / total
        if count:
            metrics[f"watch/{string}/sampled_prob"] = float(probs[hit].mean())
        if histogram:
            bins = torch.bucketize(probs[hit], edges, right=True)
            metrics[f"watch/{string}/prob_hist"] = torch.bincount(
                bins, minlength=len(WATCH_HIST_EDGES) + 1).tolist()
    return metrics


def watch_hist_due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def hist_bin_labels() -> list[str]:
    """Readable names of the histogram's bins, for plots."""
    edges = (0.0, *WATCH_HIST_EDGES, 1.0)
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


__all__ = ["WATCH_HIST_EDGES", "hist_bin_labels", "watch_hist_due", "watch_metrics", "watch_token_ids"]
