"""Connecting to Ray: a private local cluster by default, an existing one on request."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

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


def connect(cfg: LpregConfig, logs_dir: Path | None = None, verbose: bool = True) -> str:
    """Start or join Ray; returns a description of which.

    ``logs_dir``: every actor sends its own output to a file there (launch.reporting.output).
    ``verbose=False``: Ray streams nothing from the actors to this terminal, and says
    nothing below a warning itself.
    """
    import ray

    from launch.reporting.output import ray_runtime_env

    if ray.is_initialized():
        return "existing connection"
    address = cluster_address(cfg)
    common = dict(runtime_env=ray_runtime_env(logs_dir, verbose), log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        ray.init(address=address, **common)
        return f"cluster at {address}"
    cpus, gpus = required_resources(cfg)
    # "local" always starts a private cluster: a bare ray.init() would try to join a
    # stale cluster left in Ray's temp folder by an earlier `ray start`.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus))
    # A private cluster always has token authentication on, and Ray says so at every
    # start; it stays on, unannounced.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    if not verbose:
        auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=math.ceil(gpus) or None,
                 include_dashboard=False, **common)
    finally:
        auth_log.setLevel(level)
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
