"""Every check a config gets before anything starts.

Two kinds:

- per key, from the schema itself: a field declared with ``one_of`` must hold one of its
  choices, a field declared with ``within`` must lie in its range. Walking the schema
  means a new key with a declared constraint is checked without touching this file;
- across keys: combinations that no single key can judge (batch sizes that must divide,
  a group-normalised advantage that needs two samples per prompt, ...).

Each failure is a ``ConfigError`` with one line that names the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from conf.errors import ConfigError
from conf.schema import METRICS_LOGGERS, WEIGHT_SYNC_ALIASES, LpregConfig, Range, RolloutConfig

# Advantages that compare the samples of one prompt with each other.
GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo")
_REWARD_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def constrained_keys(node: Any = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, value)`` for every schema field that declares a choice or a range."""
    node = LpregConfig() if node is None else node
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from constrained_keys(value, key + ".")
        elif "choices" in f.metadata or "range" in f.metadata:
            yield key, f, value


def _format_choices(choices: tuple) -> str:
    return ", ".join(str(c) for c in choices)


def check_key(key: str, f: dataclasses.Field, value: Any) -> None:
    if "choices" in f.metadata:
        choices = f.metadata["choices"]
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {_format_choices(choices)}; "
                              f"got {value!r}")
    if "range" in f.metadata and value is not None:
        bounds: Range = f.metadata["range"]
        if not bounds.admits(value):
            raise ConfigError(f"config key '{key}' must be {bounds.describe()}; got {value!r}")


def validate(cfg: LpregConfig) -> None:
    """Raise ``ConfigError`` for the first problem found."""
    for key, f, value in constrained_keys(cfg):
        if key == "algorithm.lp_reg_min_p" and value == 0:
            # The first thing one tries for "no filter": say which key it is.
            raise ConfigError("config key 'algorithm.lp_reg_min_p' must be > 0 and < 1; got 0. For Lp-Reg "
                              "without the min-p filter set algorithm.lp_reg_filter=none")
        check_key(key, f, value)
    _check_combinations(cfg)


def _check_combinations(cfg: LpregConfig) -> None:
    task = cfg.data.synthetic
    if task.min_operand > task.max_operand:
        raise ConfigError(f"config key 'data.synthetic.min_operand' is {task.min_operand}, above "
                          f"data.synthetic.max_operand={task.max_operand}")

    sequences = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    split = cfg.algorithm.mini_batches_per_step * cfg.learner.num_workers
    if sequences % split:
        raise ConfigError(
            f"config key 'algorithm.mini_batches_per_step': {sequences} sequences per step "
            f"(data.prompts_per_step x rollout.samples_per_prompt) do not divide into "
            f"{cfg.algorithm.mini_batches_per_step} mini-batches x "
            f"{cfg.learner.num_workers} learners")
    if cfg.data.prompts_per_step % cfg.algorithm.mini_batches_per_step:
        raise ConfigError(
            f"config key 'algorithm.mini_batches_per_step': data.prompts_per_step="
            f"{cfg.data.prompts_per_step} is not a multiple of it, so a GRPO group "
            "would be split across mini-batches")
    if cfg.algorithm.advantage in GROUP_ADVANTAGES and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            f"config key 'rollout.samples_per_prompt' is {cfg.rollout.samples_per_prompt}, "
            f"but the '{cfg.algorithm.advantage}' advantage compares samples of one prompt "
            "and needs at least 2")
    if cfg.algorithm.clip_cov_lb >= cfg.algorithm.clip_cov_ub:
        raise ConfigError(f"config key 'algorithm.clip_cov_lb' ({cfg.algorithm.clip_cov_lb}) must "
                          f"be below algorithm.clip_cov_ub ({cfg.algorithm.clip_cov_ub})")

    betas = cfg.learner.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config key 'learner.betas' must be two numbers in [0, 1); got {betas}")

    # Ray rejects an empty bundle, and an actor asking for nothing would not be held
    # apart from anything anyway.
    if cfg.rollout.cpus_per_worker == 0 and cfg.rollout.gpus_per_worker == 0:
        raise ConfigError("config keys 'rollout.cpus_per_worker' and 'rollout.gpus_per_worker' "
                          "are both 0; a rollout worker needs some CPU or GPU")
    if cfg.learner.cpus_per_worker == 0 and cfg.learner.gpus_per_worker == 0:
        raise ConfigError("config keys 'learner.cpus_per_worker' and 'learner.gpus_per_worker' "
                          "are both 0; a learner needs some CPU or GPU")

    verifier = cfg.verifier
    if verifier.reward_fn is not None and not _REWARD_FN.match(verifier.reward_fn):
        raise ConfigError(f"config key 'verifier.reward_fn' must look like 'package.module:function'; "
                          f"got {verifier.reward_fn!r}")
    if not all(re.fullmatch(r"[A-Za-z]+", c) for c in verifier.boxed_commands):
        raise ConfigError("config key 'verifier.boxed_commands' must list LaTeX command names "
                          f"without the backslash, e.g. [boxed, fbox]; got {verifier.boxed_commands}")
    if not verifier.boxed_commands and not verifier.answer_line_fallback:
        raise ConfigError("config key 'verifier.boxed_commands' is empty and "
                          "verifier.answer_line_fallback is false: no answer could ever be found")

    name = cfg.trainer.run_name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"config key 'trainer.run_name' must be a plain directory name; got {name!r}")
    if not cfg.trainer.output_dir:
        raise ConfigError("config key 'trainer.output_dir' is empty")
    _check_loggers_and_overlong_buffer(cfg)
    _check_tool_plugins(cfg)
    _check_gpu_requests(cfg)
    _check_colocation(cfg)
    _check_unfiltered_proxy(cfg)
    if needs_top_logprobs(cfg) and cfg.rollout.top_logprobs < 1:
        raise ConfigError("config key 'rollout.top_logprobs' is 0, but algorithm.stale_policy "
                          f"({cfg.algorithm.stale_policy}) takes Lp-Reg's min-p proxy from the "
                          "generating policy's top-K log-probs: set rollout.top_logprobs >= 1")


