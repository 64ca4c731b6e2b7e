"""The Lp-Reg proxy distribution: the old policy with min-p noise removed, renormalised.

At each position, with ``z`` the old policy's logits:

    keep     = softmax(z) >= kappa * max softmax(z)      (threshold at temperature 1)
    proxy(.) = log_softmax(where(keep, z, -inf) / T)

Because ``softmax(z)_i / max softmax(z) = exp(z_i - max z)``, the test is ``exp(z_i - max z) >=
kappa`` on the shifted logits the log-sum-exp needs anyway: no softmax, no division. A filtered
token's proxy log-prob is ``-inf`` (the reference writes a logit of -1e4, which has the same
effect).

``kappa = 0`` keeps every token: the proxy is then the old policy itself at temperature ``T``
(``algorithm.lp_reg_filter=none``, the unfiltered proxy of the paper's ablation).

Memory: the vocabulary axis is processed a chunk of positions at a time, reading the
caller's logits through views, so the extra memory is a few ``chunk x vocab`` temporaries,
never another ``batch x length x vocab`` tensor.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FILTERED_LOG_PROB", "default_chunk_size", "min_p_proxy_log_prob", "top_k_proxy_log_prob"]

# Proxy log-probs at or below this mean "removed by the filter". -inf is what we write;
# the threshold also accepts reference-style values (a -1e4 logit).
FILTERED_LOG_PROB = -1e3

# Elements per chunk temporary. On CPU a small chunk (4 MiB of float32) stays in cache and in
# the allocator's free lists; big temporaries are fresh pages each time and cost more to
# fault in than to compute. On a GPU, bigger chunks (512 MiB) mean fewer kernel launches.
_CPU_CHUNK_ELEMENTS = 2**20
_GPU_CHUNK_ELEMENTS = 2**27


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk: a float32 temporary of about 4 MiB on CPU, 512 MiB on GPU."""
    elements = _CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else _GPU_CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab_size))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_blocks(x: Tensor) -> list[tuple[Tensor, int]]:
    """Split ``(..., V)`` into 2-D ``(rows, V)`` views with their flat row offsets, never copying.

    A contiguous tensor is one block; a strided view (e.g. ``logits[:, -L - 1:-1]``) is one
    block per leading index.
    """
    vocab = x.shape[-1]
    try:
        return [(x.view(-1, vocab), 0)]
    except RuntimeError:
        pass
    rows = x.shape[-2]
    leading = itertools.product(*(range(n) for n in x.shape[:-2]))
    return [(x[idx], i * rows) for i, idx in enumerate(leading)]


def iter_chunks(x: Tensor, chunk_size: int):
    """Yield ``(chunk, start, stop)``: a ``(n, V)`` view and its flat position range."""
    for block, offset in row_blocks(x):
        for r0 in range(0, block.shape[0], chunk_size):
            r1 = min(r0 + chunk_size, block.shape[0])
            yield block[r0:r1], offset + r0, offset + r1


def check_min_p(kappa: float) -> float:
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"min-p kappa must be in [0, 1], got {kappa}")
    return float(kappa)


