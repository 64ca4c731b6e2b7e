"""Weight sync: the object store against the broadcast, by model size and rollout workers.

For each model size and rollout worker count, one rollout pool and one learner group
(one rank, ZeRO stage 0) are started once, and both transports of
``launch.training.weight_sync`` push into the same engines, alternately (ABBA rounds, so
slow drift of a shared machine hits both alike):

- ``object_store``: learner rank 0 puts its full state into Ray's object store; every
  worker reads it and reloads in place;
- ``broadcast``: learner rank 0 sends the weights straight into every engine through
  vLLM's weight-transfer API, one gloo broadcast per push; its first push forms the group.

The pool is built with ``rollout.weight_sync=broadcast``, so every engine has its
weight-transfer endpoint open; such an engine takes object-store loads as well
(``RolloutWorker.load_weights`` reloads in place either way).

Before every push learner rank 0 scales its weights by 1.01, so each push carries new
weights. After it every engine samples a few tokens. Their log-probs must be the
learner's to 1e-4 (the scaling moves them by far more), under the pushed version, and
every engine's checksum must be equal. The checksum alone would not do: on CPU, vLLM
repacks linear weights out of the engine's parameters.

Reported per transport:

- the first push: object store first, then the broadcast, which includes forming its group;
- the median of the timed pushes;
- MB per push (1 MB = 1e6 bytes; both transports send the tied embedding under both of its
  names), and MB/s;
- the ratio broadcast / object store of the medians.

Where the time goes is read from Ray's task timeline: each actor call on a push's path, and
the "driver only" rest, in which no actor call ran.

The models are random Qwen2-architecture models with tied embeddings and head_dim 64
(CPU attention needs it), built once per size into a scratch directory.

Every process of the bench's Ray cluster runs with ``MALLOC_MMAP_THRESHOLD_=1 MiB``.
glibc otherwise keeps the memory freed by every reload: at 200M a rollout worker grows from
3.3 to about 9.5 GB, and two of them beside a learner do not fit in 24 GB. The setting
returns freed tensors to the system instead. ``--malloc-default`` leaves malloc alone.

    lpreg bench sync [--sizes 4M,50M,200M] [--workers 1,2] [--pushes 5] [--json PATH]
                     [--malloc-default] [--zero-copy-tensors]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TRANSPORT_ORDER = ("object_store", "broadcast")
SCALE = 1.01  # learner rank 0 scales its weights by this before every push


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-architecture model with tied embeddings (head_dim = hidden / heads = 64)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None  # None: as many as heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * self.head_dim

    def num_parameters(self) -> int:
        """Counted from the shape: the tied embedding once; per layer q/k/v with biases,
        o without, gate/up/down, two RMSNorms; the final norm."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = (h * h + h) + 2 * (h * kv + kv) + h * h
        per_layer = attention + 3 * h * i + 2 * h
        return self.vocab * h + self.layers * per_layer + h

    def num_tensors(self) -> int:
        """Tensors per push: every named parameter, the tied output projection included."""
        return 2 + self.layers * 12 + 1

    def push_bytes(self, itemsize: int = 4) -> int:
        """Bytes per push: the tied embedding travels twice (as ``lm_head.weight`` too)."""
        return (self.num_parameters() + self.vocab * self.hidden) * itemsize

    def qwen2_config(self, tokenizer_len: int, max_position_embeddings: int = 256) -> dict:
        """Keyword arguments of ``transformers.Qwen2Config``."""
        return dict(vocab_size=max(self.vocab, tokenizer_len), hidden_size=self.hidden,
                    intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads or self.heads, head_dim=self.head_dim,
                    max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)


# The tiny model's own vocabulary (98 characters) at 4M; a 32k vocabulary above it.
SIZES: dict[str, ModelShape] = {
    "4M": ModelShape(hidden=256, layers=4, heads=4, intermediate=1024, vocab=98),
    "50M": ModelShape(hidden=512, layers=8, heads=8, intermediate=2048, vocab=32000),
    "200M": ModelShape(hidden=1024, layers=12, heads=16, intermediate=3072, vocab=32000),
}
ADVERTISED = {"4M": 4e6, "50M": 50e6, "200M": 200e6}


