"""Policy losses: PPO-clip (GRPO, Clip-Higher), Lp-Reg, GSPO, KL-Cov, Clip-Cov, 80/20.

All tensors are ``(batch, length)`` and token-level; ``response_mask`` marks the response
tokens that count. ``POLICY_LOSSES`` maps each name (``algorithm.loss``) to a function
``(LossInputs, AlgorithmConfig) -> PolicyTerms`` that reads its hyper-parameters from the
algorithm section and builds a per-token loss matrix; ``policy_loss`` is the one entry point:
it cleans the padding, applies the rollout correction (``learner.rollout_correction``),
calls the loss, aggregates with ``aggregate_loss`` and adds the entropy bonus and the KL to
a reference policy, which combine with any of them.

Lp-Reg (Huang et al., 2025). Among valid tokens with negative advantage, select the
lowest-probability share ``neg_frac`` (rho; ``k = floor(neg_frac * N_neg)`` tokens, and none
when k < 2), and keep those the min-p proxy rates *higher* than the policy does
(``log_prob < proxy_log_prob``; a token the filter removed has proxy -inf and never
qualifies). Where rho is taken (``algorithm.lp_reg_threshold_scope``):

- ``batch`` (the default, the paper's definition): over the whole mini-batch, every
  micro-batch and learner rank. The caller computes one threshold tau per mini-batch
  before its first backward: the k-th lowest of pi_old's log-probs over the mini-batch's
  candidates (``LossInputs.select_log_prob``), with k and N counted over the mini-batch. A
  token is selected when its pi_old log-prob is <= tau, so the selected set does not
  depend on how the mini-batch is cut into micro-batches or shared out over ranks (ties at
  tau are all selected). pi_old, not the current policy, because it is known before the
  first micro-batch trains and does not move while the mini-batch's micro-batches run.
- ``micro_batch`` (the authors' code): the k tokens with the lowest *current* log-prob of
  each call, k and N counted per call; then the set depends on the micro-batch layout.

Those tokens get

    -A * r + kl_coef * KL(proxy || pi_theta),     r = exp(log_prob - old_log_prob) unclipped,

and every other token the PPO clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.
The KL pulls rare-but-plausible tokens ("reasoning sparks") back towards the proxy instead of
letting negative advantages drive them to zero; its gradient flows through ``log_prob`` only.

With ``algorithm.lp_reg_filter=none`` (the paper's ablation) the proxy is pi_old unfiltered:
nothing is filtered, Z = 1, and a selected token is regularised wherever the policy has
moved below pi_old (the reference keeps the ``log_prob < proxy`` test with or without the
filter). On-policy pi_theta is pi_old, so no token is, and the loss is PPO-clip's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from conf.schema import AlgorithmConfig
from learner.proxy import FILTERED_LOG_PROB
from learner.rollout_correction import rollout_correction

__all__ = [
    "AGG_MODES",
    "KL_TYPES",
    "LP_REG_THRESHOLD_SCOPES",
    "POLICY_LOSSES",
    "LossInputs",
    "LpRegThreshold",
    "PolicyTerms",
    "aggregate_loss",
    "clip_cov_loss",
    "entropy_8020_loss",
    "gspo_loss",
    "is_count_metric",
    "kl_cov_loss",
    "kl_penalty",
    "lp_reg_k",
    "lp_reg_kept_mass",
    "lp_reg_loss",
    "lp_reg_ratio_metrics",
    "lp_reg_selection",
    "lp_reg_threshold",
    "masked_mean",
    "policy_loss",
    "ppo_clip_loss",
    "watched_count_name",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3")
LP_REG_THRESHOLD_SCOPES = ("batch", "micro_batch")

LOW_PROB = 0.1  # actor/low_prob_frac counts sampled tokens below this probability
# Lp-Reg's internals are means over tokens spread over micro-batches and ranks: each call
# reports a sum and a count, both added up, and lp_reg_ratio_metrics divides once at the end.
LP_REG_RATIOS = {
    # Of the bottom-rho (selected) tokens, the share the min-p filter keeps.
    "lp_reg/selected_kept_frac": ("lp_reg/selected_kept_tokens", "lp_reg/selected_tokens"),
    # Mean of 1 - Z over regularised tokens, Z the probability mass the filter keeps there.
    "lp_reg/filtered_mass": ("lp_reg/filtered_mass_sum", "lp_reg/regularized_tokens"),
    # Mean of beta (1/Z - 1) / |A| over regularised tokens: the KL term's pull on the token's
    # log-prob against the policy gradient's push (on-policy the gradient is about
    # |A| - beta (1/Z - 1)), so above 1 the token is pulled up.
    "lp_reg/protection_ratio": ("lp_reg/protection_ratio_sum", "lp_reg/regularized_tokens"),
}
# Metrics that count tokens (or add up over tokens): summed over micro-batches, epochs and
# ranks instead of averaged.
COUNT_METRICS = frozenset({"lp_reg/regularized_tokens"} | {name for pair in LP_REG_RATIOS.values()
                                                           for name in pair})
# Per watched string (trainer.watch_tokens): its tokens among the regularised ones, a count
# named watch/<string>/regularized_tokens. Over lp_reg/regularized_tokens it gives
# watch/<string>/regularized_frac, the string's share of the regularised tokens, as
# watch/<string>/sampled_frac is its share of the sampled ones: whether Lp-Reg protects a
# spark or the noise.
_WATCH_PREFIX, _WATCH_COUNT = "watch/", "/regularized_tokens"


def watched_count_name(string: str) -> str:
    return f"{_WATCH_PREFIX}{string}{_WATCH_COUNT}"


def _watched_string(name: str) -> str | None:
    if name.startswith(_WATCH_PREFIX) and name.endswith(_WATCH_COUNT):
        return name[len(_WATCH_PREFIX):-len(_WATCH_COUNT)]
    return None


def is_count_metric(name: str) -> bool:
    """Whether a learner metric adds up over micro-batches, epochs and ranks (a token count
    or a sum over tokens) rather than being averaged."""
    return name in COUNT_METRICS or _watched_string(name) is not None


def lp_reg_ratio_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The means of ``LP_REG_RATIOS`` and the watched strings' shares of the regularised
    tokens, from their sums and counts added up over every micro-batch and rank; none where
    the count is 0."""
    means = {name: metrics[num] / metrics[den] for name, (num, den) in LP_REG_RATIOS.items()
             if num in metrics and metrics.get(den, 0) > 0}
    regularized = metrics.get("lp_reg/regularized_tokens", 0)
    if regularized > 0:
        for name, value in metrics.items():
            string = _watched_string(name)
            if string is not None:
                means[f"{_WATCH_PREFIX}{string}/regularized_frac"] = value / regularized
    return means