def _just_below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value``: ``x > _just_below(v)`` means ``x >= v``."""
    v = torch.tensor(value, dtype=dtype)
    return torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)).item()


def proxy_from_shifted(
    shifted: Tensor,
    token_ids: Tensor,
    kappa: float,
    temperature: float,
    exp_shifted: Tensor | None = None,
) -> Tensor:
    """Proxy log-prob of ``token_ids`` from one chunk of ``shifted = z - max z`` (temperature 1).

    ``exp_shifted``, when given, is ``exp(shifted)`` already computed by the caller; it is
    overwritten (filtered entries zeroed) to save a temporary, and only used when T == 1.
    """
    if temperature == 1.0:
        weights = exp_shifted if exp_shifted is not None else shifted.exp()
    else:
        weights = (shifted / temperature).exp()
    # exp(s) >= kappa  <=>  exp(s / T) >= kappa ** (1 / T)
    cut = torch.tensor(kappa ** (1.0 / temperature), dtype=weights.dtype).item()
    token_weight = weights.gather(-1, token_ids[:, None]).squeeze(-1)
    kept_mass = F.threshold_(weights, _just_below(cut, weights.dtype), 0.0).sum(-1)
    token_shifted = shifted.gather(-1, token_ids[:, None]).squeeze(-1)
    proxy = token_shifted / temperature - kept_mass.log()
    return proxy.masked_fill(token_weight < cut, -math.inf)


@torch.no_grad()
def min_p_proxy_log_prob(
    logits: Tensor,
    token_ids: Tensor,
    kappa: float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Proxy log-prob of each token under the min-p filtered, renormalised distribution.

    Args:
        logits: ``(..., V)`` raw logits of the policy that generated the tokens.
        token_ids: ``(...)`` sampled token ids.
        kappa: min-p threshold relative to the most likely token (the paper's 0.02).
        temperature: temperature of the renormalised proxy (the filter itself uses 1).
        chunk_size: positions per chunk; default: ``default_chunk_size``.

    Returns:
        ``(...)`` detached log-probs, float32 (float64 for float64 logits); ``-inf`` where the
        sampled token was filtered out.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and token_ids {tuple(token_ids.shape)} do not match")
    kappa = check_min_p(kappa)
    dtype = compute_dtype(logits.dtype)
    chunk_size = chunk_size or default_chunk_size(logits.shape[-1], logits.device)
    ids = token_ids.reshape(-1).clamp(min=0)
    out = torch.empty(ids.numel(), dtype=dtype, device=logits.device)
    for chunk, start, stop in iter_chunks(logits.detach(), chunk_size):
        z = chunk.to(dtype)
        shifted = z - z.amax(-1, keepdim=True)
        out[start:stop] = proxy_from_shifted(shifted, ids[start:stop], kappa, temperature)
    return out.view(token_ids.shape)


@torch.no_grad()
def top_k_proxy_log_prob(
    top_log_probs: Tensor,
    top_token_ids: Tensor,
    token_ids: Tensor,
    kappa: float,
    temperature: float = 1.0,
    sampling_temperature: float = 1.0,
    sampled_log_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The min-p proxy of the sampled tokens from the generating policy's top-K log-probs.

    What vLLM reports instead of the logits: at each position the K most likely tokens and
    their log-probs ``l_i = log softmax(z / T_s)_i`` after the sampling temperature ``T_s``
    (vLLM's processed log-probs). Since ``T_s * (l_i - l_max) = z_i - z_max``, the filter at
    temperature 1 (``exp(z_i - z_max) >= kappa``) and the renormalised proxy at
    ``temperature`` are recovered exactly for every listed token, whatever ``T_s``.

    vLLM also reports the sampled token's own log-prob (``sampled_log_probs``); with it, a
    sampled token outside the K is judged by the filter like a listed one, and counted in
    the normaliser when kept. Those are the low-probability tokens at uncertain positions
    that Lp-Reg protects.

    Under ``rollout.top_p < 1`` the log-probs are of vLLM's top-p set, renormalised (a
    constant shift per position, which ``l_i - l_max`` cancels), and a listed token outside
    the set reads -inf: it counts as filtered, and a list that holds one holds every token
    the set kept. The proxy is then the min-p filter within the top-p set, as the learner's
    own is (``learner.token_stats``).

    The approximation: other tokens outside the list are treated as filtered (without
    ``sampled_log_probs`` an unlisted sampled token gets -inf), and the normaliser sums
    over the kept tokens it knows of only.
    It is exact wherever the list holds every kept token, which it does when its least
    likely entry is already filtered (everything unlisted is less likely still) or K is the
    vocabulary size. A fixed K is no guarantee: n kept tokens have ``n * kappa * p_max <=
    1``, so up to ``1 / (kappa * p_max)`` tokens survive the filter (at kappa = 0.02, 50
    only where ``p_max`` is 1, 100 at ``p_max = 0.5``, all of them for a uniform
    distribution). Where all K listed tokens are kept the proxy may be off, and ``inexact``
    says so: it puts the normaliser too low (proxy log-probs too high), and an unlisted
    kept sampled token reads as filtered.

    ``kappa = 0`` (no filter) needs the whole distribution's normaliser, which no list
    short of the vocabulary has; at ``temperature == sampling_temperature`` the proxy is the
    sampled token's own reported log-prob, exactly, and that is what it returns (a
    ValueError at any other temperature, or without ``sampled_log_probs``).

    Args:
        top_log_probs: ``(..., K)`` log-probs of the listed tokens, in any order; ``-inf``
            marks an empty slot.
        top_token_ids: ``(..., K)`` their token ids; a negative id marks an empty slot.
        token_ids: ``(...)`` the sampled tokens.
        kappa: min-p threshold relative to the most likely token.
        temperature: temperature of the renormalised proxy (as ``min_p_proxy_log_prob``).
        sampling_temperature: the temperature the log-probs were reported at.
        sampled_log_probs: ``(...)`` the sampled tokens' own log-probs, as reported with
            the list.

    Returns:
        ``(proxy, inexact)``: ``(...)`` proxy log-probs (float32, float64 for float64
        input; -inf where filtered or unlisted) and a bool tensor, True where every listed
        token passed the filter, so unlisted ones might have too.
    """
    if top_log_probs.shape != top_token_ids.shape or top_log_probs.shape[:-1] != token_ids.shape:
        raise ValueError(f"top_log_probs {tuple(top_log_probs.shape)}, top_token_ids "
                         f"{tuple(top_token_ids.shape)} and token_ids {tuple(token_ids.shape)} do not match")
    if temperature <= 0 or sampling_temperature <= 0:
        raise ValueError("temperatures must be positive")
    kappa = check_min_p(kappa)
    dtype = compute_dtype(top_log_probs.dtype)
    if kappa == 0.0:
        if sampled_log_probs is None or temperature != sampling_temperature:
            raise ValueError("the unfiltered proxy (kappa = 0) from top-K log-probs needs the sampled "
                             "tokens' own log-probs, at a proxy temperature equal to the sampling one")
        if sampled_log_probs.shape != token_ids.shape:
            raise ValueError(f"sampled_log_probs {tuple(sampled_log_probs.shape)} and token_ids "
                             f"{tuple(token_ids.shape)} do not match")
        return (sampled_log_probs.to(dtype).clone(),
                torch.zeros(token_ids.shape, dtype=torch.bool, device=token_ids.device))
    width = top_log_probs.shape[-1]
    if width == 0:
        shape = token_ids.shape
        return (torch.full(shape, -math.inf, dtype=dtype, device=token_ids.device),
                torch.zeros(shape, dtype=torch.bool, device=token_ids.device))
    top_ids = top_token_ids.reshape(-1, width)
    log_probs = top_log_probs.reshape(-1, width).to(dtype)
    ids = token_ids.reshape(-1, 1)
    listed = top_ids >= 0
    row_max = log_probs.masked_fill(~listed, -math.inf).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # Whether the list holds every kept token: judged on the K alone, before the sampled
    # token joins it.
    inexact = (((log_probs - row_max) * sampling_temperature).exp() >= kappa) | ~listed
    inexact = inexact.all(-1) & listed.any(-1)
    if sampled_log_probs is not None:
        if sampled_log_probs.shape != token_ids.shape:
            raise ValueError(f"sampled_log_probs {tuple(sampled_log_probs.shape)} and token_ids "
                             f"{tuple(token_ids.shape)} do not match")
        # One more column: the sampled token where the K do not list it (-1 otherwise).
        unlisted = ~((top_ids == ids) & listed).any(-1, keepdim=True)
        top_ids = torch.cat([top_ids, torch.where(unlisted, ids, torch.full_like(ids, -1))], -1)
        log_probs = torch.cat([log_probs, sampled_log_probs.reshape(-1, 1).to(dtype)], -1)
        listed = top_ids >= 0
    log_probs = log_probs.masked_fill(~listed, -math.inf)
    # z - z_max at temperature 1, for the listed tokens: what proxy_from_shifted expects.
    shifted = (log_probs - row_max) * sampling_temperature
    hit = (top_ids == ids) & listed
    position = hit.to(torch.int8).argmax(-1)  # first match; 0 when unlisted (masked below)
    proxy = proxy_from_shifted(shifted, position, kappa, temperature)
    proxy = proxy.masked_fill(~hit.any(-1), -math.inf)
    return proxy.view(token_ids.shape), inexact.view(token_ids.shape)
