"""The same tiny run with 1 and with 3 rollout workers: only rollout.num_workers changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900  # one run; engines start in about 20 s each on an idle 2-core machine


def _train(out: Path, num_workers: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a private local Ray, whatever the caller's shell says
    cmd = [sys.executable, "-m", "launch.cli", "train",
           "trainer.total_steps=2", f"trainer.run_name=workers{num_workers}",
           f"trainer.output_dir={out / 'runs'}", "trainer.eval_every=-1",
           f"rollout.num_workers={num_workers}", "learner.num_workers=1",
           # 8 prompts x 4 samples, pinned: a small step, whatever the defaults say.
           "data.prompts_per_step=8", "rollout.samples_per_prompt=4",
           # A random tiny model, built once and shared by both runs: this is about
           # placement and request balancing, not learning.
           "model.tiny.warm_start_steps=0", f"model.cache_dir={out / 'models'}"]
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    metrics_file = out / "runs" / f"workers{num_workers}" / "metrics.jsonl"
    metrics = ([json.loads(line) for line in metrics_file.read_text().splitlines()]
               if metrics_file.is_file() else [])
    return proc, metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[subprocess.CompletedProcess, list[dict]]]:
    out = tmp_path_factory.mktemp("scaling")
    return {n: _train(out, n) for n in (1, 3)}


@pytest.mark.parametrize("num_workers", [1, 3])
def test_run_succeeds(runs, num_workers):
    proc, metrics = runs[num_workers]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("reward/mean" in m for m in metrics)


@pytest.mark.parametrize("num_workers", [1, 3])
def test_each_worker_has_its_own_bundle(runs, num_workers):
    proc, _ = runs[num_workers]
    assert f"rollout: {num_workers} x {{CPU: 1}} PACK; learner: 1 x {{CPU: 1}} PACK" in proc.stderr


def test_every_one_of_three_workers_served_requests(runs):
    _, metrics = runs[3]
    for record in metrics:
        per_worker = record["rollout/requests_per_worker"]
        assert len(per_worker) == 3 and min(per_worker) > 0, per_worker
        # 8 prompts of 4 samples each, split 3/3/2 prompts.
        assert per_worker == [12, 12, 8]
        assert sum(per_worker) == record["rollout/num_samples"] == 32


def test_one_worker_serves_everything(runs):
    _, metrics = runs[1]
    assert [m["rollout/requests_per_worker"] for m in metrics] == [[32], [32]]


def _cpus_come_back(ray, cpus: float, within_s: float = 30) -> bool:
    """Ray releases a removed placement group asynchronously."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") == cpus:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def small_local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_placement_that_does_not_fit_names_the_group(small_local_ray):
    from conf.load import load_config
    from launch.cluster.placement import Placement, PlacementError

    cfg = load_config(overrides=["rollout.num_workers=3", "learner.num_workers=1",
                                 "ray.placement_timeout_s=3"])
    with pytest.raises(PlacementError) as failure:
        Placement.create(cfg)
    message = str(failure.value)
    assert "rollout placement group (3 x {CPU: 1}, PACK) could not be scheduled within 3s" in message
    assert "{CPU: 2, GPU: 0} in total" in message
    # Nothing stays reserved after the failure.
    assert _cpus_come_back(small_local_ray, 2.0)


def test_colocated_bundles_are_reserved_and_released(small_local_ray):
    from ray.util.placement_group import placement_group_table

    from conf.load import load_config
    from launch.cluster.placement import Placement

    cfg = load_config(overrides=["rollout.num_workers=2", "learner.num_workers=1",
                                 "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=0.5",
                                 "ray.colocate=true", "ray.placement_strategy=STRICT_PACK"])
    placement = Placement.create(cfg)
    (table,) = [t for t in placement_group_table().values() if t["state"] == "CREATED"]
    assert table["strategy"] == "STRICT_PACK"
    assert [b["CPU"] for b in table["bundles"].values()] == [1.0, 0.5]
    assert placement.rollout(1).placement_group_bundle_index == 1
    assert placement.learner(0).placement_group_bundle_index == 0
    placement.remove()
    assert _cpus_come_back(small_local_ray, 2.0)
