"""Policy losses: PPO-clip (GRPO, Clip-Higher), Lp-Reg, GSPO, KL-Cov, Clip-Cov, 80/20.

All tensors are ``(batch, length)`` and token-level; ``response_mask`` marks the response
tokens that count. Every loss builds a per-token loss matrix and aggregates it with
``aggregate_loss``; an entropy bonus can be added to any of them.

Lp-Reg (Huang et al., 2025). Among valid tokens with negative advantage, take the
``k = floor(neg_frac * N_neg)`` tokens with the lowest current log-prob (only when k >= 2),
and keep those the min-p proxy rates *higher* than the policy does (``log_prob <
proxy_log_prob``; a token the filter removed has proxy -inf and never qualifies). Those
tokens get

    -A * r + kl_coef * KL(proxy || pi_theta),     r = exp(log_prob - old_log_prob) unclipped,

and every other token the PPO clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.
The KL pulls rare-but-plausible tokens ("reasoning sparks") back towards the proxy instead of
letting negative advantages drive them to zero; its gradient flows through ``log_prob`` only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learner.proxy import FILTERED_LOG_PROB

__all__ = [
    "AGG_MODES",
    "KL_TYPES",
    "POLICY_LOSSES",
    "aggregate_loss",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
]

POLICY_LOSSES = ("ppo_clip", "lp_reg", "gspo", "kl_cov", "clip_cov", "entropy_8020")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3")

LOW_PROB = 0.1  # actor/low_prob_frac counts sampled tokens below this probability


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over ``mask``; 0 when the mask is empty."""
    if not values.is_floating_point():
        values = values.to(torch.float32)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL between the policy (``log_prob``) and a reference, clamped to [-10, 10].

    ``kl`` (k1): log_prob - ref;  ``abs``: |log_prob - ref|;  ``mse`` (k2): (log_prob - ref)^2 / 2;
    ``low_var_kl`` (k3): exp(ref - log_prob) - (ref - log_prob) - 1, Schulman's unbiased,
    always non-negative estimator. The clamp bounds both value and gradient on outliers.
    """
    diff = log_prob - ref_log_prob
    if kl_type in ("kl", "k1"):
        kl = diff
    elif kl_type == "abs":
        kl = diff.abs()
    elif kl_type in ("mse", "k2"):
        kl = 0.5 * diff.square()
    elif kl_type in ("low_var_kl", "k3"):
        # exp(x) - x - 1 with x = ref - lp. Capping x at 20 changes nothing (the result is
        # clamped to 10 anyway) but keeps exp finite, so the clamp's zero gradient stays 0, not NaN.
        x = (-diff).clamp(max=20.0)
        kl = torch.expm1(x) - x
    else:
        raise ValueError(f"unknown kl_type {kl_type!r}; choose from {KL_TYPES}")
    return kl.clamp(min=-10.0, max=10.0)


def aggregate_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Reduce a ``(B, L)`` loss matrix to a scalar.

    - ``token-mean``: sum over valid tokens / number of valid tokens.
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean.
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): sum over valid tokens / (num sequences *
      ``loss_scale_factor``); the factor defaults to ``L`` = ``loss_mask.shape[-1]`` and should be
      a constant such as the maximum response length, or padding changes the loss.

    The "number of valid tokens" / "number of sequences" are ``loss_mask.sum()`` / ``B``
    unless ``global_num_tokens`` / ``global_num_seqs`` are given: pass the totals over all
    micro-batches and data-parallel ranks, and the sum of the per-call losses is then exactly
    the loss of the whole batch. Sequences are counted as rows, whether or not they have
    valid tokens (as the reference does).

    Masked entries of ``loss_mat`` are ignored even when they are inf or NaN.
    """
    valid = loss_mask.bool()
    masked = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    num_seqs = loss_mat.shape[0] if global_num_seqs is None else global_num_seqs
    if loss_agg_mode == "token-mean":
        num_tokens = valid.sum().clamp(min=1) if global_num_tokens is None else global_num_tokens
        return masked.sum() / num_tokens
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = masked.sum(-1) / valid.sum(-1).clamp(min=1)
        return seq_losses.sum() / num_seqs
    if loss_agg_mode == "seq-mean-token-sum":
        return masked.sum() / num_seqs
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return masked.sum() / (num_seqs * scale)
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; choose from {AGG_MODES}")


