"""Check the KL-to-reference loss on one DeepSpeed rank, without Ray or vLLM.

    python tools/reference_kl_smoke.py [--stages 0,3] [--dtype float32] [--json out.json]

For each ZeRO stage: a learner with ``algorithm.kl_loss_coef > 0`` loads the initial model
a second time as its frozen reference (under ZeRO-3 a DeepSpeed engine without optimizer,
its parameters partitioned), trains two steps on one batch and reports ``actor/kl_loss``:
0 on the first step (the policy is the reference), positive on the second (it moved),
while the reference's weights stay the initial ones. Runs on CUDA (NCCL) when a GPU is
visible, else on CPU (gloo).
"""

from __future__ import annotations

import torch
from stage_runner import random_batch, run_stages


def _reference_weights(learner) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(learner.reference.named_parameters())
    if learner.reference_engine is None:
        return {n: p.detach().float().cpu().clone() for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {n: p.detach().float().cpu().clone() for n, p in params}


def check_stage(stage: int, dtype: str, model_dir: str, _work_dir: str, port: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
    from learner.actor import Learner
    from learner.batch import shard_for_learners

    cfg = LearnerConfig(num_workers=1, zero_stage=stage, micro_batch_size=4, lr=1e-2)
    algo = AlgorithmConfig(loss="ppo_clip", kl_loss_coef=0.5)
    learner = Learner(0, 1, model_dir, ModelConfig(dtype=dtype), cfg, algo, temperature=1.0, seed=0)
    learner.setup("127.0.0.1", port)
    initial = {n: t.float() for n, t in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    batch = random_batch(AutoTokenizer.from_pretrained(model_dir), 1)
    shard = shard_for_learners(batch, 1, 1, micro_batch_size=4)[0]
    first = learner.train_step(shard).metrics
    second = learner.train_step(shard).metrics
    reference = _reference_weights(learner)
    return {
        "zero_stage": stage, "dtype": dtype, "backend": torch.distributed.get_backend(),
        "reference_engine": type(learner.reference_engine).__name__ if learner.reference_engine else None,
        "reference_partitioned": all(hasattr(p, "ds_id") for p in learner.reference.parameters()),
        "reference_frozen": not any(p.requires_grad for p in learner.reference.parameters()),
        "reference_unchanged": all(torch.equal(reference[n], initial[n]) for n in reference if n in initial),
        "kl_loss_first": first["actor/kl_loss"],
        "kl_loss_second": second["actor/kl_loss"],
    }


def passed(r: dict) -> bool:
    return (r["kl_loss_first"] == 0.0 and r["kl_loss_second"] > 0.0 and r["reference_frozen"]
            and r["reference_unchanged"] and r["reference_partitioned"] == (r["zero_stage"] == 3))


def main(argv: list[str] | None = None) -> int:
    return run_stages(argv, __doc__, "reference KL", check_stage, passed)


if __name__ == "__main__":
    raise SystemExit(main())
