"""Per-token statistics from the training forward pass, without a second B x L x V tensor.

``token_stats`` turns the response-position logits into what the losses need:

- ``log_prob``: log-prob of each sampled token at the sampling temperature, with grad;
- ``entropy``: entropy of the sampling distribution, with grad (entropy bonus, 80/20, metric);
- ``proxy_log_prob``: the Lp-Reg min-p proxy of the same logits, detached.

With ``top_p < 1`` the policy *is* vLLM's sampling distribution: temperature, then the top-p
set (``learner.top_p``), renormalised. All three outputs are of it: the log-prob and entropy
over the kept set, and the proxy is that distribution with min-p noise removed (the min-p
test compares each token with the most likely one, which renormalising does not change, so
its kept set is min-p's intersected with top-p's). That is also what the behaviour proxy
reads from vLLM's top-K log-probs, where tokens outside the set are listed at -inf. The kept
set is chosen without gradient; the gradient is the softmax's over the kept logits, and zero
on the others. The default ``top_p == 1`` takes none of these steps.

On the on-policy fast path the old log-probs are ``log_prob.detach()`` and the proxy comes
from the same logits, so Lp-Reg costs no extra forward pass.

How memory stays flat. One custom autograd function covers all three outputs. Its forward
walks the logits a chunk of positions at a time and keeps only per-token numbers (log-sum-exp
and entropy); it saves the logits themselves (which the caller already holds) instead of a
``log_softmax`` copy. Its backward recomputes each chunk's softmax and writes the gradient
straight into the one ``B x L x V`` gradient tensor autograd needs anyway. Compare with
``log_softmax(...).gather(...)``: that keeps a full ``log_softmax`` output alive until backward
and its backward builds two more full-size tensors (scatter of the gather, softmax term).

For long sequences even one ``B x L x V`` logits tensor is too much: ``head_token_stats``
starts from the final hidden states instead and runs the output projection and
``token_stats`` a chunk of positions at a time, forward and backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.proxy import (
    check_min_p,
    compute_dtype,
    default_chunk_size,
    iter_chunks,
    proxy_from_shifted,
)
from learner.top_p import top_p_cut, top_p_floor, top_p_keep

__all__ = ["TokenStats", "head_token_stats", "token_stats"]


@dataclass
class TokenStats:
    log_prob: Tensor  # (B, L), grad flows to the logits
    entropy: Tensor | None  # (B, L), grad flows to the logits; None unless asked for
    proxy_log_prob: Tensor | None  # (B, L), detached; -inf where min-p filtered the token


def _forward(
    logits: Tensor,
    ids: Tensor,
    temperature: float,
    compute_entropy: bool,
    kappa: float | None,
    proxy_temperature: float,
    chunk_size: int,
    cut: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Chunked pass: returns flat (log_prob, lse, entropy, proxy, floor); lse is of logits / T.

    ``cut``: ``top_p_cut(top_p)``, or None for no top-p; ``floor`` (None without top-p) is
    each position's top-p floor, what the backward needs to form the same kept set.
    """
    dtype = compute_dtype(logits.dtype)
    n = ids.numel()
    new = {"dtype": dtype, "device": logits.device}
    log_prob, lse = torch.empty(n, **new), torch.empty(n, **new)
    entropy = torch.empty(n, **new) if compute_entropy else None
    proxy = torch.empty(n, **new) if kappa is not None else None
    floor = torch.empty(n, **new) if cut is not None else None
    keep = None
    for chunk, start, stop in iter_chunks(logits, chunk_size):
        tok = ids[start:stop]
        # At T = 1 the subtraction itself promotes bf16/fp16 logits: no float32 copy of the chunk.
        x = chunk if temperature == 1.0 else chunk.to(dtype) / temperature
        if cut is not None:
            # vLLM forms the set from float32 logits / T; the largest is always kept, so
            # the row maximum below is the kept set's too.
            x = x.to(dtype)
            floor[start:stop] = top_p_floor(x, cut)
            keep = top_p_keep(x, floor[start:stop], tok)
        row_max = x.amax(-1, keepdim=True).to(dtype)
        shifted = x - row_max
        exp_shifted = shifted.exp()
        if keep is not None:
            exp_shifted.masked_fill_(~keep, 0.0)
        log_norm = exp_shifted.sum(-1).log()  # log sum exp(x - max)
        lse[start:stop] = row_max.squeeze(-1) + log_norm
        log_prob[start:stop] = shifted.gather(-1, tok[:, None]).squeeze(-1) - log_norm
        if entropy is not None:
            # H = log Z - E_p[x - max]; the batched dot avoids another chunk temporary.
            expected = torch.einsum("nv,nv->n", exp_shifted, shifted) / log_norm.exp()
            entropy[start:stop] = log_norm - expected
        if proxy is not None:
            if temperature == 1.0:
                if keep is not None:
                    # Outside the top-p set: no weight in the proxy either.
                    shifted = shifted.masked_fill_(~keep, -math.inf)
                # exp_shifted is no longer needed: the proxy may overwrite it.
                proxy[start:stop] = proxy_from_shifted(
                    shifted, tok, kappa, proxy_temperature, exp_shifted
                )
            else:
                # The min-p threshold is at temperature 1.
                raw_shifted = chunk - chunk.amax(-1, keepdim=True).to(dtype)
                if keep is not None:
                    raw_shifted = raw_shifted.masked_fill_(~keep, -math.inf)
                proxy[start:stop] = proxy_from_shifted(raw_shifted, tok, kappa, proxy_temperature)
    return log_prob, lse, entropy, proxy, floor


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, compute_entropy, kappa, proxy_temperature, chunk_size,
                cut):
        log_prob, lse, entropy, proxy, floor = _forward(
            logits, ids, temperature, compute_entropy, kappa, proxy_temperature, chunk_size, cut
        )
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.save_for_backward(logits, ids, lse, entropy, floor)
        empty = log_prob.new_empty(0)
        entropy = empty if entropy is None else entropy
        proxy = empty.clone() if proxy is None else proxy
        ctx.mark_non_differentiable(proxy)
        return log_prob, entropy, proxy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy, _grad_proxy):
        logits, ids, lse, entropy, floor = ctx.saved_tensors
        if grad_log_prob is None and grad_entropy is None:
            return (None,) * 8
        temperature = ctx.temperature
        dtype = compute_dtype(logits.dtype)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad_logits.view(-1, logits.shape[-1])
        if grad_log_prob is None:
            grad_log_prob = torch.zeros_like(lse)
        for chunk, start, stop in iter_chunks(logits, ctx.chunk_size):
            x = chunk if temperature == 1.0 else chunk.to(dtype) / temperature
            g_lp = grad_log_prob[start:stop, None].to(dtype)
            log_p = x - lse[start:stop, None]  # fresh (promoted) temporary, safe to modify in place
            # Top-p: p is 0 outside the kept set (the same set as forward's: same floor, same x).
            dropped = None if floor is None else ~top_p_keep(x, floor[start:stop], ids[start:stop])
            # d log p_tok / dx = onehot(tok) - p ;  dH/dx = -p * (log p + H)
            if grad_entropy is None:
                grad = log_p.exp_()
                if dropped is not None:
                    grad.masked_fill_(dropped, 0.0)
                grad = grad.mul_(-g_lp)
            else:
                p = log_p.exp()
                if dropped is not None:
                    p.masked_fill_(dropped, 0.0)
                g_h = grad_entropy[start:stop, None].to(dtype)
                entropy_term = log_p.add_(entropy[start:stop, None]).mul_(p).mul_(g_h)
                grad = p.mul_(-g_lp).sub_(entropy_term)
            grad.scatter_add_(-1, ids[start:stop, None], g_lp)
            if temperature != 1.0:
                grad /= temperature
            grad_rows[start:stop] = grad
        return grad_logits, None, None, None, None, None, None, None


