"""Connecting to Ray: a private local cluster by default, an existing one on request."""

from __future__ import annotations

import math
import os

from conf.schema import LpregConfig


def required_resources(cfg: LpregConfig) -> tuple[float, float]:
    """CPUs and GPUs that all actors together ask for."""
    rollout, learner = cfg.rollout, cfg.learner
    cpus = rollout.num_workers * rollout.cpus_per_worker + learner.num_workers * learner.cpus_per_worker
    gpus = (rollout.num_workers * rollout.gpus_per_worker * rollout.tensor_parallel_size
            + learner.num_workers * learner.gpus_per_worker)
    return cpus, gpus


def cluster_address(cfg: LpregConfig) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: LpregConfig) -> str:
    """Start or join Ray; returns a description of which."""
    import ray

    if ray.is_initialized():
        return "existing connection"
    address = cluster_address(cfg)
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return f"cluster at {address}"
    cpus, gpus = required_resources(cfg)
    # "local" always starts a private cluster: a bare ray.init() would try to join a
    # stale cluster left in Ray's temp folder by an earlier `ray start`.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus))
    ray.init(address="local", num_cpus=num_cpus, num_gpus=math.ceil(gpus) or None,
             include_dashboard=False, runtime_env=env, log_to_driver=True)
    return f"local Ray with {num_cpus} logical CPUs"


def check_capacity(cfg: LpregConfig) -> None:
    """Fail early, naming the key, when the cluster lacks the GPUs the config asks for."""
    import ray

    from conf.load import ConfigError

    _, gpus = required_resources(cfg)
    available = ray.cluster_resources().get("GPU", 0.0)
    if gpus > available:
        raise ConfigError(
            f"config keys 'rollout.gpus_per_worker'/'learner.gpus_per_worker' ask for "
            f"{gpus:g} GPUs but the Ray cluster has {available:g}")
