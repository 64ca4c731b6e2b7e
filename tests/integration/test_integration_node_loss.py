"""A lost node, on a real multi-node Ray cluster on one machine.

Ray's own ``ray.cluster_utils.Cluster`` starts a head with no CPUs (it runs no actor, as
on many real clusters) and nodes A and B of 2 CPUs each, in a temp folder of its own.
``lpreg train`` joins it as a user's job does (``ray.address``), with
``ray.placement_strategy=SPREAD``: A and B each hold one rollout worker and one learner
rank. The cluster's health checks are fast (a node is declared dead after about 3 s
instead of 15 s) so that the test stays short; lpreg reads them from the cluster.

1. Node C (2 CPUs) joins, idle. The node holding learner-0 is removed with
   ``allow_graceful=False``: its raylet and both actors die at once. Rank 0 is the rank
   that is hard to lose: it leads the DeepSpeed rendezvous, and the weights it exported
   lay in that node's object store. The rollout worker's replacement and the rebuilt
   learner group find room on C; training goes on.
2. C is removed in turn, taking the replacements with it, and no node has room. The run
   waits for one (``ray.node_wait_s``); node D joins within the wait, the learner group is
   rebuilt there from the newest checkpoint, and the run finishes every step.

The run reaches step ``STEPS`` with ``rollout/restarts`` and ``learner/restarts`` at 2,
every step after a loss trained on the full batch with the engines holding the
learners' weights, and nothing of the cluster is left running after it is shut down.
Detection and recovery times are printed (``pytest -s``) and kept in ``timings.json``.

Waiting past ``ray.node_wait_s`` stops the run with one line; that is tested without
vLLM and DeepSpeed, on a cluster of its own, in ``test_no_room_within_the_wait_is_one_line``.

Measuring: ``LPREG_NODE_LOSS_COMPARE=1`` also runs the same config on a fresh cluster of
the same shape without faults, for the whole run's time against a clean one, and
``LPREG_NODE_LOSS_HEALTH_CHECKS=ray`` keeps Ray's default health checks:

    LPREG_NODE_LOSS_COMPARE=1 .venv/bin/pytest -s tests/integration/test_integration_node_loss.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from harness import Run, by_step, read_actors, read_metrics

pytestmark = pytest.mark.integration

STEPS = 60
SAVE_EVERY = 5
PROMPTS, SAMPLES = 8, 4
NODE_WAIT_S = 120
# Declared dead after 3 missed checks a second apart (Ray's defaults: 5, 3 s apart).
HEALTH_CHECKS = ({} if os.environ.get("LPREG_NODE_LOSS_HEALTH_CHECKS") == "ray" else
                 {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                  "health_check_timeout_ms": 1000})
COMPARE = os.environ.get("LPREG_NODE_LOSS_COMPARE") == "1"


def settings(out: Path, address: str, name: str = "node-loss") -> list[str]:
    return [
        f"ray.address={address}", "ray.placement_strategy=SPREAD", f"ray.node_wait_s={NODE_WAIT_S}",
        f"trainer.total_steps={STEPS}", f"trainer.run_name={name}", f"trainer.output_dir={out}",
        f"trainer.save_every={SAVE_EVERY}", "trainer.keep_last=0", "trainer.max_restarts=2",
        "rollout.num_workers=2", "learner.num_workers=2", "learner.micro_batch_size=8",
        "rollout.max_restarts=2", f"data.prompts_per_step={PROMPTS}",
        f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_response_tokens=32",
        "learner.lr=1e-3", "trainer.eval_every=-1", "model.tiny.warm_start_steps=0",
        f"model.cache_dir={out / 'models'}", "verifier.reward_fn=toy_rewards:digit_share",
        "verifier.truncated_reward=null", "trainer.progress_bar=false"]


def ray_processes(temp_dir: str) -> list[int]:
    """Processes of the cluster: every Ray process names its temp folder on its command line."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


