"""Learner: a Ray actor holding one DeepSpeed data-parallel rank.

All algorithm logic lives in ``learner.step`` and the pure loss modules; this actor
owns the process group, the model, the optimizer and the weight export.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
from learner.batch import LearnerShard


@dataclass
class LearnerStepResult:
    rank: int
    metrics: dict[str, float]
    num_optimizer_steps: int


def deepspeed_config(cfg: LearnerConfig, dtype: str) -> dict[str, Any]:
    """The engine's config. The number of micro-batches per optimizer step varies (token
    budgets), so the actor marks the accumulation boundary itself, and DeepSpeed's own
    count stays at 1; the losses are already shares of the mini-batch mean, never divided
    by an accumulation count."""
    return {
        # bf16 weights: DeepSpeed keeps fp32 master weights and optimizer state.
        "bf16": {"enabled": dtype == "bfloat16"},
        "train_micro_batch_size_per_gpu": max(1, cfg.micro_batch_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def reference_deepspeed_config(cfg: LearnerConfig, dtype: str) -> dict[str, Any]:
    """ZeRO-3 without an optimizer: DeepSpeed then only partitions the parameters and
    gathers each layer for its forward (``DeepSpeedZeRoOffload``). Stages 1 and 2 need an
    optimizer and shard nothing a frozen model has, so under them the reference stays a
    plain module."""
    config = deepspeed_config(cfg, dtype)
    config.pop("gradient_clipping")
    config["zero_optimization"] = {"stage": 3}
    return config


EXPORT_PAUSE_ENV = "LPREG_TEST_PAUSE_EXPORT"


def pause_for_fault_tests(export_index: int) -> None:
    """Where fault tests kill rank 0 in the middle of a weight export, which no signal sent
    from outside could otherwise hit. With ``LPREG_TEST_PAUSE_EXPORT=<n>:<file>`` the n-th
    export (from 1) writes ``<file>`` unless it exists and then waits, up to ten minutes,
    for the test's SIGKILL. Unset, it does nothing."""
    spec = os.environ.get(EXPORT_PAUSE_ENV)
    if not spec:
        return
    index, _, marker = spec.partition(":")
    # Once per run: a learner rebuilt after the kill counts its exports from 1 again.
    if int(index) != export_index or os.path.exists(marker):
        return
    with open(marker, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class Learner:
    def __init__(self, rank: int, world_size: int, model_path: str, model_cfg: ModelConfig,
                 cfg: LearnerConfig, algo: AlgorithmConfig, temperature: float, seed: int,
                 total_optimizer_steps: int = 0, top_p: float = 1.0,
                 watched: dict[str, frozenset[int]] | None = None):
        """``total_optimizer_steps``: optimizer steps of the whole run, the length of the
        learning-rate decay (trainer.total_steps * mini_batches_per_step * epochs_per_step);
        0: unknown, so the rate stays constant after the warm-up. ``temperature`` and
        ``top_p``: the rollout's sampling transform, under which every log-prob is taken.
        ``watched``: the token ids of each of trainer.watch_tokens, resolved by the driver
        with the run's tokenizer (the learner has no tokenizer of its own)."""
        self.rank = rank
        self.total_optimizer_steps = total_optimizer_steps
        self.world_size = world_size
        self.model_path = model_path
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.algo = algo
        self.temperature = temperature
        self.top_p = top_p
        self.watched = watched
        self.seed = seed
        self.engine = None
        self.reference = None  # the frozen initial model, when algo.kl_loss_coef > 0
        self.reference_engine = None  # its DeepSpeed engine under ZeRO-3
        self._export_stats: tuple[int, int] | None = (0, 0)  # None while an export is unfinished
        self._exports_started = 0
        self._broadcast = None  # this rank's end of the weight broadcast, once opened

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, load the model, build the engine (and the reference model
        when the loss has a KL to it). Each mini-batch marks its own accumulation boundary,
        however many micro-batches it has."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        from learner.schedule import lambda_lr

        os.environ.update({
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            # Ray gives each learner its own GPU, visible as device 0.
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        })
        backend = self.cfg.dist_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        torch.manual_seed(self.seed)

        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, **_dtype_kwarg(getattr(torch, self.model_cfg.dtype)))
        if torch.cuda.is_available():
            model = model.cuda()
        model.config.use_cache = False  # a KV cache is useless in training and costs memory
        if self.cfg.gradient_checkpointing:
            # Non-reentrant: works with inputs that need no grad and with ZeRO-3's hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas),
                                      weight_decay=self.cfg.weight_decay)
        cfg = self.cfg

        def scheduler(basic_optimizer):
            # DeepSpeed steps it after every optimizer step and keeps it in checkpoints.
            return lambda_lr(basic_optimizer, scheduler=cfg.lr_scheduler,
                             warmup_steps=cfg.lr_warmup_steps,
                             total_steps=self.total_optimizer_steps, min_lr_ratio=cfg.min_lr_ratio)

        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.model_cfg.dtype))
        if self.algo.kl_loss_coef > 0:
            self.reference = self._load_reference()
        return self.rank

    def _load_reference(self):
        """The initial weights, frozen, in eval mode: a DeepSpeed ZeRO-3 engine (parameters
        partitioned over the ranks, no optimizer) under ZeRO-3, else a plain module."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(
            self.model_path, **_dtype_kwarg(getattr(torch, self.model_cfg.dtype)))
        reference.config.use_cache = False
        reference.requires_grad_(False)
        if torch.cuda.is_available():
            reference = reference.cuda()
        if self.cfg.zero_stage == 3:
            self.reference_engine, *_ = deepspeed.initialize(
                model=reference, config=reference_deepspeed_config(self.cfg, self.model_cfg.dtype))
            reference = self.reference_engine.module
        return reference.eval()

    # -- training -------------------------------------------------------------------
    def train_step(self, shard: LearnerShard) -> LearnerStepResult:
        import torch

        from learner.step import train_on_shard

        engine = self.engine
        engine.train()
        steps = 0
        boundary_grad_norm = None
        lr_used = None

        def backward(loss, boundary: bool) -> None:
            nonlocal boundary_grad_norm, lr_used
            # Set before the backward: ZeRO decides there whether to reduce the gradients.
            engine.set_gradient_accumulation_boundary(boundary)
            engine.backward(loss, scale_wrt_gas=False)
            if boundary and self.cfg.zero_stage == 0:
                # Without ZeRO, DeepSpeed does not record the norm; the gradients are
                # whole and already averaged over ranks here, before step() clips them.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                boundary_grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            if boundary:
                lr_used = float(engine.get_lr()[0])  # the scheduler moves on inside step()
            # Off the boundary, step() only counts the micro-step; on it, it clips, steps
            # the optimizer and the scheduler, and zeroes the gradients: one optimizer
            # step per mini-batch, on every rank.
            engine.step()

        def optimizer_step() -> dict[str, float]:
            nonlocal steps
            steps += 1
            metrics = {"actor/lr": lr_used}
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:
                grad_norm = boundary_grad_norm
            if grad_norm is not None:
                metrics["actor/grad_norm"] = float(grad_norm)
            return metrics

        metrics = train_on_shard(
            engine.module, shard, self.algo, temperature=self.temperature, top_p=self.top_p,
            world_size=self.world_size, backward=backward, optimizer_step=optimizer_step,
            logits_chunk_tokens=self.cfg.logits_chunk_tokens, reference=self.reference,
            watched=self.watched)
        return LearnerStepResult(rank=self.rank, metrics=metrics, num_optimizer_steps=steps)

    # -- weight export ------------------------------------------------------------------
    def _full_parameters(self, copy: bool) -> list:
        """(name, tensor) on CPU for every parameter on rank 0 (empty elsewhere), tied ones
        under every name, as the broadcast sends them. Under ZeRO-3 every rank walks the
        same layer-by-layer gathers, so no rank holds the whole model gathered at once.

        ``copy``: tensors the caller may keep while training goes on; otherwise the live
        CPU parameters may be aliased. A gathered layer is always copied: its storage
        goes back to the shards when the gather ends."""
        from learner.weight_broadcast import LayerwiseParameters

        zero3 = self.cfg.zero_stage == 3
        source = LayerwiseParameters(self.engine.module, zero3=zero3)
        if self.rank != 0:
            for _ in source:
                pass
            return []
        return [(name, tensor.to("cpu", copy=copy or zero3)) for name, tensor in source]

    def export_weights(self):
        """Full weights on rank 0 (None elsewhere), for the object-store transport."""
        self._export_stats = None  # until this export is complete
        self._exports_started += 1
        # Copies: later steps must not change what the workers read.
        named = self._full_parameters(copy=True)
        if self.rank != 0:
            return None
        pause_for_fault_tests(self._exports_started)
        self._export_stats = (len(named), sum(t.numel() * t.element_size() for _, t in named))
        return named

    def last_export_stats(self) -> tuple[int, int]:
        """Tensors and bytes of the last export. Called after ``export_weights`` on the same
        actor, it answers once that export is done, and fails if it failed."""
        if self._export_stats is None:
            raise RuntimeError(f"learner-{self.rank}: its last weight export did not complete")
        return self._export_stats

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> int:
        """This rank's DeepSpeed state and RNG; rank 0 also writes the Hugging Face export.

        Every rank calls it at once: DeepSpeed synchronises the ranks while saving, and
        under ZeRO-3 the export gathers the shards from all of them.
        """
        import torch

        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state",
                                    save_latest=False)
        rng_dir = os.path.join(directory, "learner_rng")
        os.makedirs(rng_dir, exist_ok=True)
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(rng_dir, f"rank_{self.rank}.pt"))
        self.export_hf(os.path.join(directory, "hf"))
        return self.rank

    def export_hf(self, directory: str) -> str | None:
        """safetensors, config and tokenizer on rank 0: a directory vLLM loads directly."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        named = self._full_parameters(copy=False)  # a collective under ZeRO-3: every rank enters
        if self.rank != 0:
            return None
        hf_logging.disable_progress_bar()
        # One entry per tensor: a tied output projection is restored from the
        # embedding on load, as in the original model files.
        unique = {name for name, _ in self.engine.module.named_parameters()}
        state_dict = {name: tensor for name, tensor in named if name in unique}
        self.engine.module.save_pretrained(directory, state_dict=state_dict,
                                           safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(directory)
        return directory

    def load_checkpoint(self, directory: str) -> int:
        """Restore this rank's model, optimizer and scheduler state, and its RNG."""
        import torch

        load_path, _ = self.engine.load_checkpoint(
            os.path.join(directory, "deepspeed"), tag="state", load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"learner-{self.rank}: no DeepSpeed state in {directory}")
        rng_file = os.path.join(directory, "learner_rng", f"rank_{self.rank}.pt")
        if os.path.isfile(rng_file):
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return self.rank

    # -- the broadcast transport ---------------------------------------------------------
    def open_weight_transfer(self, wire: str, rollout_handles: list, engine_world_sizes: list[int],
                             bucket_bytes: int, timeout_s: float) -> int:
        """Join a new broadcast group over these rollout workers' engines (closing any
        earlier one). Every rank calls it; rank 0 opens the group and sends, the others
        only take part in the ZeRO-3 gathers of each push."""
        import ray

        from learner.weight_broadcast import LayerwiseParameters
        from learner.weight_transfer import open_broadcast

        self.close_weight_transfer()
        self._broadcast = open_broadcast(
            wire, rank=self.rank, address=ray.util.get_node_ip_address(), port=free_port(),
            handles=rollout_handles, engine_world_sizes=engine_world_sizes,
            bucket_bytes=bucket_bytes, timeout_s=timeout_s,
            source=LayerwiseParameters(self.engine.module, zero3=self.cfg.zero_stage == 3))
        return len(rollout_handles)

    def broadcast_weights(self) -> tuple[int, int]:
        """One push into every engine of the group; the tensors and bytes sent."""
        if self._broadcast is None:
            raise RuntimeError(f"learner-{self.rank}: no broadcast group is open")
        try:
            self._broadcast.send_weights()
        except BaseException:
            # The group is unusable after a failed broadcast; closing it also releases
            # the engines still waiting inside theirs.
            self.close_weight_transfer()
            raise
        return self._broadcast.sent

    def close_weight_transfer(self) -> None:
        if self._broadcast is not None:
            self._broadcast.shutdown()
            self._broadcast = None


def _dtype_kwarg(dtype) -> dict:
    """transformers 5 calls it ``dtype``; 4.x only knows ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}