def token_stats(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    proxy_min_p: float | None = None,
    proxy_temperature: float = 1.0,
    compute_entropy: bool = True,
    chunk_size: int | None = None,
    top_p: float = 1.0,
) -> TokenStats:
    """Log-probs, entropy and min-p proxy of the sampled tokens, chunk-wise along positions.

    Args:
        logits: ``(..., V)`` raw logits at the response positions (any float dtype).
        token_ids: ``(...)`` sampled tokens. Masked positions may hold any id; negative ids
            are read as 0 (their outputs are meaningless and must be masked by the caller).
        temperature: sampling temperature; log-probs and entropy are of ``softmax(logits / T)``.
        proxy_min_p: kappa of the min-p proxy; None skips it.
        proxy_temperature: temperature of the renormalised proxy (threshold is at T = 1).
        compute_entropy: entropy is one extra dot product per position when on.
        chunk_size: positions per chunk; default ``learner.proxy.default_chunk_size``.
        top_p: vLLM's top-p; below 1 every output is of the distribution vLLM sampled from,
            ``softmax(logits / T)`` renormalised over its top-p set (``learner.top_p``; the
            sampled token always counts as kept, so its log-prob is never -inf). It costs a
            sort of each chunk in the forward pass; the backward reuses each position's floor.

    Outputs are float32 (float64 for float64 logits) of shape ``token_ids.shape``.
    Memory beyond the logits: a few ``chunk_size x V`` temporaries and per-token vectors in
    forward; in backward, the gradient of the logits plus the same temporaries.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and token_ids {tuple(token_ids.shape)} do not match")
    if temperature <= 0 or proxy_temperature <= 0:
        raise ValueError("temperatures must be positive")
    kappa = None if proxy_min_p is None else check_min_p(proxy_min_p)
    cut = None if top_p == 1.0 else top_p_cut(top_p)
    chunk_size = chunk_size or default_chunk_size(logits.shape[-1], logits.device)
    ids = token_ids.reshape(-1).clamp(min=0)
    shape = token_ids.shape
    if torch.is_grad_enabled() and logits.requires_grad:
        log_prob, entropy, proxy = _TokenStatsFn.apply(
            logits, ids, float(temperature), compute_entropy, kappa, float(proxy_temperature), chunk_size,
            cut,
        )
        entropy = entropy if compute_entropy else None
        proxy = proxy if kappa is not None else None
    else:
        log_prob, _, entropy, proxy, _ = _forward(
            logits.detach(), ids, float(temperature), compute_entropy, kappa,
            float(proxy_temperature), chunk_size, cut,
        )
    return TokenStats(
        log_prob=log_prob.view(shape),
        entropy=None if entropy is None else entropy.view(shape),
        proxy_log_prob=None if proxy is None else proxy.view(shape),
    )


def _head_chunk_stats(
    hidden: Tensor,
    head: torch.nn.Module,
    ids: Tensor,
    temperature: float,
    proxy_min_p: float | None,
    proxy_temperature: float,
    compute_entropy: bool,
    top_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    stats = token_stats(head(hidden), ids, temperature=temperature, proxy_min_p=proxy_min_p,
                        proxy_temperature=proxy_temperature, compute_entropy=compute_entropy,
                        top_p=top_p)
    empty = stats.log_prob.new_empty(0)
    return (stats.log_prob,
            empty if stats.entropy is None else stats.entropy,
            empty if stats.proxy_log_prob is None else stats.proxy_log_prob)


def head_token_stats(
    hidden: Tensor,
    head: torch.nn.Module,
    token_ids: Tensor,
    *,
    chunk_tokens: int,
    temperature: float = 1.0,
    proxy_min_p: float | None = None,
    proxy_temperature: float = 1.0,
    compute_entropy: bool = True,
    top_p: float = 1.0,
) -> TokenStats:
    """``token_stats`` of ``head(hidden)``, never holding more than ``chunk_tokens`` rows of logits.

    ``hidden``: ``(N, H)`` final hidden states at the positions that predict ``token_ids``
    (``(N,)``); ``head``: the output projection (``model.get_output_embeddings()``), called as a
    module so that ZeRO-3 gathers its weight. Each chunk of positions goes through the head
    and ``token_stats`` under ``torch.utils.checkpoint``: the forward keeps only per-token
    numbers, and the backward recomputes one chunk's logits at a time. The cost is one more
    projection per chunk; the saving is the ``N x V`` logits and their gradient. ``top_p``
    as in ``token_stats``: each position's kept set depends on its own logits only, so
    chunking changes nothing.
    """
    from torch.utils.checkpoint import checkpoint

    if hidden.dim() != 2 or token_ids.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and token_ids {tuple(token_ids.shape)} do not match")
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    args = (float(temperature), proxy_min_p, float(proxy_temperature), compute_entropy, float(top_p))
    track = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, ids = hidden[start:start + chunk_tokens], token_ids[start:start + chunk_tokens]
        if track:
            parts.append(checkpoint(_head_chunk_stats, chunk, head, ids, *args, use_reentrant=False))
        else:
            parts.append(_head_chunk_stats(chunk, head, ids, *args))
    if not parts:
        dtype = compute_dtype(hidden.dtype)
        empty = hidden.new_empty(0, dtype=dtype)
        parts = [(empty, empty, empty)]
    log_prob, entropy, proxy = (torch.cat(column) for column in zip(*parts, strict=True))
    return TokenStats(
        log_prob=log_prob,
        entropy=entropy if compute_entropy else None,
        proxy_log_prob=proxy if proxy_min_p is not None else None,
    )