def _clipped_surrogate(
    advantages: Tensor, ratio: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic surrogate and where the clipped branch won."""
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


def _no_tokens(like: Tensor) -> Tensor:
    """An all-False contiguous mask (``view(-1)`` works whatever the strides of ``like``)."""
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device)


def _lowest_frac(values: Tensor, candidates: Tensor, frac: float) -> Tensor:
    """The ``floor(frac * N)`` candidates with the lowest value, or none when that is < 2."""
    selected = _no_tokens(candidates)
    if frac <= 0:
        return selected
    k = int(int(candidates.sum().item()) * frac)  # same rounding as the reference
    if k < 2:
        return selected
    scores = values.detach().masked_fill(~candidates, math.inf).reshape(-1)
    selected.view(-1)[scores.topk(k, largest=False).indices] = True
    return selected


def _highest_count(values: Tensor, candidates: Tensor, k: int) -> Tensor:
    selected = _no_tokens(candidates)
    if k <= 0:
        return selected
    scores = values.detach().masked_fill(~candidates, -math.inf).reshape(-1)
    selected.view(-1)[scores.topk(k).indices] = True
    return selected


def _centred_cov(advantages: Tensor, log_prob: Tensor, valid: Tensor) -> Tensor:
    """Per-token covariance term (A - mean A)(log p - mean log p) over valid tokens (Cui et al., 2025)."""
    lp = log_prob.detach()
    return (advantages - masked_mean(advantages, valid)) * (lp - masked_mean(lp, valid))


def policy_loss(
    name: str,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    proxy_log_prob: Tensor | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    lp_reg_neg_frac: float = 0.01,
    lp_reg_pos_frac: float = 0.0,
    lp_reg_coef: float = 1.0,
    kl_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    kl_cov_ratio: float = 0.002,
    kl_cov_coef: float = 1.0,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    entropy_top_frac: float = 0.2,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss ``name`` and its metrics, for one micro-batch.

    Args:
        name: "ppo_clip" (GRPO; Clip-Higher through ``clip_ratio_high``), "lp_reg", "gspo",
            "kl_cov", "clip_cov" or "entropy_8020".
        log_prob: ``(B, L)`` current log-probs of the sampled tokens, with grad.
        old_log_prob: ``(B, L)`` log-probs under the sampling policy (detached here).
        advantages: ``(B, L)`` token-level advantages.
        response_mask: ``(B, L)`` 1/True for tokens that count.
        proxy_log_prob: ``(B, L)`` min-p proxy log-probs (required by lp_reg); -inf or
            <= -1e3 marks a filtered token.
        clip_ratio_low, clip_ratio_high: PPO clip range ``[1 - low, 1 + high]``.
        lp_reg_neg_frac, lp_reg_pos_frac: rho for A < 0 and A > 0 (0 disables a side).
        lp_reg_coef: beta, the weight of the proxy KL.
        kl_type: estimator of the Lp-Reg KL, see ``kl_penalty``.
        loss_agg_mode: see ``aggregate_loss``. GSPO always uses "seq-mean-token-mean", the
            sequence-level objective that defines it (as the reference does).
        entropy: ``(B, L)`` token entropy (with grad for the bonus); needed by entropy_8020.
        entropy_coef: entropy bonus weight; the loss becomes ``pg_loss - coef * agg(entropy)``.
        kl_cov_ratio, kl_cov_coef: KL-Cov's fraction of valid tokens (top covariance) that get
            ``kl_cov_coef * |log_prob - old_log_prob|``; its surrogate is unclipped.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov detaches up to
            ``max(1, floor(ratio * N))`` random unclipped tokens with covariance in (lb, ub);
            ratio 0 turns it off.
        entropy_top_frac: 80/20 trains only on the ``max(1, floor(frac * N))`` highest-entropy tokens.
        global_num_tokens, global_num_seqs, loss_scale_factor: see ``aggregate_loss``. For
            entropy_8020 the token denominator becomes ``entropy_top_frac * global_num_tokens``
            (exact up to the per-call rounding of the top-k size).
        generator: random source for Clip-Cov's choice (CPU generator).

    Selections (Lp-Reg's percentile, KL-Cov, Clip-Cov, 80/20) run over the valid tokens of
    this call. Returns ``(loss, metrics)``; metrics are detached 0-d tensors (call
    ``float()`` to log them), computed over this call's valid tokens.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; choose from {POLICY_LOSSES}")
    valid = response_mask.bool()
    dtype, device = log_prob.dtype, log_prob.device
    zero = torch.zeros((), dtype=dtype, device=device)
    # Padding may hold anything (inf, NaN): keep it out of every value and gradient.
    log_prob = torch.where(valid, log_prob, zero)
    old_log_prob = torch.where(valid, old_log_prob.detach().to(dtype), zero)
    advantages = torch.where(valid, advantages.detach().to(dtype), zero)
    if entropy is not None:
        entropy = torch.where(valid, entropy.to(dtype), zero)

    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss_mask, num_tokens, pg_agg_mode = valid, global_num_tokens, loss_agg_mode
    metrics: dict[str, Tensor] = {}

    if name in ("ppo_clip", "lp_reg"):
        pg_losses, clipped = _clipped_surrogate(advantages, ratio, clip_ratio_low, clip_ratio_high)
        metrics["actor/pg_clipfrac"] = masked_mean(clipped, valid)
        if name == "lp_reg":
            if proxy_log_prob is None:
                raise ValueError("lp_reg needs proxy_log_prob")
            proxy = proxy_log_prob.detach().to(dtype)
            # Step 2: the lowest-probability fraction of each advantage sign ...
            selected = _lowest_frac(log_prob, valid & (advantages < 0), lp_reg_neg_frac)
            selected |= _lowest_frac(log_prob, valid & (advantages > 0), lp_reg_pos_frac)
            # ... that the proxy says are more likely than the policy thinks (never filtered tokens).
            regularized = selected & (log_prob.detach() < proxy)
            # Step 3: unclipped surrogate + KL to the proxy. Elsewhere the proxy is replaced by
            # log_prob so that -inf never enters the graph.
            safe_proxy = torch.where(regularized, proxy, log_prob.detach())
            proxy_kl = kl_penalty(log_prob, safe_proxy, kl_type)
            pg_losses = torch.where(regularized, -advantages * ratio + lp_reg_coef * proxy_kl, pg_losses)
            num_regularized = regularized.sum()
            metrics["lp_reg/selected_frac"] = masked_mean(selected, valid)
            metrics["lp_reg/regularized_frac"] = masked_mean(regularized, valid)
            metrics["lp_reg/proxy_kl"] = (
                torch.where(regularized, proxy_kl.detach(), zero).sum() / num_regularized.clamp(min=1)
            )

    elif name == "gspo":
        # Zheng et al., 2025: one length-normalised ratio per sequence, s_i = exp(mean_t log r_t),
        # written per token as sg[log s_i] + log_prob - sg[log_prob] so each token keeps its gradient.
        seq_log_ratio = (log_ratio * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        log_seq_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach()[:, None]
        seq_ratio = torch.exp(log_seq_ratio.clamp(max=10.0))
        pg_losses, clipped = _clipped_surrogate(advantages, seq_ratio, clip_ratio_low, clip_ratio_high)
        metrics["actor/pg_clipfrac"] = masked_mean(clipped, valid)
        pg_agg_mode = "seq-mean-token-mean"

    elif name == "kl_cov":
        # Cui et al., 2025: no clipping; the tokens whose (A, log p) covariance is largest pay
        # |log r|, which holds back the updates that collapse entropy fastest.
        pg_losses = -advantages * ratio
        num_valid = int(valid.sum().item())
        k = max(1, int(num_valid * kl_cov_ratio)) if num_valid > 0 and kl_cov_ratio > 0 else 0
        penalised = _highest_count(_centred_cov(advantages, log_prob, valid), valid, k)
        pg_losses = pg_losses + torch.where(penalised, kl_cov_coef * log_ratio.abs(), zero)
        metrics["actor/pg_clipfrac"] = zero.clone()
        metrics["kl_cov/penalised_frac"] = masked_mean(penalised, valid)

    elif name == "clip_cov":
        # Cui et al., 2025: a few random tokens with covariance in (lb, ub), not already clipped
        # by PPO, lose their gradient altogether.
        pg_losses, clipped = _clipped_surrogate(advantages, ratio, clip_ratio_low, clip_ratio_high)
        num_valid = int(valid.sum().item())
        cov = _centred_cov(advantages, log_prob, valid)
        candidates = valid & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        candidate_idx = candidates.reshape(-1).nonzero().squeeze(-1)
        num_detach = max(int(clip_cov_ratio * num_valid), 1) if clip_cov_ratio > 0 else 0
        num_detach = min(num_detach, candidate_idx.numel())
        perm = torch.randperm(candidate_idx.numel(), generator=generator)[:num_detach].to(device)
        detached = _no_tokens(valid)
        detached.view(-1)[candidate_idx[perm]] = True
        pg_losses = torch.where(detached, zero, pg_losses)
        metrics["actor/pg_clipfrac"] = masked_mean(detached, valid)  # as the reference reports it

    else:  # entropy_8020
        # Wang et al., 2025: only the top 20% highest-entropy tokens ("forking tokens") train.
        if entropy is None:
            raise ValueError("entropy_8020 needs entropy")
        pg_losses, clipped = _clipped_surrogate(advantages, ratio, clip_ratio_low, clip_ratio_high)
        num_valid = int(valid.sum().item())
        k = max(1, int(num_valid * entropy_top_frac)) if num_valid > 0 else 0
        loss_mask = _highest_count(entropy, valid, k)
        if global_num_tokens is not None:
            num_tokens = global_num_tokens * entropy_top_frac
        metrics["actor/pg_clipfrac"] = masked_mean(clipped, loss_mask)
        metrics["entropy_8020/trained_frac"] = masked_mean(loss_mask, valid)

    pg_loss = aggregate_loss(
        pg_losses,
        loss_mask,
        pg_agg_mode,
        global_num_tokens=num_tokens,
        global_num_seqs=global_num_seqs,
        loss_scale_factor=loss_scale_factor,
    )
    loss = pg_loss
    if entropy is not None and entropy_coef != 0.0:
        entropy_loss = aggregate_loss(
            entropy,
            valid,
            loss_agg_mode,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            loss_scale_factor=loss_scale_factor,
        )
        loss = loss - entropy_coef * entropy_loss

    metrics["actor/pg_loss"] = pg_loss.detach()
    metrics["actor/ppo_kl"] = masked_mean(-log_ratio.detach(), valid)
    metrics["actor/low_prob_frac"] = masked_mean(log_prob.detach() < math.log(LOW_PROB), valid)
    if entropy is not None:
        metrics["actor/entropy"] = masked_mean(entropy.detach(), valid)
    if proxy_log_prob is not None:
        filtered = proxy_log_prob.detach() <= FILTERED_LOG_PROB
        metrics["lp_reg/filtered_frac"] = masked_mean(filtered, valid).to(dtype)
    return loss, {k: v.detach() for k, v in metrics.items()}
