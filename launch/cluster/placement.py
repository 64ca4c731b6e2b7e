"""Placement groups: where rollout workers and learners may run.

By default the rollout workers get one placement group and the learners another, one
bundle per actor holding exactly that actor's CPUs and GPUs. Ray reserves a bundle for
its actor alone, so a slow learner start cannot let a rollout worker take its GPU, and
the reservation is all-or-nothing: either every actor of a group fits or none starts.

With ``ray.colocate`` rollout worker ``i`` and learner rank ``i`` share bundle ``i``
(its size is the sum of both), which keeps the pair on one node; with fractional GPU
requests (``rollout.gpus_per_worker=0.5 learner.gpus_per_worker=0.5``) they share one
GPU.

The plan is pure (``plan_placement``); its keys are checked when the config loads;
``Placement.create`` asks Ray for it and fails with a message naming what did not fit.

When a node is lost, Ray moves the bundles that were on it to nodes with room, or leaves
them unplaced until a node joins; the groups themselves stay. A replacement actor is
started in its bundle once the bundle sits on a node that can take it
(``launch.cluster.nodes``); the learner group waits up to ``ray.node_wait_s`` for that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from conf.errors import ConfigError
from conf.schema import LearnerConfig, LpregConfig, RolloutConfig
from launch.cluster.nodes import NodeWatch, bundle_nodes, wait_for_room

Bundle = dict[str, float]


class PlacementError(ConfigError):
    """The cluster could not reserve what the config asks for.

    A ``ConfigError`` on purpose: the command line reports it as one line and exit
    status 2, like asking for more GPUs than the cluster has.
    """


def rollout_bundle(cfg: RolloutConfig) -> Bundle:
    """Resources of one rollout worker; the same request the actor itself makes."""
    return _bundle(cfg.cpus_per_worker, cfg.gpus_per_worker * cfg.tensor_parallel_size)


def learner_bundle(cfg: LearnerConfig) -> Bundle:
    return _bundle(cfg.cpus_per_worker, cfg.gpus_per_worker)


def _bundle(cpus: float, gpus: float) -> Bundle:
    bundle: Bundle = {}
    if cpus > 0:
        bundle["CPU"] = float(cpus)
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    return bundle


def _merge(a: Bundle, b: Bundle) -> Bundle:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in sorted({*a, *b})}


def format_bundle(bundle: Bundle) -> str:
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in sorted(bundle.items())) + "}"


@dataclass(frozen=True)
class GroupPlan:
    """One placement group to create."""

    name: str
    bundles: list[Bundle]
    strategy: str

    def describe(self) -> str:
        """``3 x {CPU: 1}``, or the list of bundles when they differ."""
        shapes = [format_bundle(b) for b in self.bundles]
        if len(set(shapes)) == 1:
            return f"{len(shapes)} x {shapes[0]}"
        return "[" + ", ".join(shapes) + "]"


@dataclass(frozen=True)
class PlacementPlan:
    groups: list[GroupPlan]
    # Actor index -> (group index, bundle index).
    rollout_slots: list[tuple[int, int]]
    learner_slots: list[tuple[int, int]]


def plan_placement(cfg: LpregConfig) -> PlacementPlan:
    """The placement groups and which bundle each actor takes."""
    strategy = cfg.ray.placement_strategy
    num_rollout, num_learner = cfg.rollout.num_workers, cfg.learner.num_workers
    one_rollout, one_learner = rollout_bundle(cfg.rollout), learner_bundle(cfg.learner)
    if not cfg.ray.colocate:
        return PlacementPlan(
            groups=[GroupPlan("rollout", [dict(one_rollout) for _ in range(num_rollout)], strategy),
                    GroupPlan("learner", [dict(one_learner) for _ in range(num_learner)], strategy)],
            rollout_slots=[(0, i) for i in range(num_rollout)],
            learner_slots=[(1, i) for i in range(num_learner)],
        )
    # Bundle i holds rollout worker i and learner rank i; when the counts differ the
    # extra actors of the larger side get bundles of their own size.
    bundles = []
    for i in range(max(num_rollout, num_learner)):
        bundles.append(_merge(one_rollout if i < num_rollout else {},
                              one_learner if i < num_learner else {}))
    return PlacementPlan(
        groups=[GroupPlan("colocated rollout+learner", bundles, strategy)],
        rollout_slots=[(0, i) for i in range(num_rollout)],
        learner_slots=[(0, i) for i in range(num_learner)],
    )


def _resources_line(resources: dict[str, float], keys: list[str]) -> str:
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in keys) + "}"


class Placement:
    """Reserved placement groups; hands out the scheduling strategy of each actor."""

    def __init__(self, plan: PlacementPlan, groups: list, node_wait_s: float = 600.0,
                 nodes: NodeWatch | None = None) -> None:
        self.plan = plan
        self._groups = groups
        self.node_wait_s = node_wait_s  # ray.node_wait_s
        self.nodes = nodes or NodeWatch()

    @classmethod
    def create(cls, cfg: LpregConfig) -> Placement:
        """Reserve every group, waiting at most ``ray.placement_timeout_s`` for all of them."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        plan = plan_placement(cfg)
        timeout_s = cfg.ray.placement_timeout_s
        groups = [placement_group(g.bundles, strategy=g.strategy, name=f"lpreg-{g.name}")
                  for g in plan.groups]
        ready = {group.ready(): i for i, group in enumerate(groups)}
        deadline = time.monotonic() + timeout_s
        pending = list(ready)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=remaining)
        if pending:
            missing = sorted(ready[ref] for ref in pending)
            keys = sorted({k for g in plan.groups for b in g.bundles for k in b} | {"CPU", "GPU"})
            total = _resources_line(ray.cluster_resources(), keys)
            free = _resources_line(ray.available_resources(), keys)
            for group in groups:
                remove_placement_group(group)
            what = "; ".join(
                f"{plan.groups[i].name} placement group ({plan.groups[i].describe()}, "
                f"{plan.groups[i].strategy})" for i in missing)
            raise PlacementError(
                f"{what} could not be scheduled within {timeout_s:g}s; the cluster has "
                f"{total} in total and {free} free. Lower rollout.num_workers/learner.num_workers "
                f"or their cpus_per_worker/gpus_per_worker, add nodes, or raise "
                f"ray.placement_timeout_s if resources are about to free up")
        return cls(plan, groups, node_wait_s=cfg.ray.node_wait_s)

    def _strategy(self, slot: tuple[int, int]):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, bundle = slot
        # Tasks an actor starts are not pulled into its bundle: they would compete
        # with the actor for resources reserved for the actor alone.
        return PlacementGroupSchedulingStrategy(
            placement_group=self._groups[group], placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=False)

    def rollout(self, index: int):
        """Scheduling strategy of rollout worker ``index`` (the ``placement`` callable)."""
        return self._strategy(self.plan.rollout_slots[index])

    def learner(self, rank: int):
        """Scheduling strategy of learner rank ``rank``."""
        return self._strategy(self.plan.learner_slots[rank])

    def describe(self) -> str:
        return "; ".join(f"{g.name}: {g.describe()} {g.strategy}" for g in self.plan.groups)

    # -- after a lost node -------------------------------------------------------------
    def lacking_room(self, actors: dict[str, tuple[int, int]]) -> list[str]:
        """``name: why`` for each actor (name -> slot) whose bundle cannot take it now."""
        placed: dict[int, dict[int, str]] = {}
        for group, _ in actors.values():
            if group not in placed:
                placed[group] = bundle_nodes(self._groups[group])
        problems = self.nodes.problems([placed[g].get(b) for g, b in actors.values()])
        return [f"{name}: {why}" for name, why in zip(actors, problems, strict=True) if why]

    def rollout_lacking_room(self, index: int) -> list[str]:
        """Why rollout worker ``index``'s bundle cannot take a replacement now (empty: it can)."""
        return self.lacking_room({f"rollout-{index}": self.plan.rollout_slots[index]})

    def learners_lacking_room(self) -> list[str]:
        return self.lacking_room({f"learner-{rank}": slot
                                  for rank, slot in enumerate(self.plan.learner_slots)})

    def wait_for_learner_room(self, tick=None) -> float:
        """Wait up to ``ray.node_wait_s`` until every learner bundle can take its rank;
        returns the seconds waited, or raises ``NodeWaitTimeout``."""
        return wait_for_room(self.learners_lacking_room, self.node_wait_s, "the learner group",
                             tick=tick)

    def remove(self) -> None:
        """Give the reservations back (they also go when the driver's job ends)."""
        from ray.util.placement_group import remove_placement_group

        for group in self._groups:
            remove_placement_group(group)
        self._groups = []
