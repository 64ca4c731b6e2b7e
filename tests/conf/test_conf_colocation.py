"""``ray.colocate`` with the weight transports: what is refused at load, what ``auto`` picks.

Colocated with a fraction of a GPU each, learner rank 0 and rollout worker 0 sit on one
GPU, where NCCL will not put two ranks of the weight broadcast: ``broadcast`` (and its
old name ``nccl``) is refused there, and ``auto`` takes the object store. With whole
GPUs each, or not colocated, the pair does not share a device and may broadcast.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conf.load import ConfigError, load_config
from conf.validate import resolve_auto, shares_gpus

COLOCATED_HALVES = ["ray.colocate=true", "learner.gpus_per_worker=0.5",
                    "rollout.gpus_per_worker=0.5"]
COLOCATED_WHOLE = ["ray.colocate=true", "learner.gpus_per_worker=1", "rollout.gpus_per_worker=1"]


def transport(*overrides: str) -> str:
    return resolve_auto(load_config(overrides=list(overrides))).rollout.weight_sync


@pytest.mark.parametrize("name", ["broadcast", "nccl"])
def test_colocated_halves_refuse_broadcast_naming_both_keys(name):
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=[*COLOCATED_HALVES, f"rollout.weight_sync={name}"])
    message = str(refused.value)
    assert "'ray.colocate'" in message and "'rollout.weight_sync'" in message
    assert "\n" not in message


def test_colocated_halves_with_auto_use_the_object_store():
    cfg = load_config(overrides=COLOCATED_HALVES)
    assert shares_gpus(cfg)
    assert resolve_auto(cfg).rollout.weight_sync == "object_store"
    assert transport(*COLOCATED_HALVES, "rollout.weight_sync=object_store") == "object_store"


@pytest.mark.parametrize("name", ["auto", "broadcast", "nccl"])
def test_colocated_whole_gpus_broadcast(name):
    assert not shares_gpus(load_config(overrides=COLOCATED_WHOLE))
    assert transport(*COLOCATED_WHOLE, f"rollout.weight_sync={name}") == "broadcast"


@pytest.mark.parametrize("gpus", ["0.5", "1"])
def test_not_colocated_gpus_broadcast_with_auto(gpus):
    overrides = [f"learner.gpus_per_worker={gpus}", f"rollout.gpus_per_worker={gpus}"]
    assert not shares_gpus(load_config(overrides=overrides))
    assert transport(*overrides) == "broadcast"


@pytest.mark.parametrize("colocate", ["false", "true"])
def test_cpu_auto_uses_the_object_store(colocate):
    assert transport(f"ray.colocate={colocate}") == "object_store"


def test_cpu_colocated_may_broadcast_over_gloo():
    # No GPU to share: the broadcast runs over gloo, which takes two ranks on one host.
    assert transport("ray.colocate=true", "rollout.weight_sync=broadcast") == "broadcast"


def test_fractional_gpus_per_tensor_parallel_rank_are_refused():
    # rollout.gpus_per_worker is per tensor-parallel rank, and each rank needs its own GPU.
    with pytest.raises(ConfigError, match="'rollout.gpus_per_worker' is 0.5 with "
                                          "rollout.tensor_parallel_size=2"):
        load_config(overrides=[*COLOCATED_HALVES, "rollout.tensor_parallel_size=2"])


def test_a_pair_whose_shares_add_up_to_more_than_one_gpu_does_not_share_one():
    # 0.5 + 1: Ray gives the two different GPUs of their bundle, so they may broadcast.
    cfg = load_config(overrides=["ray.colocate=true", "learner.gpus_per_worker=0.5",
                                 "rollout.gpus_per_worker=1"])
    assert not shares_gpus(cfg)
    assert transport("ray.colocate=true", "learner.gpus_per_worker=0.5",
                     "rollout.gpus_per_worker=1") == "broadcast"
    cfg = load_config(overrides=["ray.colocate=true", "learner.gpus_per_worker=0.25",
                                 "rollout.gpus_per_worker=0.25"])
    assert shares_gpus(cfg)


@pytest.mark.parametrize("shares", [("0.5", "0.75"), ("0.6", "0.6")])
def test_fractions_that_fit_neither_one_gpu_nor_separate_ones_are_refused(shares):
    # Ray reserves such a bundle but never starts the pair's actors.
    learner, rollout = shares
    with pytest.raises(ConfigError, match="'ray.colocate'.*more than one GPU"):
        load_config(overrides=["ray.colocate=true", f"learner.gpus_per_worker={learner}",
                               f"rollout.gpus_per_worker={rollout}"])


def test_a_gpu_request_above_one_must_be_whole():
    with pytest.raises(ConfigError, match="'learner.gpus_per_worker' asks for 1.5 GPUs"):
        load_config(overrides=["learner.gpus_per_worker=1.5"])


def test_the_command_line_refuses_colocated_halves_with_broadcast(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "ray.colocate=true",
                           "learner.gpus_per_worker=0.5", "rollout.gpus_per_worker=0.5",
                           "rollout.weight_sync=broadcast", f"trainer.output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lpreg: error: config keys 'ray.colocate' and 'rollout.weight_sync'")
    assert not out.exists()
