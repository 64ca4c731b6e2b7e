"""Learner: Lp-Reg and its baselines as pure torch functions, plus the Learner actor."""

from learner.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from learner.losses import (
    AGG_MODES,
    KL_TYPES,
    LP_REG_THRESHOLD_SCOPES,
    POLICY_LOSSES,
    LossInputs,
    LpRegThreshold,
    PolicyTerms,
    aggregate_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from learner.proxy import min_p_proxy_log_prob
from learner.token_stats import TokenStats, token_stats

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_TYPES",
    "LP_REG_THRESHOLD_SCOPES",
    "POLICY_LOSSES",
    "LossInputs",
    "LpRegThreshold",
    "PolicyTerms",
    "TokenStats",
    "aggregate_loss",
    "compute_advantages",
    "drgrpo_advantages",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "min_p_proxy_log_prob",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_stats",
]