def effective_stale_policy(cfg: LpregConfig) -> str:
    """``algorithm.stale_policy`` with ``auto`` resolved: the learner's policy in lock-step,
    the generating (behaviour) policy when samples can be stale."""
    policy = cfg.algorithm.stale_policy
    if policy != "auto":
        return policy
    return "behaviour" if cfg.rollout.max_staleness > 0 else "learner"


def needs_top_logprobs(cfg: LpregConfig) -> bool:
    """Whether the rollout workers must report top-K log-probs: the behaviour policy's min-p
    proxy. The unfiltered one is the sampled token's own log-prob, which needs no list."""
    return (effective_stale_policy(cfg) == "behaviour" and cfg.algorithm.loss == "lp_reg"
            and cfg.algorithm.lp_reg_filter == "min_p")


def _check_unfiltered_proxy(cfg: LpregConfig) -> None:
    """The generating policy's unfiltered proxy is what vLLM reports for the sampled token,
    at the sampling temperature; a top-K list cannot give it at another (its normaliser
    needs the whole vocabulary)."""
    algo = cfg.algorithm
    if (algo.loss == "lp_reg" and algo.lp_reg_filter == "none" and effective_stale_policy(cfg) == "behaviour"
            and algo.lp_reg_temperature != cfg.rollout.temperature):
        raise ConfigError(
            f"config keys 'algorithm.lp_reg_filter' and 'algorithm.lp_reg_temperature': with "
            f"lp_reg_filter=none and the generating policy as pi_old (algorithm.stale_policy="
            f"{algo.stale_policy}, rollout.max_staleness={cfg.rollout.max_staleness}) the proxy is the "
            f"sampled token's own log-prob at rollout.temperature={cfg.rollout.temperature:g}, not at "
            f"lp_reg_temperature={algo.lp_reg_temperature:g}; set the two equal, or "
            "algorithm.stale_policy=learner")


def effective_weight_sync(cfg: LpregConfig) -> str:
    """``rollout.weight_sync`` with ``auto`` and old names resolved.

    ``auto`` broadcasts when the rollout workers have GPUs, unless they share them with
    the learners (``ray.colocate``): NCCL refuses two ranks of one group on one device,
    and there the object store works."""
    transport = WEIGHT_SYNC_ALIASES.get(cfg.rollout.weight_sync, cfg.rollout.weight_sync)
    if transport != "auto":
        return transport
    gpus = cfg.rollout.gpus_per_worker > 0
    return "broadcast" if gpus and not shares_gpus(cfg) else "object_store"


def broadcast_wire(rollout: RolloutConfig) -> str:
    """The engines' weight-transfer backend under the broadcast transport: vLLM's NCCL
    engine when they have GPUs, lpreg's gloo engine on CPUs."""
    return "nccl" if rollout.gpus_per_worker > 0 else "gloo"


def shares_gpus(cfg: LpregConfig) -> bool:
    """Whether learner rank i and rollout worker i sit on one GPU: colocated, and their
    shares add up to one GPU at most (0.5 + 0.5). Ray gives a pair whose shares add up to
    more (0.5 + 1) different GPUs of their bundle."""
    learner, rollout = cfg.learner.gpus_per_worker, _rollout_gpus(cfg)
    return cfg.ray.colocate and learner > 0 and rollout > 0 and learner + rollout <= 1


