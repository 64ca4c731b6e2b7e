"""The top-p (nucleus) kept set, formed as vLLM's sampler forms it.

With ``rollout.top_p < 1`` vLLM samples from, and reports the log-probs of (the worker's
``logprobs_mode="processed_logprobs"``), the distribution

    x    = logits / T                                  (float32)
    kept = the top-p set of softmax(x)
    pi   = softmax(where(kept, x, -inf))               (renormalised over the kept set)

and both the sampled token's log-prob and the top-K list are of ``pi`` (a listed token
outside the set reads -inf). The learner computes pi_old, pi_theta, the rollout correction's
comparison and the mismatch metrics under the same transform, or every ratio is biased by the
kept set's mass.

vLLM's rule (``apply_top_k_top_p_pytorch`` in ``vllm/v1/sample/ops/topk_topp_sampler.py``,
which the CPU build runs): sort ``x`` ascending, take the cumulative sum of its softmax, and
drop every token where that sum is ``<= 1 - p`` (``p`` held in float32), except the largest,
which is always kept. The dropped tokens are a prefix of the sorted order (the cumulative sum
never decreases), so the kept set is ``x >= floor`` with ``floor`` the first kept value:
``top_p_floor`` reproduces those very operations to find it, and only the per-row ``floor``
needs to be kept for the backward pass.

Two deliberate differences, both at measure-zero boundaries:

- ties: where several tokens share the floor value, vLLM keeps those its sort happened to
  place last, the learner keeps them all;
- a sampled token outside the learner's kept set (the policy moved since it was sampled, or
  rounding put it just past the boundary) joins the set: its log-prob is taken over the kept
  set plus itself. The value stays finite, close to what it would be at the boundary, and
  its gradient is that of an ordinary softmax over those tokens; it never reads -inf.

On a GPU vLLM forms the same set with its Triton kernel; its rounding near the boundary may
differ, and ``rollout/logprob_max_abs_diff`` shows it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_top_p", "top_p_cut", "top_p_floor", "top_p_keep"]


def check_top_p(top_p: float) -> float:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return float(top_p)


def top_p_cut(top_p: float) -> float:
    """``1 - p`` as vLLM computes it: ``p`` is a float32 tensor there, and so is the difference."""
    return (1.0 - torch.tensor(check_top_p(top_p), dtype=torch.float32)).item()


def top_p_floor(x: Tensor, cut: float) -> Tensor:
    """Per row of ``x`` (``(n, V)``, temperature applied), the smallest value in the top-p set.

    ``cut`` is ``top_p_cut(p)``. Sorting ascending, softmax and cumulative sum in ``x``'s
    dtype are vLLM's own operations, so the boundary falls where it falls there.
    """
    ascending = x.sort(dim=-1).values
    cumulative = ascending.softmax(dim=-1).cumsum_(dim=-1)
    dropped = cumulative <= cut
    dropped[:, -1] = False  # at least one token
    # The first kept position (argmax returns the first of equal maxima): a prefix is dropped.
    first_kept = (~dropped).to(torch.uint8).argmax(-1, keepdim=True)
    return ascending.gather(-1, first_kept).squeeze(-1)


def top_p_keep(x: Tensor, floor: Tensor, token_ids: Tensor) -> Tensor:
    """The kept set of each row as a bool mask, with the row's sampled token always in it."""
    keep = x >= floor[:, None]
    return keep.scatter_(-1, token_ids[:, None], True)
