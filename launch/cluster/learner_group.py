"""The learner ranks: one DeepSpeed data-parallel group of Ray actors."""

from __future__ import annotations

from collections.abc import Callable

from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
from launch.cluster.remote import is_actor_death, wait_named
from launch.reporting.output import actor_log_env
from learner.actor import Learner
from learner.batch import RaggedBatch, shard_for_learners


def total_optimizer_steps(total_steps: int, algo: AlgorithmConfig) -> int:
    """Optimizer steps of a whole run: the length of the learning-rate schedule."""
    return total_steps * algo.mini_batches_per_step * algo.epochs_per_step


def _process_and_node(_actor) -> tuple[int, str, str]:
    import os

    import ray

    return os.getpid(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


class LearnerGroup:
    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: LearnerConfig,
                 algo: AlgorithmConfig, temperature: float, total_steps: int,
                 seed: int, placement=None, top_p: float = 1.0,
                 tick: Callable[[list], object] | None = None,
                 watched: dict[str, frozenset[int]] | None = None) -> None:
        """``tick``: keeps other work moving while the ranks start (see ``wait_named``).
        ``watched``: each watched string's token ids (``launch.training.watch.watch_token_ids``)."""
        import ray

        self.cfg = cfg
        self.algo = algo
        actor_cls = ray.remote(Learner)
        self.workers = []
        for rank in range(cfg.num_workers):
            options = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                           runtime_env={"env_vars": actor_log_env(f"learner-{rank}")})
            if placement is not None:
                options["scheduling_strategy"] = placement(rank)
            self.workers.append(actor_cls.options(**options).remote(
                rank, cfg.num_workers, model_path, model_cfg, cfg, algo, temperature, seed,
                total_optimizer_steps=total_optimizer_steps(total_steps, algo), top_p=top_p,
                watched=watched))
        addr, port = wait_named({"learner-0": self.rank0.rendezvous_address.remote()},
                                cfg.startup_timeout_s, "report its address", tick)["learner-0"]
        # init_distributed is a collective: every rank must be inside it at once.
        wait_named({name: w.setup.remote(addr, port) for name, w in self.named_workers()},
                   cfg.startup_timeout_s, "join the DeepSpeed group and load the model", tick)
        where = wait_named({name: w.__ray_call__.remote(_process_and_node)
                            for name, w in self.named_workers()}, cfg.startup_timeout_s,
                           "report its process", tick)
        self._where = [where[name] for name, _ in self.named_workers()]

    @property
    def rank0(self):
        return self.workers[0]

    def named_workers(self):
        return [(f"learner-{i}", w) for i, w in enumerate(self.workers)]

    def train_step_refs(self, batch: RaggedBatch) -> list:
        """Every rank's ``train_step`` on its shard; the caller waits (a ``LearnerStepResult`` each)."""
        # Planned here, for all ranks at once: under ZeRO-3 every forward is a collective,
        # so every rank must run the same number of micro-batches.
        shards = shard_for_learners(batch, self.algo.mini_batches_per_step, len(self.workers),
                                    micro_batch_size=self.cfg.micro_batch_size,
                                    max_tokens_per_micro_batch=self.cfg.max_tokens_per_micro_batch)
        return [w.train_step.remote(shard) for w, shard in zip(self.workers, shards, strict=True)]

    def describe_actors(self) -> list[dict]:
        return [{"name": name, "pid": pid, "node": node, "node_id": node_id}
                for (name, _), (pid, node, node_id) in zip(self.named_workers(), self._where,
                                                           strict=True)]

    def name_of_failure(self, err: BaseException) -> str:
        """Which rank an actor-death error is about, with its process id, when Ray says."""
        text = str(err)
        for rank, handle in enumerate(self.workers):
            if handle._actor_id.hex() in text:
                return f"learner-{rank}, pid {self._where[rank][0]}"
        return text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__

    def dead_rank(self, within_s: float = 5.0) -> str | None:
        """A rank Ray reports dead, named as ``name_of_failure`` names it, or None.

        A rank blocked in a collective does not answer within ``within_s``; it is alive."""
        import ray

        refs = [w.__ray_call__.remote(_process_and_node) for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=within_s)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - only a death is an answer here
                if is_actor_death(err):
                    return self.name_of_failure(err)
        return None

    def export_weights_refs(self) -> list:
        return [w.export_weights.remote() for w in self.workers]

    def open_weight_transfer_refs(self, wire: str, rollout_handles: list,
                                  engine_world_sizes: list[int], bucket_bytes: int,
                                  timeout_s: float) -> list:
        """Every rank joins the new broadcast group's set-up (rank 0 opens it)."""
        return [w.open_weight_transfer.remote(wire, rollout_handles, engine_world_sizes,
                                              bucket_bytes, timeout_s) for w in self.workers]

    def broadcast_weights_refs(self) -> list:
        """Every rank: ZeRO-3 gathers each layer while rank 0 sends it."""
        return [w.broadcast_weights.remote() for w in self.workers]

    def save_checkpoint(self, directory: str) -> None:
        # Every rank at once: DeepSpeed's save is a collective.
        refs = {name: w.save_checkpoint.remote(directory) for name, w in self.named_workers()}
        wait_named(refs, self.cfg.timeout_s, "save its checkpoint")

    def load_checkpoint(self, directory: str) -> None:
        refs = {name: w.load_checkpoint.remote(directory) for name, w in self.named_workers()}
        wait_named(refs, self.cfg.timeout_s, "load its checkpoint")

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers, self._where = [], []