def _rollout_gpus(cfg: LpregConfig) -> float:
    """GPUs one rollout worker asks Ray for: rollout.gpus_per_worker per tensor-parallel rank."""
    return cfg.rollout.gpus_per_worker * cfg.rollout.tensor_parallel_size


def _check_gpu_requests(cfg: LpregConfig) -> None:
    """GPU shares Ray can place: a fraction of one GPU, or whole GPUs."""
    rollout = cfg.rollout
    if rollout.tensor_parallel_size > 1 and 0 < rollout.gpus_per_worker < 1:
        raise ConfigError(
            f"config key 'rollout.gpus_per_worker' is {rollout.gpus_per_worker:g} with "
            f"rollout.tensor_parallel_size={rollout.tensor_parallel_size}: each tensor-parallel "
            "rank needs a whole GPU of its own")
    for key, gpus in (("learner.gpus_per_worker", cfg.learner.gpus_per_worker),
                      ("rollout.gpus_per_worker", _rollout_gpus(cfg))):
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"config key '{key}' asks for {gpus:g} GPUs per actor; Ray places "
                              "a fraction of one GPU or whole GPUs, not both")


def _check_colocation(cfg: LpregConfig) -> None:
    learner, rollout = cfg.learner.gpus_per_worker, _rollout_gpus(cfg)
    if cfg.ray.colocate and 0 < learner < 1 and 0 < rollout < 1 and learner + rollout > 1:
        raise ConfigError(
            f"config key 'ray.colocate': learner.gpus_per_worker={learner:g} and a rollout "
            f"worker's {rollout:g} GPU add up to more than one GPU, and both are fractions, so "
            "the pair fits neither on one GPU nor on separate ones; make the shares add up to "
            "at most 1 (e.g. 0.5 each), or give one of them whole GPUs")
    if shares_gpus(cfg) and effective_weight_sync(cfg) == "broadcast":
        raise ConfigError(
            f"config keys 'ray.colocate' and 'rollout.weight_sync': with ray.colocate=true, "
            f"learner.gpus_per_worker={cfg.learner.gpus_per_worker:g} and "
            f"rollout.gpus_per_worker={cfg.rollout.gpus_per_worker:g}, learner rank 0 and "
            "rollout worker 0 share one GPU, where NCCL cannot put two ranks of the weight "
            f"broadcast; set rollout.weight_sync=object_store (or auto), or give each a whole GPU")


def resolve_auto(cfg: LpregConfig) -> LpregConfig:
    """A copy with the automatic choices made, as the actors need them: the stale policy,
    the weight transport, and top-K log-probs asked of vLLM only when they are used."""
    return dataclasses.replace(
        cfg,
        algorithm=dataclasses.replace(cfg.algorithm, stale_policy=effective_stale_policy(cfg)),
        rollout=dataclasses.replace(
            cfg.rollout, weight_sync=effective_weight_sync(cfg),
            top_logprobs=cfg.rollout.top_logprobs if needs_top_logprobs(cfg) else 0))


def _check_tool_plugins(cfg: LpregConfig) -> None:
    for name, spec in cfg.tool.plugins.items():
        if name == "python":
            raise ConfigError("config key 'tool.plugins.python': python is the built-in, "
                              "sandboxed tool; give the plugin another name")
        if not _REWARD_FN.match(spec):
            raise ConfigError(f"config key 'tool.plugins.{name}' must look like "
                              f"'package.module:function'; got {spec!r}")
    if cfg.tool.name != "python" and cfg.tool.name not in cfg.tool.plugins:
        known = ", ".join(["python", *sorted(cfg.tool.plugins)])
        raise ConfigError(f"config key 'tool.name': no tool named {cfg.tool.name!r}; the tools are "
                          f"{known} (tool.plugins.NAME=package.module:function adds one)")


def _check_loggers_and_overlong_buffer(cfg: LpregConfig) -> None:
    unknown = [name for name in cfg.trainer.loggers if name not in METRICS_LOGGERS]
    if unknown:
        raise ConfigError(f"config key 'trainer.loggers' takes entries from "
                          f"{_format_choices(METRICS_LOGGERS)}; got {unknown[0]!r}")
    if "wandb" in cfg.trainer.loggers and not cfg.trainer.project:
        raise ConfigError("config key 'trainer.project' is empty; the wandb logger needs a "
                          "project name")
    # A buffer longer than the cap would punish responses of any length.
    buffer, cap = cfg.verifier.overlong_buffer_len, cfg.rollout.max_response_tokens
    if buffer > cap:
        raise ConfigError(f"config key 'verifier.overlong_buffer_len' ({buffer}) exceeds "
                          f"rollout.max_response_tokens ({cap})")
