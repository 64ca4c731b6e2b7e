"""What Lp-Reg costs on top of PPO-clip in one learner step.

The step is the tail of a training micro-batch: hidden states -> lm head -> logits ->
``token_stats`` -> ``policy_loss`` -> backward into the lm head and the hidden states. The
rest of the model is the same for every loss, so leaving it out makes the relative overhead
an upper bound of what a full model sees.

Variants, on the same batch:
- ``ppo_clip``: token_stats (log-prob, entropy for the metric) + the clipped surrogate;
- ``lp_reg``: the on-policy fast path: the same pass also yields the min-p proxy, old
  log-probs are the detached log-probs, then the Lp-Reg loss;
- ``ppo_clip_naive`` (reference point): ``log_softmax(...).gather`` and a full-vocabulary
  entropy, the textbook way.

Time: each repeat runs every variant once, alternating the order, after warm-up; we report
the ratio of the per-variant medians and, as "paired", the median of the per-repeat ratios.
On CUDA the clock is wall time around a synchronised step. On CPU it is, by default, the
process's CPU time (``time.process_time``), which other programs on a shared machine do not
inflate; use ``--threads 1`` so that idle-spinning worker threads are not counted either.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step minus the
memory held before it. On CPU torch's allocator has no such counter, so each variant runs
in a fresh process that resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) after building its inputs and reads ``VmHWM`` after one step:
the peak resident memory the step added.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from conf.schema import AlgorithmConfig
from learner import LossInputs, policy_loss, token_stats

VARIANTS = ("ppo_clip", "lp_reg", "ppo_clip_naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Setup:
    device: str
    batch: int
    length: int
    hidden: int
    vocab: int
    dtype: str
    chunk_size: int | None
    entropy: bool
    neg_frac: float
    min_p: float
    seed: int


def build_inputs(s: Setup) -> dict[str, torch.Tensor]:
    """A batch whose tokens are sampled from its own logits, as on-policy tokens are."""
    dtype, device = DTYPES[s.dtype], torch.device(s.device)
    g = torch.Generator(device=device).manual_seed(s.seed)
    hidden = torch.randn(s.batch, s.length, s.hidden, generator=g, device=device).to(dtype)
    # Scale so the next-token distributions are peaked like a language model's.
    weight = torch.randn(s.vocab, s.hidden, generator=g, device=device).mul_(4.0 / math.sqrt(s.hidden))
    weight = weight.to(dtype)
    ids = torch.empty(s.batch, s.length, dtype=torch.long, device=device)
    with torch.no_grad():
        for b in range(s.batch):
            probs = torch.softmax((hidden[b] @ weight.T).float(), -1)
            ids[b] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    lengths = torch.randint(s.length // 2, s.length + 1, (s.batch,), generator=g, device=device)
    mask = (torch.arange(s.length, device=device)[None, :] < lengths[:, None]).float()
    advantages = torch.randn(s.batch, 1, generator=g, device=device).expand(s.batch, s.length)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "ids": ids,
        "mask": mask,
        "advantages": advantages,
    }


def step(variant: str, x: dict[str, torch.Tensor], s: Setup) -> None:
    """Forward, loss and backward of one micro-batch; leaves gradients in hidden and weight."""
    logits = x["hidden"] @ x["weight"].T
    proxy = None
    if variant == "ppo_clip_naive":
        log_probs = torch.log_softmax(logits.float(), -1)
        log_prob = log_probs.gather(-1, x["ids"][..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if s.entropy else None
    else:
        stats = token_stats(
            logits, x["ids"], proxy_min_p=s.min_p if variant == "lp_reg" else None,
            compute_entropy=s.entropy, chunk_size=s.chunk_size,
        )
        log_prob, entropy, proxy = stats.log_prob, stats.entropy, stats.proxy_log_prob
    name = "lp_reg" if variant == "lp_reg" else "ppo_clip"
    algo = AlgorithmConfig(loss=name, lp_reg_neg_frac=s.neg_frac, lp_reg_min_p=s.min_p,
                           clip_ratio_low=1.0, clip_ratio_high=9.0)
    inputs = LossInputs(log_prob, log_prob.detach(), x["advantages"], x["mask"],
                        proxy_log_prob=proxy, entropy=entropy)
    loss, _ = policy_loss(name, inputs, algo)
    loss.backward()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _zero(x: dict[str, torch.Tensor]) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None


def time_variants(
    x: dict[str, torch.Tensor], s: Setup, variants: list[str], repeats: int, warmup: int, clock
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for v in variants:
            step(v, x, s)
            _zero(x)
    _sync(s.device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            _sync(s.device)
            t0 = clock()
            step(v, x, s)
            _sync(s.device)
            times[v].append(clock() - t0)
            _zero(x)
    return times


def cuda_peak_bytes(x: dict[str, torch.Tensor], s: Setup, variant: str) -> int:
    step(variant, x, s)  # warm-up: cuBLAS workspaces and the like are not the loss's memory
    _zero(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(variant, x, s)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    _zero(x)
    return peak


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_child(s: Setup, variant: str) -> int:
    """In a fresh process: peak resident memory one step adds, in bytes."""
    x = build_inputs(s)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    step(variant, x, s)
    return (_proc_status_kib("VmHWM") - before) * 1024


def cpu_peak_bytes(s: Setup, variant: str, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "launch.benchmarks.loss", *argv, "--memory-child", variant]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def check_against_naive(s: Setup) -> float:
    """Largest gradient / value difference between token_stats and the naive path, small shape."""
    small = Setup(**{**asdict(s), "batch": 2, "length": 64, "vocab": min(s.vocab, 4096)})
    x = build_inputs(small)
    results = []
    for naive in (False, True):
        step("ppo_clip_naive" if naive else "ppo_clip", x, small)
        results.append((x["hidden"].grad.float().clone(), x["weight"].grad.float().clone()))
        _zero(x)
    fast, naive = results
    diffs = [(a - b).abs().max() / (b.abs().max() + 1e-12) for a, b in zip(fast, naive, strict=True)]
    return max(d.item() for d in diffs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="lpreg bench loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 2 on CPU, 4 on CUDA)")
    p.add_argument("--length", type=int, default=None, help="response tokens (default 512 / 4096)")
    p.add_argument("--hidden", type=int, default=None, help="lm-head input size (default 1024 / 5120)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32768 / 151936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 / bfloat16")
    p.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: auto)")
    p.add_argument("--no-entropy", action="store_true", help="skip the entropy metric in every variant")
    p.add_argument("--neg-frac", type=float, default=0.01)
    p.add_argument("--min-p", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--check", action="store_true", help="first compare gradients with the naive path")
    p.add_argument("--clock", choices=["wall", "process"], default=None,
                   help="wall time, or this process's CPU time (default: process on CPU, wall on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock_name = args.clock or ("wall" if cuda else "process")
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    s = Setup(
        device=args.device,
        batch=args.batch or (4 if cuda else 2),
        length=args.length or (4096 if cuda else 512),
        hidden=args.hidden or (5120 if cuda else 1024),
        vocab=args.vocab or (151936 if cuda else 32768),
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        chunk_size=args.chunk_size,
        entropy=not args.no_entropy,
        neg_frac=args.neg_frac,
        min_p=args.min_p,
        seed=args.seed,
    )
    if args.memory_child:
        print(json.dumps({"peak_bytes": cpu_peak_child(s, args.memory_child)}))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    print(f"setup: {asdict(s)}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  clock {clock_name}")
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}")
    result: dict = {"setup": asdict(s), "torch": torch.__version__, "clock": clock_name,
                    "threads": torch.get_num_threads()}
    if args.check:
        result["check_max_rel_grad_diff"] = check_against_naive(s)
        print(f"check: max relative gradient difference vs naive = {result['check_max_rel_grad_diff']:.2e}")

    x = build_inputs(s)
    times = time_variants(x, s, variants, args.repeats, args.warmup, clock)
    peaks: dict[str, int] = {}
    if not args.no_memory:
        for v in variants:
            peaks[v] = cuda_peak_bytes(x, s, v) if cuda else cpu_peak_bytes(s, v, argv)

    base = "ppo_clip" if "ppo_clip" in variants else variants[0]
    rows = []
    for v in variants:
        ratios = [t / b for t, b in zip(times[v], times[base], strict=True)]
        row = {
            "variant": v,
            "median_s": statistics.median(times[v]),
            "time_vs_base": statistics.median(times[v]) / statistics.median(times[base]),
            "paired_time_vs_base": statistics.median(ratios),
            "times_s": times[v],
        }
        if peaks:
            row["peak_mib"] = peaks[v] / 2**20
            row["peak_vs_base"] = peaks[v] / peaks[base]
        rows.append(row)
    result["rows"] = rows

    header = f"\n{'variant':<16}{'median s':>10}{'time vs ' + base:>18}{'paired':>9}"
    if peaks:
        header += f"{'peak MiB':>11}{'mem vs ' + base:>17}"
    print(header)
    for r in rows:
        line = f"{r['variant']:<16}{r['median_s']:>10.4f}{(r['time_vs_base'] - 1) * 100:>+17.1f}%"
        line += f"{(r['paired_time_vs_base'] - 1) * 100:>+8.1f}%"
        if peaks:
            line += f"{r['peak_mib']:>11.0f}{(r['peak_vs_base'] - 1) * 100:>+16.1f}%"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