def lp_reg_kept_mass(old_log_prob: Tensor, proxy_log_prob: Tensor) -> Tensor:
    """Z, the probability mass the min-p filter keeps at each position, for kept tokens.

    The proxy renormalises the kept tokens, so a kept token's proxy log-prob is its log-prob
    minus log Z: Z = exp(old_log_prob - proxy_log_prob). Exact where pi_old's log-probs and
    the proxy are of one distribution, as at temperature 1 (``rollout.temperature`` and
    ``algorithm.lp_reg_temperature``, the defaults); otherwise an estimate. Clamped to (0, 1]."""
    return torch.exp(old_log_prob - proxy_log_prob).clamp(min=1e-12, max=1.0)


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


def lp_reg_k(num_candidates: int, frac: float) -> int:
    """Lp-Reg's selection size ``floor(frac * N)``, the reference's rounding; 0 (off) when < 2."""
    k = int(num_candidates * frac) if frac > 0 else 0
    return k if k >= 2 else 0


def _lowest_frac(values: Tensor, candidates: Tensor, frac: float) -> tuple[Tensor, Tensor | None]:
    """The ``floor(frac * N)`` candidates with the lowest value (none when that is < 2), and
    the highest value among them (None when none)."""
    selected = _no_tokens(candidates)
    k = lp_reg_k(int(candidates.sum().item()), frac)
    if k == 0:
        return selected, None
    scores = values.detach().masked_fill(~candidates, math.inf).reshape(-1)
    lowest = scores.topk(k, largest=False)
    selected.view(-1)[lowest.indices] = True
    return selected, lowest.values.max()


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


