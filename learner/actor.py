"""Learner: a Ray actor holding one DeepSpeed data-parallel rank.

All algorithm logic lives in ``learner.step`` and the pure loss modules; this actor
owns the process group, the model, the optimizer and the weight export.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any

from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
from learner.batch import LearnerShard, TrainBatch


@dataclass
class LearnerStepResult:
    rank: int
    metrics: dict[str, float]
    num_optimizer_steps: int


def deepspeed_config(cfg: LearnerConfig, grad_accum_steps: int, dtype: str) -> dict[str, Any]:
    return {
        # bf16 weights: DeepSpeed keeps fp32 master weights and optimizer state.
        "bf16": {"enabled": dtype == "bfloat16"},
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class Learner:
    def __init__(self, rank: int, world_size: int, model_path: str, model_cfg: ModelConfig,
                 cfg: LearnerConfig, algo: AlgorithmConfig, temperature: float, seed: int):
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.algo = algo
        self.temperature = temperature
        self.seed = seed
        self.engine = None
        self._export_stats = (0, 0)
        self._nccl_engines: list = []

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, grad_accum_steps: int) -> int:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

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
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas),
                                      weight_decay=self.cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(self.cfg, grad_accum_steps, self.model_cfg.dtype))
        return self.rank

    # -- training -------------------------------------------------------------------
    def train_step(self, shard: LearnerShard) -> LearnerStepResult:
        import torch

        from learner.step import train_on_shard

        engine = self.engine
        engine.train()
        device = engine.device
        shard.mini_batches = [_to_device(mini, device) for mini in shard.mini_batches]
        steps = 0

        boundary_grad_norm = None

        def backward(loss) -> None:
            nonlocal boundary_grad_norm
            engine.backward(loss, scale_wrt_gas=False)
            if engine.is_gradient_accumulation_boundary() and self.cfg.zero_stage == 0:
                # Without ZeRO, DeepSpeed does not record the norm; the gradients are
                # whole and already averaged over ranks here, before step() clips them.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                boundary_grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            # DeepSpeed counts micro-steps and only clips, steps and zeroes at the
            # accumulation boundary; the step count per mini-batch equals its
            # gradient_accumulation_steps by construction.
            engine.step()

        def optimizer_step() -> dict[str, float]:
            nonlocal steps
            steps += 1
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:
                grad_norm = boundary_grad_norm
            return {"actor/grad_norm": float(grad_norm)} if grad_norm is not None else {}

        metrics = train_on_shard(
            engine.module, shard, self.algo, micro_batch_size=self.cfg.micro_batch_size,
            temperature=self.temperature, world_size=self.world_size,
            backward=backward, optimizer_step=optimizer_step)
        metrics["actor/lr"] = float(self.cfg.lr)
        return LearnerStepResult(rank=self.rank, metrics=metrics, num_optimizer_steps=steps)

    def compute_log_probs(self, batch: TrainBatch):
        """log pi_theta of each response token under the current weights (no grad)."""
        import torch

        from learner import token_stats
        from learner.step import response_logits

        self.engine.eval()
        with torch.no_grad():
            batch = _to_device(batch, self.engine.device)
            stats = token_stats(response_logits(self.engine.module, batch), batch.response_ids,
                                temperature=self.temperature, compute_entropy=False)
        return stats.log_prob.cpu()

    # -- weight export ------------------------------------------------------------------
    def _full_parameters(self):
        """(name, tensor) for every parameter, gathered when ZeRO-3 shards them."""
        import deepspeed

        module = self.engine.module
        # Tied weights are listed under every name: vLLM's in-place reload only
        # refreshes the output projection when it receives ``lm_head.weight`` itself.
        params = list(module.named_parameters(remove_duplicate=False))
        if self.cfg.zero_stage == 3:
            unique = list({id(p): p for _, p in params}.values())
            with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
                return [(n, p.detach().clone().cpu()) for n, p in params] if self.rank == 0 else []
        return [(n, p.detach().cpu()) for n, p in params] if self.rank == 0 else []

    def export_weights(self):
        """Full weights on rank 0 (None elsewhere), for the object-store transport."""
        named = self._full_parameters()
        if self.rank != 0:
            return None
        # detach().cpu() aliases the live CPU parameters; copy so later steps cannot
        # change what the workers read.
        named = [(n, t.clone()) for n, t in named]
        self._export_stats = (len(named), sum(t.numel() * t.element_size() for _, t in named))
        return named

    def last_export_stats(self) -> tuple[int, int]:
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

        named = self._full_parameters()  # a collective under ZeRO-3: every rank enters
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

    # -- GPU weight transfer (vLLM NCCL engine) ----------------------------------------
    def init_nccl_weight_transfer(self, rollout_handles: list, tensor_parallel_size: int) -> int:
        """Open one NCCL group per rollout worker: this rank is 0, the engine's TP ranks follow."""
        import ray
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        address = ray.util.get_node_ip_address()
        for handle in rollout_handles:
            info = NCCLTrainerInitInfo(master_address=address, master_port=free_port(),
                                       world_size=1 + tensor_parallel_size)
            self._nccl_engines.append(NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=RayVLLMWeightSyncClient(handle),
                source=ModuleSource(self.engine.module)))
        return len(self._nccl_engines)

    def send_weights_nccl(self) -> int:
        import deepspeed

        params = [p for p in self.engine.module.parameters()]
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.cfg.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            for transfer in self._nccl_engines:
                transfer.send_weights()
        self._export_stats = (len(params), sum(p.numel() * p.element_size() for p in params))
        return len(self._nccl_engines)


def _dtype_kwarg(dtype) -> dict:
    """transformers 5 calls it ``dtype``; 4.x only knows ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _to_device(batch: TrainBatch, device) -> TrainBatch:
    import torch

    if str(device) == "cpu":
        return batch
    return TrainBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                         for k, v in vars(batch).items()})