def parse_list(text: str, allowed=None, cast=str) -> list:
    items = [cast(part.strip()) for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("an empty list")
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    return items


def push_order(rounds: int, transports: tuple[str, ...] = TRANSPORT_ORDER) -> list[str]:
    """ABBA: each round both transports once, the first one alternating."""
    order: list[str] = []
    for index in range(rounds):
        order.extend(transports if index % 2 == 0 else tuple(reversed(transports)))
    return order


def summarize(first_s: float, timed_s: list[float], num_bytes: int) -> dict:
    """One transport at one (size, workers): seconds, MB per push, MB/s of the median."""
    median = statistics.median(timed_s)
    mb = num_bytes / 1e6
    return {"first_s": first_s, "median_s": median, "min_s": min(timed_s), "max_s": max(timed_s),
            "timed_s": list(timed_s), "mb_per_push": mb,
            "mb_per_s": mb / median if median > 0 else math.inf}


def ratio(result: dict, key: str = "median_s") -> float:
    """broadcast / object_store of ``key``: above 1, the broadcast is slower."""
    return result["broadcast"][key] / result["object_store"][key]


def format_table(rows: list[dict]) -> str:
    header = (f"{'size':>5} {'params':>12} {'wk':>2} {'MB/push':>8} | {'os first':>8} "
              f"{'os med':>7} {'os MB/s':>8} | {'bc first':>8} {'bc med':>7} {'bc MB/s':>8} "
              f"| {'bc/os':>5} {'first':>5}")
    lines = [header, "-" * len(header)]
    for row in rows:
        os_, bc = row["object_store"], row["broadcast"]
        lines.append(
            f"{row['size']:>5} {row['params']:>12,} {row['workers']:>2} {os_['mb_per_push']:>8.1f} | "
            f"{os_['first_s']:>8.3f} {os_['median_s']:>7.3f} {os_['mb_per_s']:>8.0f} | "
            f"{bc['first_s']:>8.3f} {bc['median_s']:>7.3f} {bc['mb_per_s']:>8.0f} | "
            f"{ratio(row):>5.2f} {ratio(row, 'first_s'):>5.2f}")
    return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
    """Per (size, workers, transport): the median seconds of each part of a timed push, and
    the group formation of the broadcast's first push."""
    lines = []
    for row in rows:
        for transport in TRANSPORT_ORDER:
            parts = row[transport].get("breakdown") or {}
            if parts:
                text = ", ".join(f"{name} {seconds:.3f}" for name, seconds in parts.items())
                lines.append(f"{row['size']:>5} x {row['workers']} {transport:<12}: {text}")
        first = {k: v for k, v in (row["broadcast"].get("first_breakdown") or {}).items()
                 if "group" in k}
        if first:
            text = ", ".join(f"{name} {seconds:.3f}" for name, seconds in first.items())
            lines.append(f"{row['size']:>5} x {row['workers']} first broadcast: {text}")
    return "\n".join(lines)


# -- the actors --------------------------------------------------------------------------
def build_tokenizer(vocab: int):
    """The tiny model's character tokenizer, padded with ``<xN>`` tokens to ``vocab``
    entries, so that every id a random model may sample decodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from launch.models.tiny_model import CHARACTERS, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

    tokens = list(SPECIAL_TOKENS + CHARACTERS)
    tokens += [f"<x{i}>" for i in range(len(tokens), vocab)]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, bos_token=None,
                                   clean_up_tokenization_spaces=False)


def build_model(output_dir: Path, shape: ModelShape, seed: int = 0) -> tuple[Path, int]:
    """A random model of ``shape`` with a tokenizer of its vocabulary; its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from launch.models.tiny_model import save_tiny_model

    tokenizer = build_tokenizer(shape.vocab)
    config = Qwen2Config(**shape.qwen2_config(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    count = sum(p.numel() for p in model.parameters())
    save_tiny_model(model, tokenizer, output_dir, {"bench_sync": asdict(shape)})
    return output_dir, count


def _learner_logprobs(actor, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """In learner rank 0: log p(response token) at temperature 1, for each (prompt, response)."""
    import torch

    module = actor.engine.module
    result = []
    with torch.no_grad():
        for prompt, response in sequences:
            logits = module(input_ids=torch.tensor([prompt + response])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            result.append([float(logprobs[len(prompt) - 1 + j, token])
                           for j, token in enumerate(response)])
    return result


def _scale(actor, factor: float, probe: list[tuple[list[int], list[int]]]) -> float:
    """In learner rank 0: scale every parameter (the tied embedding once); returns how far
    that moves the log-probs of ``probe``, the most at any position."""
    import torch

    before = _learner_logprobs(actor, probe)
    with torch.no_grad():
        for param in actor.engine.module.parameters():
            param.mul_(factor)
    return max_abs_diff(before, _learner_logprobs(actor, probe))


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for row_a, row_b in zip(a, b, strict=True)
                for x, y in zip(row_a, row_b, strict=True)), default=0.0)


PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]  # any ids: the model is random
VERIFY_TOKENS = 4
PROBE = [(PROMPT, [13, 14, 15, 16])]


class Verifier:
    """Proves that a push arrived whole in every engine: each engine samples a few tokens
    (one group per worker), and their log-probs must be the learner's current weights'
    (every layer takes part, so a stale linear layer shows), not the previous ones'; every
    sample must carry the pushed version; every engine's checksum (which on CPU covers
    only the embedding, norms and biases: vLLM repacks linear weights out of its
    parameters) must agree."""

    def __init__(self, pool, rank0, workers: int, tolerance: float = 1e-4) -> None:
        self.pool, self.rank0, self.workers, self.tolerance = pool, rank0, workers, tolerance
        self.calls = 0
        self.worst_error = 0.0  # engine against the learner's current weights
        self.least_change = math.inf  # the learner's current weights against the previous

    def sample(self, version: int) -> list:
        from rollout.types import GroupRequest, SamplingSettings

        self.calls += 1
        sampling = SamplingSettings(samples_per_prompt=1, temperature=1.0, top_p=1.0,
                                    max_response_tokens=VERIFY_TOKENS, seed=self.calls)
        # One group each: the least-loaded worker takes each group, lowest index first.
        groups = self.pool.generate([
            GroupRequest(self.pool.group_id(f"verify{self.calls}-{i}"), PROMPT, sampling)
            for i in range(self.workers)])
        samples = [group.samples[0] for group in groups]
        if sorted(s.worker_index for s in samples) != list(range(self.workers)):
            raise RuntimeError(f"verification samples came from workers "
                               f"{[s.worker_index for s in samples]}, not one from each")
        if any(s.weight_version != version for s in samples):
            raise RuntimeError(f"after push v{version} the engines sampled under versions "
                               f"{[s.weight_version for s in samples]}")
        return samples

    def check(self, what: str, version: int) -> float:
        """Raises unless every engine holds the learner's weights as ``version``; returns
        the largest log-prob difference between an engine and the learner."""
        import ray

        samples = self.sample(version)
        sequences = [(list(s.prompt_token_ids), list(s.response_token_ids)) for s in samples]
        engines = [list(s.response_logprobs) for s in samples]
        learner = ray.get(self.rank0.__ray_call__.remote(_learner_logprobs, sequences))
        error = max_abs_diff(engines, learner)
        self.worst_error = max(self.worst_error, error)
        if error > self.tolerance:
            raise RuntimeError(f"{what}: the engines' log-probs differ from the learner's by "
                               f"{error:.2e} (> {self.tolerance:g}): the weights did not arrive")
        checksums = self.pool.checksums()
        if len(checksums) != self.workers or max(checksums) - min(checksums) > 1e-9 * max(checksums):
            raise RuntimeError(f"{what}: the engines' checksums disagree: {checksums}")
        return error

    def perturb(self, factor: float) -> None:
        """Scale the learner's weights; they must move the log-probs well past the tolerance,
        or a stale engine could pass."""
        import ray

        change = ray.get(self.rank0.__ray_call__.remote(_scale, factor, PROBE))
        self.least_change = min(self.least_change, change)
        if change <= 10 * self.tolerance:
            raise RuntimeError(f"scaling the weights by {factor} moved the log-probs by only "
                               f"{change:.2e}: a stale engine would pass the check")


# -- where the time goes: Ray's task timeline --------------------------------------------
# Actor methods per transport -> label; "top" ones run one after another on the driver's
# critical path, so the part of a push that none of them covers is the driver's own.
BREAKDOWN = {
    "object_store": {"Learner.export_weights": "learner export+put",
                     "RolloutWorker.load_weights": "engine get+reload"},
    "broadcast": {"RolloutWorker.begin_weight_update": "engine park",
                  "RolloutWorker.shutdown_weight_transfer_engine": "engine close group",
                  "Learner.open_weight_transfer": "learner open group",
                  "RolloutWorker.init_weight_transfer_engine": "engine join group",
                  "Learner.broadcast_weights": "learner send call",
                  "RolloutWorker.start_weight_update": "engine start",
                  "RolloutWorker.update_weights": "engine receive+load",
                  "RolloutWorker.finish_weight_update": "engine finish",
                  "RolloutWorker.end_weight_update": "engine resume"},
}
TOP_LEVEL = {"Learner.export_weights", "RolloutWorker.load_weights", "Learner.last_export_stats",
             "RolloutWorker.begin_weight_update", "RolloutWorker.shutdown_weight_transfer_engine",
             "Learner.open_weight_transfer", "Learner.broadcast_weights",
             "RolloutWorker.end_weight_update"}
DRIVER_ONLY = "driver only"


def _method(event: dict) -> str | None:
    """``Class.method`` of a duration event of an actor task, else None."""
    category = event.get("cat", "")
    if event.get("ph") != "X" or not category.startswith("task::"):
        return None
    return category.removeprefix("task::")


def timeline_seconds(events: list[dict], names: dict[str, str]) -> dict[str, float]:
    """Seconds in each actor method of ``names`` ("Class.method" -> label) among Ray
    timeline ``events``: summed per actor, then the mean over the actors that ran it."""
    per_actor: dict[str, dict[str, float]] = {}
    for event in events:
        method = _method(event)
        if method in names:
            actors = per_actor.setdefault(names[method], {})
            actors[event.get("tid")] = actors.get(event.get("tid"), 0.0) + event.get("dur", 0) / 1e6
    return {label: sum(actors.values()) / len(actors) for label, actors in per_actor.items()}


def uncovered_seconds(events: list[dict], start_us: float, end_us: float,
                      methods: set[str] = TOP_LEVEL) -> float:
    """Seconds of [start, end] in which none of ``methods`` ran on any actor."""
    spans = sorted((max(e["ts"], start_us), min(e["ts"] + e.get("dur", 0), end_us))
                   for e in events if _method(e) in methods)
    covered, reach = 0.0, start_us
    for begin, finish in spans:
        if finish > reach:
            covered += finish - max(begin, reach)
            reach = finish
    return max(0.0, (end_us - start_us) - covered) / 1e6


def breakdown(events: list[dict], names: dict[str, str], spans: list[tuple[float, float]]) -> dict:
    """Per label, the median over the pushes in ``spans`` (epoch seconds) of its seconds in
    each push; ``driver only``: the part of each push no actor call covered."""
    per_push: dict[str, list[float]] = {}
    for start, end in spans:
        window = [e for e in events if start * 1e6 <= e.get("ts", 0) <= end * 1e6]
        seconds = timeline_seconds(window, names)
        seconds[DRIVER_ONLY] = uncovered_seconds(window, start * 1e6, end * 1e6)
        for label, value in seconds.items():
            per_push.setdefault(label, []).append(value)
    return {label: statistics.median(per_push[label]) for label in [*names.values(), DRIVER_ONLY]
            if len(per_push.get(label, [])) == len(spans)}


def _timeline() -> list[dict]:
    import ray

    time.sleep(2.0)  # workers report their task events about once a second
    try:
        return ray.timeline() or []
    except Exception:  # noqa: BLE001 - the breakdown is extra; the timings stand without it
        return []


# -- one (size, workers) --------------------------------------------------------------------
def measure(size: str, workers: int, model_path: str, pushes: int, timeout_s: float,
            log) -> dict:
    """One pool and one learner group; 1 warm-up + ``pushes`` timed pushes per transport."""
    from conf.load import load_config
    from conf.validate import resolve_auto
    from launch.cluster.learner_group import LearnerGroup
    from launch.cluster.rollout_pool import RolloutPool
    from launch.training.weight_sync import make_weight_sync

    cfg = resolve_auto(load_config(overrides=[
        f"model.path={model_path}", f"rollout.num_workers={workers}", "rollout.weight_sync=broadcast",
        "rollout.max_num_seqs=16", f"rollout.timeout_s={timeout_s}", "learner.num_workers=1",
        "learner.zero_stage=0", f"learner.timeout_s={timeout_s}"]))
    assert cfg.rollout.weight_sync == "broadcast"
    started = time.perf_counter()
    pool = learners = None
    pids: list[int] = []
    try:
        pool = RolloutPool(workers, model_path, cfg.model, cfg.rollout, seed=0)
        pids += [a["pid"] for a in pool.describe_actors()]
        learners = LearnerGroup(model_path, cfg.model, cfg.learner, cfg.algorithm,
                                temperature=cfg.rollout.temperature, total_steps=1, seed=0)
        pids += [a["pid"] for a in learners.describe_actors()]
        actors_s = time.perf_counter() - started
        log(f"{size} x {workers}: actors ready in {actors_s:.1f}s")
        # Each sets the pool's hooks for replacement workers; none is replaced here.
        syncs = {name: make_weight_sync(name, learners, pool, timeout_s, partial=False)
                 for name in TRANSPORT_ORDER}
        verifier = Verifier(pool, learners.rank0, workers)
        verifier.check("before any push", 0)
        seconds: dict[str, list[float]] = {name: [] for name in TRANSPORT_ORDER}
        sizes: dict[str, tuple[int, int]] = {}
        spans: dict[str, list[tuple[float, float]]] = {name: [] for name in TRANSPORT_ORDER}
        for version, name in enumerate(list(TRANSPORT_ORDER) + push_order(pushes), start=1):
            verifier.perturb(SCALE)
            wall = time.time()
            report = syncs[name].push(version)
            spans[name].append((wall, time.time()))
            seconds[name].append(report.seconds)
            sizes[name] = (report.num_tensors, report.num_bytes)
            verifier.check(f"{size} x {workers}: {name} push v{version}", version)
        result: dict = {"size": size, "workers": workers, "pushes": pushes, "actors_start_s": actors_s,
                        "verify": {"pushes_checked": 2 + 2 * pushes,
                                   "max_engine_vs_learner": verifier.worst_error,
                                   "min_change_per_push": verifier.least_change}}
        events = _timeline()
        for name in TRANSPORT_ORDER:
            result[name] = summarize(seconds[name][0], seconds[name][1:], sizes[name][1])
            result[name]["num_tensors"] = sizes[name][0]
            result[name]["first_breakdown"] = breakdown(events, BREAKDOWN[name], spans[name][:1])
            result[name]["breakdown"] = breakdown(events, BREAKDOWN[name], spans[name][1:])
        return result
    finally:
        for group in (pool, learners):
            if group is not None:
                group.shutdown()
        _wait_gone(pids)


def _wait_gone(pids: list[int], timeout_s: float = 60.0) -> None:
    """Until the killed actors' processes have exited and given their memory back."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)  # signal 0: only asks whether it exists
            except ProcessLookupError:
                break
            except PermissionError:
                break
            time.sleep(0.2)


def _build_in_subprocess(output_dir: Path, shape: ModelShape) -> tuple[Path, int]:
    """``build_model`` in a process of its own, so the driver does not keep its memory."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(build_model, output_dir, shape).result()


MALLOC_MMAP_THRESHOLD = str(1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpreg bench sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda t: parse_list(t, SIZES), default=list(SIZES),
                        help=f"model sizes, of {','.join(SIZES)} (default: all)")
    parser.add_argument("--workers", type=lambda t: parse_list(t, cast=int), default=[1, 2],
                        help="rollout worker counts (default: 1,2)")
    parser.add_argument("--pushes", type=int, default=5,
                        help="timed pushes per transport, after one warm-up each (default: 5)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a push or a worker call may take")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc as it is (default: MALLOC_MMAP_THRESHOLD_=1 MiB "
                             "for every process, see above)")
    parser.add_argument("--zero-copy-tensors", action="store_true",
                        help="what-if: RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1, so the object store "
                             "hands torch tensors over without a copy (lpreg does not set it)")
    args = parser.parse_args(argv)
    if args.pushes < 1 or any(w < 1 for w in args.workers):
        parser.error("--pushes and --workers must be at least 1")

    def log(message: str) -> None:
        print(f"[sync] {message}", file=sys.stderr, flush=True)

    # Set before Ray starts: its processes inherit them.
    settings = {}
    if not args.malloc_default:
        settings["MALLOC_MMAP_THRESHOLD_"] = MALLOC_MMAP_THRESHOLD
    if args.zero_copy_tensors:
        settings["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
    os.environ.update(settings)

    import ray

    from conf.schema import RolloutConfig
    from rollout.worker import engine_env

    os.environ.update(engine_env(RolloutConfig()))
    began = time.perf_counter()
    result: dict = {"settings": settings, "pushes": args.pushes, "rows": [], "failed": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory(prefix="lpreg-bench-sync-") as scratch:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        try:
            for size in args.sizes:
                shape = SIZES[size]
                t0 = time.perf_counter()
                path, count = _build_in_subprocess(Path(scratch) / size, shape)
                log(f"{size}: {count:,} parameters (hidden {shape.hidden}, {shape.layers} layers, "
                    f"{shape.heads} heads, intermediate {shape.intermediate}, vocab {shape.vocab}), "
                    f"built in {time.perf_counter() - t0:.1f}s")
                for workers in args.workers:
                    try:
                        row = measure(size, workers, str(path), args.pushes, args.timeout, log)
                    except Exception as err:  # noqa: BLE001 - reported; the other rows still run
                        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                        log(f"{size} x {workers} failed: {type(err).__name__}: {first[:300]}")
                        result["failed"].append({"size": size, "workers": workers,
                                                 "error": f"{type(err).__name__}: {first[:300]}"})
                        save()
                        continue
                    row["params"], row["shape"] = count, asdict(shape)
                    result["rows"].append(row)
                    save()
                    log(f"{size} x {workers}: object store {row['object_store']['median_s']:.3f}s, "
                        f"broadcast {row['broadcast']['median_s']:.3f}s per push")
                shutil.rmtree(path, ignore_errors=True)
        finally:
            ray.shutdown()
    result["total_s"] = time.perf_counter() - began
    save()
    print(report(result))
    return 1 if result["failed"] else 0


def report(result: dict) -> str:
    rows = result["rows"]
    settings = " ".join(f"{k}={v}" for k, v in result["settings"].items()) or "none"
    lines = [f"weight sync: {result['pushes']} timed pushes per transport after 1 warm-up each "
             f"(ABBA), 1 learner rank (ZeRO-0), fp32; seconds per push; MB = 1e6 bytes; "
             f"environment: {settings}", format_table(rows),
             "bc/os: broadcast / object store, of the medians ('first': of the first pushes)"]
    for failure in result["failed"]:
        lines.append(f"{failure['size']} x {failure['workers']} FAILED: {failure['error']}")
    parts = format_breakdown(rows)
    if parts:
        lines += ["", "where a push goes, from Ray's task timeline (median s per timed push; "
                      "engine figures are per engine; 'driver only': no actor call running):", parts]
    lines.append("")
    for row in rows:
        check = row["verify"]
        lines.append(f"verified {row['size']} x {row['workers']}: {check['pushes_checked']} pushes, "
                     f"every engine's log-probs within {check['max_engine_vs_learner']:.1e} of the "
                     f"learner's; each push moved them by at least {check['min_change_per_push']:.1e}")
    lines.append(f"total {result['total_s']:.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