@dataclass(frozen=True)
class LpRegThreshold:
    """Lp-Reg's batch-scope thresholds tau, as log-probs, one per advantage sign: a candidate
    of that sign is selected when its ``select_log_prob`` is <= tau. None: that side selects
    nothing (its fraction is 0, or k < 2)."""

    neg: float | None = None
    pos: float | None = None

    def metrics(self) -> dict[str, float]:
        sides = (("lp_reg/threshold", self.neg), ("lp_reg/threshold_pos", self.pos))
        return {name: tau for name, tau in sides if tau is not None}


def lp_reg_threshold(values: Tensor, candidates: Tensor, frac: float) -> float | None:
    """tau over one set of tokens: the k-th lowest of ``values`` among ``candidates``,
    ``k = floor(frac * N)``; None when k < 2."""
    chosen = values.detach()[candidates.bool()]
    k = lp_reg_k(chosen.numel(), frac)
    return float(chosen.kthvalue(k).values) if k else None


@dataclass
class LossInputs:
    """Per-token inputs of a policy loss for one micro-batch, all ``(B, L)``.

    ``policy_loss`` hands each loss a copy in which padding has been zeroed, the detached
    inputs are detached and everything is in ``log_prob``'s dtype.
    """

    log_prob: Tensor  # current log-probs of the sampled tokens, with grad
    old_log_prob: Tensor  # under the sampling policy (pi_old)
    advantages: Tensor  # token-level advantages
    response_mask: Tensor  # 1/True on tokens that count
    # Min-p proxy log-probs (required by lp_reg); -inf or <= -1e3 marks a filtered token.
    proxy_log_prob: Tensor | None = None
    entropy: Tensor | None = None  # token entropy, with grad for the bonus; needed by entropy_8020
    generator: torch.Generator | None = None  # Clip-Cov's random choice (CPU generator)
    # The behaviour policy's log-probs (vLLM's); needed by algorithm.rollout_correction.
    rollout_log_prob: Tensor | None = None
    # A frozen reference policy's log-probs; needed when algorithm.kl_loss_coef > 0.
    ref_log_prob: Tensor | None = None
    # Lp-Reg, batch scope: the log-probs the threshold ranks tokens by, pi_old's as known
    # before the mini-batch trains (None: old_log_prob), and the mini-batch's threshold
    # (None: computed over this call's tokens, as when the call is the whole mini-batch).
    select_log_prob: Tensor | None = None
    lp_reg_threshold: LpRegThreshold | None = None
    # Per watched string (trainer.watch_tokens), True where the sampled token is one of its
    # tokens: Lp-Reg counts them among its regularised tokens.
    watched: dict[str, Tensor] | None = None

    @property
    def valid(self) -> Tensor:
        return self.response_mask.bool()

    @property
    def log_ratio(self) -> Tensor:
        return self.log_prob - self.old_log_prob


@dataclass
class PolicyTerms:
    """What one loss contributes before aggregation."""

    pg_losses: Tensor  # (B, L) per-token loss
    metrics: dict[str, Tensor] = field(default_factory=dict)
    # Tokens that enter the aggregation; None: every valid token.
    loss_mask: Tensor | None = None
    # Aggregation forced by the loss's definition; None: algorithm.loss_agg_mode.
    agg_mode: str | None = None
    # Multiplies global_num_tokens: the share of tokens this loss trains on.
    token_fraction: float = 1.0


def ppo_clip_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """GRPO's clipped surrogate; Clip-Higher through ``clip_ratio_high``."""
    pg_losses, clipped = _clipped_surrogate(
        x.advantages, torch.exp(x.log_ratio), algo.clip_ratio_low, algo.clip_ratio_high)
    return PolicyTerms(pg_losses, {"actor/pg_clipfrac": masked_mean(clipped, x.valid)})