class OwnCluster:
    """A head and worker nodes of this test's own; nothing of it outlives ``shutdown``."""

    def __init__(self, **head_args):
        from ray._private.utils import read_ray_address
        from ray.cluster_utils import Cluster

        # Ray's Cluster writes its address where a bare ray.init() looks for a cluster to
        # join (ray_current_cluster in Ray's default temp folder): given back at shutdown.
        self.previous_address = read_ray_address()
        # Short: Ray's socket paths live under it.
        self.temp_dir = tempfile.mkdtemp(prefix="lpreg-nl-", dir="/tmp")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "temp_dir": self.temp_dir,
            "_system_config": HEALTH_CHECKS or None, **head_args})

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, cpus: int):
        return self.cluster.add_node(num_cpus=cpus, temp_dir=self.temp_dir)

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def node(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def shutdown(self) -> list[int]:
        """Stop every node; returns the cluster's processes still alive 30 s later."""
        from ray._common.utils import reset_ray_address
        from ray._private.utils import read_ray_address, write_ray_address

        address = self.address
        self.cluster.shutdown()
        if read_ray_address() == address:
            if self.previous_address:
                write_ray_address(self.previous_address)
            else:
                reset_ray_address()
        deadline = time.monotonic() + 30
        while (left := ray_processes(self.temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


class Log:
    """When each line of the run's log first appeared, seen by polling it."""

    def __init__(self, run: Run):
        self.run, self.seen, self._lines = run, {}, 0

    def refresh(self) -> None:
        lines = self.run.log().splitlines()
        now = time.time()
        for line in lines[self._lines:]:
            self.seen.setdefault(line, now)
        self._lines = len(lines)

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        self.refresh()
        times = [t for line, t in self.seen.items() if t >= after and re.search(pattern, line)]
        return min(times) if times else None


def learner_node(run: Run, rank: int) -> str | None:
    entry = next((a for a in read_actors(run.run_dir).get("learner", [])
                  if a["name"] == f"learner-{rank}"), {})
    return entry.get("node_id")


def actors_on(run: Run, node_id: str) -> list[str]:
    actors = read_actors(run.run_dir)
    return sorted(a["name"] for kind in ("rollout", "learner") for a in actors.get(kind, [])
                  if a.get("node_id") == node_id)


def all_live_on(run: Run, nodes: set[str]) -> bool:
    actors = read_actors(run.run_dir)
    rollout, learner = actors.get("rollout", []), actors.get("learner", [])
    return (len(rollout) == 2 and all(a.get("state") == "live" and a.get("node_id") in nodes
                                      for a in rollout)
            and len(learner) == 2 and all(a.get("node_id") in nodes for a in learner))


class StepWatch:
    """Records as they land in metrics.jsonl (steps redone after a restore included), timed
    by polling."""

    def __init__(self, run: Run):
        self.run, self.seen = run, []

    def poll(self) -> int:
        """The newest step."""
        records = read_metrics(self.run.run_dir)
        self.seen += [time.time()] * (len(records) - len(self.seen))
        return records[-1]["step"] if records else 0

    def records_after(self, t: float) -> int:
        self.poll()
        return sum(1 for seen in self.seen if seen > t)

    def first_after(self, t: float) -> float:
        return min(seen for seen in self.seen if seen > t)


def wait(run: Run, condition, what: str, log: Log, steps: StepWatch) -> float:
    def check() -> bool:
        log.refresh()
        steps.poll()
        return condition()
    run.wait_until(check, what)
    return time.time()


def training_s(steps: StepWatch) -> float:
    """From the first step's record to the last one's."""
    return steps.seen[-1] - steps.seen[0]


def clean_run(out: Path) -> dict:
    """The same config on a fresh cluster of the same shape, without faults."""
    cluster = OwnCluster()
    try:
        cluster.add(2), cluster.add(2)
        run = Run(settings(out, cluster.address, "clean"), out / "clean", out / "clean.log",
                  timeout_s=600)
        started, steps = time.time(), StepWatch(run)
        run.wait_until(lambda: steps.poll() >= STEPS, "the clean run's last step")
        code, _ = run.finish()
        assert code == 0, run.log()[-6000:]
        return {"run_s": time.time() - started, "training_s": training_s(steps)}
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory):
    out = tmp_path_factory.mktemp("node-loss")
    cluster = OwnCluster()
    left = None
    try:
        a, b = cluster.add(2), cluster.add(2)
        run = Run(settings(out, cluster.address), out / "node-loss", out / "node-loss.log",
                  timeout_s=600)
        log, steps = Log(run), StepWatch(run)
        started = time.time()
        wait(run, lambda: steps.poll() > SAVE_EVERY, "a checkpoint", log, steps)
        on_nodes = {n: actors_on(run, n) for n in (a.node_id, b.node_id)}

        # 1. A spare node joins; the node holding learner-0 goes, with its rollout worker.
        spare = cluster.add(2)
        first_victim = learner_node(run, 0)
        survivor = b.node_id if first_victim == a.node_id else a.node_id
        lost_first = actors_on(run, first_victim)
        removed_1 = time.time()
        cluster.remove(cluster.node(first_victim))
        wait(run, lambda: log.first(r"became unreachable|died", removed_1) is not None,
             "the first loss to be noticed", log, steps)
        detected_1 = log.first(r"became unreachable|died", removed_1)
        all_back_1 = wait(run, lambda: log.first(r"recovered the learners", removed_1) is not None
                          and all_live_on(run, {survivor, spare.node_id}),
                          "the replacements on the spare node", log, steps)
        learners_back_1 = log.first(r"recovered the learners", removed_1)
        wait(run, lambda: steps.records_after(learners_back_1) >= 1,
             "a step after the first recovery", log, steps)
        resumed_1 = steps.first_after(learners_back_1)
        on_spare = actors_on(run, spare.node_id)

        # 2. The spare node goes too, and no node has room: the run waits for one.
        removed_2 = time.time()
        cluster.remove(spare)
        wait(run, lambda: log.first(r"no room for the learner group", removed_2) is not None,
             "the run to wait for a node", log, steps)
        detected_2 = log.first(r"became unreachable|died", removed_2)
        waiting = log.first(r"no room for the learner group", removed_2)
        time.sleep(3)  # the run keeps waiting; nothing times out
        assert run.proc.poll() is None, run.log()[-6000:]
        node_joined = time.time()  # from the call: the node starts in about 2 s
        joined = cluster.add(2)
        all_back_2 = wait(run, lambda: log.first(r"recovered the learners", node_joined) is not None
                          and all_live_on(run, {survivor, joined.node_id}),
                          "the replacements on the new node", log, steps)
        learners_back_2 = log.first(r"recovered the learners", node_joined)
        wait(run, lambda: steps.records_after(learners_back_2) >= 1,
             "a step after the second recovery", log, steps)
        resumed_2 = steps.first_after(learners_back_2)
        wait(run, lambda: steps.poll() >= STEPS, "the last step", log, steps)
        code, leftover_run = run.finish()
        finished = time.time()
        actors = read_actors(run.run_dir)
        left = cluster.shutdown()
        # Seconds from the removal to detection; from detection (or the node joining) on.
        timings = {
            "first_loss": {"actors": lost_first,
                           "detected_s": detected_1 - removed_1,
                           "learners_recovered_s": learners_back_1 - detected_1,
                           "training_resumed_s": resumed_1 - detected_1,
                           "all_actors_back_s": all_back_1 - detected_1},
            "second_loss": {"actors": on_spare,
                            "detected_s": detected_2 - removed_2,
                            "waiting_logged_s": waiting - removed_2,
                            "node_joined_after_s": node_joined - removed_2,
                            "learners_recovered_after_join_s": learners_back_2 - node_joined,
                            "training_resumed_after_join_s": resumed_2 - node_joined,
                            "all_actors_back_after_join_s": all_back_2 - node_joined},
            "run_s": finished - started,
        }
        if COMPARE:
            timings["training_s"] = training_s(steps)
            timings["clean"] = clean_run(out)
        (out / "timings.json").write_text(json.dumps(timings, indent=1))
        print("node-loss timings:", json.dumps(timings, indent=1))
        return {"code": code, "leftover_run": leftover_run, "left": left, "log": run.log(),
                "metrics": read_metrics(run.run_dir), "on_nodes": on_nodes, "actors": actors,
                "nodes": {"a": a.node_id, "b": b.node_id, "spare": spare.node_id,
                          "joined": joined.node_id, "first_victim": first_victim},
                "lost_first": lost_first, "on_spare": on_spare, "timings": timings,
                "removed": (removed_1, removed_2)}
    finally:
        if left is None:
            cluster.shutdown()


def test_rollout_workers_and_learners_spread_over_two_nodes(node_loss):
    for names in node_loss["on_nodes"].values():
        assert len([n for n in names if n.startswith("rollout-")]) == 1, node_loss["on_nodes"]
        assert len([n for n in names if n.startswith("learner-")]) == 1, node_loss["on_nodes"]


def test_the_run_finishes_every_step_after_losing_two_nodes(node_loss):
    assert node_loss["code"] == 0, node_loss["log"][-8000:]
    records = by_step(node_loss["metrics"])
    assert sorted(records) == list(range(1, STEPS + 1))
    assert records[STEPS]["rollout/restarts"] == 2
    assert records[STEPS]["learner/restarts"] == 2
    for record in records.values():
        assert record["rollout/num_samples"] == PROMPTS * SAMPLES, record["step"]
    # The engines hold the learners' weights after each recovery: their log-probs agree.
    assert records[STEPS]["rollout/logprob_max_abs_diff"] < 1e-4


def test_the_lost_actors_are_named_and_replaced_where_there_is_room(node_loss):
    log, nodes = node_loss["log"], node_loss["nodes"]
    assert "learner-0" in node_loss["lost_first"] and len(node_loss["lost_first"]) == 2
    lost_rollout = next(n for n in node_loss["lost_first"] if n.startswith("rollout-"))
    assert re.search(rf"{lost_rollout} \(pid \d+, live\) (became unreachable|died)", log), log[-6000:]
    # The first replacements went to the spare node; after it was lost too, to the new one.
    assert sorted(node_loss["on_spare"]) == sorted(node_loss["lost_first"])
    final = {a["name"]: a["node_id"] for kind in ("rollout", "learner")
             for a in node_loss["actors"][kind]}
    assert final[lost_rollout] == nodes["joined"] and final["learner-0"] == nodes["joined"]
    assert log.count("recovered the learners") == 2


def test_with_no_room_the_run_waits_for_a_node_and_goes_on(node_loss):
    log = node_loss["log"]
    assert f"waiting up to {NODE_WAIT_S}s (ray.node_wait_s) for a node to join" in log
    assert re.search(r"a node has room for the learner group after \d+\.\ds of waiting", log)
    assert re.search(r"rollout-\d's replacement waits for room", log)


def test_nothing_is_left_running(node_loss):
    assert node_loss["leftover_run"] == [], "processes of the driver's session survived"
    assert node_loss["left"] == [], "processes of the cluster survived its shutdown"


def test_no_room_within_the_wait_is_one_line():
    """Real Ray, no engines: a learner bundle loses its node, none has room, the wait ends."""
    import ray

    from conf.load import load_config
    from launch.cluster.nodes import NodeWaitTimeout, bundle_nodes
    from launch.cluster.placement import Placement

    cluster = OwnCluster()
    try:
        for _ in range(3):  # one bundle each: no node has room for another
            cluster.add(1)
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(overrides=["rollout.num_workers=1", "learner.num_workers=2",
                                     "ray.placement_strategy=SPREAD", "ray.node_wait_s=2"])
        placement = Placement.create(cfg)
        assert placement.learners_lacking_room() == []
        group, bundle = placement.plan.learner_slots[1]
        cluster.remove(cluster.node(bundle_nodes(placement._groups[group])[bundle]))
        # At once, before Ray's health checks fail: the node's raylet does not answer.
        assert placement.learners_lacking_room() == [
            "learner-1: its node does not answer; Ray has not declared it dead yet"]
        deadline = time.monotonic() + 30
        while placement.learners_lacking_room() != ["learner-1: no live node has room for it"]:
            assert time.monotonic() < deadline, "Ray never declared the removed node dead"
            time.sleep(0.2)
        began = time.monotonic()
        with pytest.raises(NodeWaitTimeout) as stopped:
            placement.wait_for_learner_room()
        assert 2 <= time.monotonic() - began < 10
        message = str(stopped.value)
        assert "\n" not in message
        assert message.startswith("no node had room for the learner group within ray.node_wait_s=2s")
        assert "no live node has room for it" in message
        # A node that joins gives the bundle its room back.
        cluster.add(1)
        assert placement.wait_for_learner_room() < 30
        placement.remove()
    finally:
        ray.shutdown()
        assert cluster.shutdown() == []