def lp_reg_selection(x: LossInputs, algo: AlgorithmConfig) -> tuple[Tensor, dict[str, float | Tensor | None]]:
    """Lp-Reg's step 2, before the proxy test: the selected tokens of each advantage sign, and
    the threshold each side used (``threshold`` for A < 0, ``threshold_pos`` for A > 0; None
    where a side selects nothing). See the module's docstring for the two scopes."""
    valid, advantages = x.valid, x.advantages
    sides = {"threshold": (valid & (advantages < 0), algo.lp_reg_neg_frac),
             "threshold_pos": (valid & (advantages > 0), algo.lp_reg_pos_frac)}
    selected = _no_tokens(valid)
    thresholds: dict[str, float | Tensor | None] = {}
    if algo.lp_reg_threshold_scope == "micro_batch":
        for name, (candidates, frac) in sides.items():
            chosen, thresholds[name] = _lowest_frac(x.log_prob, candidates, frac)
            selected |= chosen
    elif algo.lp_reg_threshold_scope == "batch":
        values = (x.old_log_prob if x.select_log_prob is None else x.select_log_prob).detach()
        given = x.lp_reg_threshold
        for name, (candidates, frac) in sides.items():
            if given is None:  # this call is the whole mini-batch
                tau = lp_reg_threshold(values, candidates, frac)
            else:
                tau = given.neg if name == "threshold" else given.pos
            thresholds[name] = tau
            if tau is not None:
                selected |= candidates & (values <= tau)
    else:
        raise ValueError(f"unknown lp_reg_threshold_scope {algo.lp_reg_threshold_scope!r}; "
                         f"choose from {LP_REG_THRESHOLD_SCOPES}")
    return selected, thresholds


def lp_reg_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """Lp-Reg: PPO-clip, except that selected low-probability tokens get -A r + beta KL(proxy || pi)."""
    if x.proxy_log_prob is None:
        raise ValueError("lp_reg needs proxy_log_prob")
    valid, log_prob, advantages = x.valid, x.log_prob, x.advantages
    ratio = torch.exp(x.log_ratio)
    pg_losses, clipped = _clipped_surrogate(advantages, ratio, algo.clip_ratio_low, algo.clip_ratio_high)
    proxy = x.proxy_log_prob
    # Step 2: the lowest-probability fraction of each advantage sign ...
    selected, thresholds = lp_reg_selection(x, algo)
    # ... that the proxy says are more likely than the policy thinks (never filtered tokens).
    regularized = selected & (log_prob.detach() < proxy)
    # Step 3: unclipped surrogate + KL to the proxy. Elsewhere the proxy is replaced by
    # log_prob so that -inf never enters the graph.
    safe_proxy = torch.where(regularized, proxy, log_prob.detach())
    proxy_kl = kl_penalty(log_prob, safe_proxy, algo.kl_type)
    pg_losses = torch.where(regularized, -advantages * ratio + algo.lp_reg_coef * proxy_kl, pg_losses)
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    kept = proxy > FILTERED_LOG_PROB
    if algo.lp_reg_filter == "none":
        # Nothing is filtered: Z is 1 by definition (read off a proxy at a temperature of
        # its own, it would not be).
        kept_mass = torch.ones_like(x.old_log_prob)
    else:
        kept_mass = lp_reg_kept_mass(x.old_log_prob, torch.where(regularized, proxy, x.old_log_prob))
    protection = algo.lp_reg_coef * (1.0 / kept_mass - 1.0) / advantages.abs().clamp(min=1e-8)
    metrics = {
        "actor/pg_clipfrac": masked_mean(clipped, valid),
        "lp_reg/selected_frac": masked_mean(selected, valid),
        "lp_reg/selected_tokens": selected.sum().to(log_prob.dtype),
        "lp_reg/selected_kept_tokens": (selected & kept).sum().to(log_prob.dtype),
        "lp_reg/filtered_mass_sum": torch.where(regularized, 1.0 - kept_mass, zero).sum(),
        "lp_reg/protection_ratio_sum": torch.where(regularized, protection, zero).sum(),
        "lp_reg/regularized_frac": masked_mean(regularized, valid),
        "lp_reg/regularized_tokens": regularized.sum().to(log_prob.dtype),
        "lp_reg/proxy_kl": (torch.where(regularized, proxy_kl.detach(), zero).sum()
                            / regularized.sum().clamp(min=1)),
    }
    for string, mask in (x.watched or {}).items():
        metrics[watched_count_name(string)] = (regularized & mask).sum().to(log_prob.dtype)
    # tau as a log-prob, where a side selects and this call chose it (the k-th lowest current
    # log-prob per call for micro_batch scope). A given mini-batch threshold is the caller's
    # to log, once per mini-batch: a mean over calls would weigh mini-batches by their
    # micro-batch counts.
    if x.lp_reg_threshold is None or algo.lp_reg_threshold_scope != "batch":
        for name, tau in thresholds.items():
            if tau is not None:
                metrics[f"lp_reg/{name}"] = torch.as_tensor(tau, dtype=log_prob.dtype, device=log_prob.device)
    return PolicyTerms(pg_losses, metrics)


def gspo_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """GSPO (Zheng et al., 2025): one length-normalised ratio per sequence, s_i = exp(mean_t log r_t).

    Written per token as sg[log s_i] + log_prob - sg[log_prob] so each token keeps its gradient.
    GSPO always aggregates "seq-mean-token-mean", the sequence-level objective that defines it.
    """
    valid, log_prob = x.valid, x.log_prob
    seq_log_ratio = (x.log_ratio * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    log_seq_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach()[:, None]
    seq_ratio = torch.exp(log_seq_ratio.clamp(max=10.0))
    pg_losses, clipped = _clipped_surrogate(
        x.advantages, seq_ratio, algo.clip_ratio_low, algo.clip_ratio_high)
    return PolicyTerms(pg_losses, {"actor/pg_clipfrac": masked_mean(clipped, valid)},
                       agg_mode="seq-mean-token-mean")


def kl_cov_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """KL-Cov (Cui et al., 2025): no clipping; the tokens whose (A, log p) covariance is largest
    pay ``kl_cov_coef * |log r|``, which holds back the updates that collapse entropy fastest."""
    valid, log_ratio = x.valid, x.log_ratio
    zero = torch.zeros((), dtype=x.log_prob.dtype, device=x.log_prob.device)
    pg_losses = -x.advantages * torch.exp(log_ratio)
    num_valid = int(valid.sum().item())
    k = max(1, int(num_valid * algo.kl_cov_ratio)) if num_valid > 0 and algo.kl_cov_ratio > 0 else 0
    penalised = _highest_count(_centred_cov(x.advantages, x.log_prob, valid), valid, k)
    pg_losses = pg_losses + torch.where(penalised, algo.kl_cov_coef * log_ratio.abs(), zero)
    return PolicyTerms(pg_losses, {"actor/pg_clipfrac": zero.clone(),
                                   "kl_cov/penalised_frac": masked_mean(penalised, valid)})


def clip_cov_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """Clip-Cov (Cui et al., 2025): up to ``max(1, floor(ratio * N))`` random tokens with covariance
    in (lb, ub), not already clipped by PPO, lose their gradient altogether; ratio 0 turns it off."""
    valid = x.valid
    pg_losses, clipped = _clipped_surrogate(
        x.advantages, torch.exp(x.log_ratio), algo.clip_ratio_low, algo.clip_ratio_high)
    num_valid = int(valid.sum().item())
    cov = _centred_cov(x.advantages, x.log_prob, valid)
    candidates = valid & ~clipped & (cov > algo.clip_cov_lb) & (cov < algo.clip_cov_ub)
    candidate_idx = candidates.reshape(-1).nonzero().squeeze(-1)
    num_detach = max(int(algo.clip_cov_ratio * num_valid), 1) if algo.clip_cov_ratio > 0 else 0
    num_detach = min(num_detach, candidate_idx.numel())
    perm = torch.randperm(candidate_idx.numel(), generator=x.generator)[:num_detach].to(valid.device)
    detached = _no_tokens(valid)
    detached.view(-1)[candidate_idx[perm]] = True
    pg_losses = torch.where(detached, torch.zeros((), dtype=pg_losses.dtype, device=pg_losses.device),
                            pg_losses)
    # Reported as the clip fraction, as the reference does.
    return PolicyTerms(pg_losses, {"actor/pg_clipfrac": masked_mean(detached, valid)})


def entropy_8020_loss(x: LossInputs, algo: AlgorithmConfig) -> PolicyTerms:
    """80/20 (Wang et al., 2025): only the ``max(1, floor(frac * N))`` highest-entropy tokens
    ("forking tokens") train. The token denominator becomes ``entropy_top_frac *
    global_num_tokens`` (exact up to the per-call rounding of the top-k size)."""
    if x.entropy is None:
        raise ValueError("entropy_8020 needs entropy")
    valid = x.valid
    pg_losses, clipped = _clipped_surrogate(
        x.advantages, torch.exp(x.log_ratio), algo.clip_ratio_low, algo.clip_ratio_high)
    num_valid = int(valid.sum().item())
    k = max(1, int(num_valid * algo.entropy_top_frac)) if num_valid > 0 else 0
    trained = _highest_count(x.entropy, valid, k)
    return PolicyTerms(pg_losses, {"actor/pg_clipfrac": masked_mean(clipped, trained),
                                   "entropy_8020/trained_frac": masked_mean(trained, valid)},
                       loss_mask=trained, token_fraction=algo.entropy_top_frac)


POLICY_LOSSES: dict[str, Callable[[LossInputs, AlgorithmConfig], PolicyTerms]] = {
    "ppo_clip": ppo_clip_loss,
    "lp_reg": lp_reg_loss,
    "gspo": gspo_loss,
    "kl_cov": kl_cov_loss,
    "clip_cov": clip_cov_loss,
    "entropy_8020": entropy_8020_loss,
}


def policy_loss(
    name: str,
    inputs: LossInputs,
    algo: AlgorithmConfig,
    *,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss ``name`` (a key of ``POLICY_LOSSES``) and its metrics, for one micro-batch.

    Hyper-parameters come from ``algo``: the clip range, Lp-Reg's rho/beta/KL estimator, the
    baselines' knobs, ``loss_agg_mode`` (see ``aggregate_loss``; ``loss_scale_factor`` for the
    Dr.GRPO mode) and ``entropy_coef``, the weight of the entropy bonus: the loss becomes
    ``pg_loss - coef * agg(entropy)``. With ``kl_loss_coef > 0`` it also gets
    ``kl_loss_coef * agg(kl_penalty(log_prob, ref_log_prob, kl_loss_type))``.

    ``rollout_correction`` (needs ``inputs.rollout_log_prob``): ``tis`` multiplies every
    token's policy-loss term by its detached truncated weight; ``mis`` hands the loss only
    the tokens of the sequences it keeps (selections and aggregation run over those), while
    the token-mean denominator stays ``global_num_tokens`` (the count of all valid tokens
    when not given): a dropped sequence adds zero. The entropy bonus and the reference KL
    are not corrected.

    ``global_num_tokens`` / ``global_num_seqs``: totals over all micro-batches and ranks (see
    ``aggregate_loss``), so that the per-call losses add up to the loss of the whole batch.

    Selections (KL-Cov, Clip-Cov, 80/20, and Lp-Reg's percentile with
    ``lp_reg_threshold_scope=micro_batch``) run over the valid tokens of this call; Lp-Reg's
    batch scope uses ``inputs.lp_reg_threshold``, the mini-batch's, when given. Returns
    ``(loss, metrics)``; metrics are detached 0-d tensors (call ``float()`` to log them),
    computed over this call's valid tokens.
    """
    try:
        loss_fn = POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; choose from {tuple(POLICY_LOSSES)}") from None
    valid = inputs.response_mask.bool()
    log_prob = inputs.log_prob
    dtype, device = log_prob.dtype, log_prob.device
    zero = torch.zeros((), dtype=dtype, device=device)

    def clean(value: Tensor | None) -> Tensor | None:
        # Padding may hold anything (inf, NaN): keep it out of every value and gradient.
        return None if value is None else torch.where(valid, value.to(dtype), zero)

    x = replace(
        inputs,
        log_prob=torch.where(valid, log_prob, zero),
        old_log_prob=clean(inputs.old_log_prob.detach()),
        advantages=clean(inputs.advantages.detach()),
        entropy=clean(inputs.entropy),
        proxy_log_prob=None if inputs.proxy_log_prob is None else inputs.proxy_log_prob.detach().to(dtype),
        rollout_log_prob=clean(None if inputs.rollout_log_prob is None else inputs.rollout_log_prob.detach()),
        ref_log_prob=clean(None if inputs.ref_log_prob is None else inputs.ref_log_prob.detach()),
        # In its own dtype: the threshold was taken on these very values, and a cast could
        # move a token across it.
        select_log_prob=None if inputs.select_log_prob is None else torch.where(
            valid, inputs.select_log_prob.detach(), torch.zeros((), dtype=inputs.select_log_prob.dtype,
                                                                device=device)),
    )
    correction_mode = algo.rollout_correction
    if correction_mode != "none" and x.rollout_log_prob is None:
        raise ValueError(f"rollout_correction={correction_mode!r} needs rollout_log_prob")
    correction = rollout_correction(correction_mode, x.old_log_prob, x.rollout_log_prob, valid,
                                    algo.rollout_correction_cap) if correction_mode != "none" else None
    loss_inputs = x
    local_num_tokens = None  # this call's own denominator, for the metrics
    if correction is not None and correction.keep is not None:
        loss_inputs = replace(x, response_mask=correction.keep)
        local_num_tokens = valid.sum().clamp(min=1).to(dtype)
        if global_num_tokens is None:
            global_num_tokens = local_num_tokens
    terms = loss_fn(loss_inputs, algo)
    pg_losses = terms.pg_losses
    if correction is not None and correction.weights is not None:
        pg_losses = pg_losses * correction.weights
    num_tokens = global_num_tokens
    if global_num_tokens is not None and terms.token_fraction != 1.0:
        num_tokens = global_num_tokens * terms.token_fraction
    pg_mask = loss_inputs.valid if terms.loss_mask is None else terms.loss_mask
    pg_mode = terms.agg_mode or algo.loss_agg_mode
    pg_loss = aggregate_loss(pg_losses, pg_mask, pg_mode, global_num_tokens=num_tokens,
                             global_num_seqs=global_num_seqs, loss_scale_factor=algo.loss_scale_factor)
    loss = pg_loss
    if x.entropy is not None and algo.entropy_coef != 0.0:
        entropy_loss = aggregate_loss(
            x.entropy,
            valid,
            algo.loss_agg_mode,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            loss_scale_factor=algo.loss_scale_factor,
        )
        loss = loss - algo.entropy_coef * entropy_loss

    def own_mean(loss_mat: Tensor, mask: Tensor, mode: str, num_tokens=None) -> Tensor:
        # The loss is a share of the whole mini-batch's mean; its metric is this call's own
        # mean, so that averaging over micro-batches and ranks gives the batch's mean.
        return aggregate_loss(loss_mat.detach(), mask, mode, global_num_tokens=num_tokens,
                              loss_scale_factor=algo.loss_scale_factor)

    metrics = dict(terms.metrics)
    if algo.kl_loss_coef > 0.0:
        if x.ref_log_prob is None:
            raise ValueError("kl_loss_coef > 0 needs ref_log_prob")
        kl = kl_penalty(x.log_prob, x.ref_log_prob, algo.kl_loss_type)
        kl_loss = aggregate_loss(kl, valid, algo.loss_agg_mode, global_num_tokens=global_num_tokens,
                                 global_num_seqs=global_num_seqs, loss_scale_factor=algo.loss_scale_factor)
        loss = loss + algo.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = own_mean(kl, valid, algo.loss_agg_mode)
    if correction is not None:
        metrics.update(correction.metrics)
    if local_num_tokens is not None and terms.token_fraction != 1.0:
        local_num_tokens = local_num_tokens * terms.token_fraction
    metrics["actor/pg_loss"] = own_mean(pg_losses, pg_mask, pg_mode, local_num_tokens)
    metrics["actor/ppo_kl"] = masked_mean(-x.log_ratio.detach(), valid)
    metrics["actor/low_prob_frac"] = masked_mean(x.log_prob.detach() < math.log(LOW_PROB), valid)
    if x.entropy is not None:
        metrics["actor/entropy"] = masked_mean(x.entropy.detach(), valid)
    if inputs.proxy_log_prob is not None:
        filtered = inputs.proxy_log_prob.detach() <= FILTERED_LOG_PROB
        metrics["lp_reg/filtered_frac"] = masked_mean(filtered, valid).to(dtype)
    return loss, {k: v.detach() for k, v in metrics.items()}
