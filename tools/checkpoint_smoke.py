"""Check the learner's checkpoint round trip on one rank, without Ray or vLLM.

    python tools/checkpoint_smoke.py [--stages 0,3] [--dtype float32] [--json out.json]

For each ZeRO stage: train one step, save, train a second step; then build a fresh
learner, load the checkpoint and train the same second step. The weights after loading
must equal the saved ones, and the second step must land on the same weights (the
optimizer state came back too). The Hugging Face export must hold the saved weights.
Runs on CUDA (NCCL) when a GPU is visible, else on CPU (gloo).
"""

from __future__ import annotations

import os

import torch
from stage_runner import random_batch, run_stages


def _weights(learner) -> dict[str, torch.Tensor]:
    return {name: tensor.float().cpu().clone() for name, tensor in learner.export_weights()}


def check_stage(stage: int, dtype: str, model_dir: str, work_dir: str, port: int) -> dict:
    from safetensors.torch import load_file

    from conf.schema import AlgorithmConfig, LearnerConfig, ModelConfig
    from learner.actor import Learner
    from learner.batch import shard_for_learners

    cfg = LearnerConfig(num_workers=1, zero_stage=stage, micro_batch_size=8, lr=1e-2)
    algo = AlgorithmConfig(loss="lp_reg", lp_reg_neg_frac=0.2)
    tokenizer_dir = model_dir

    def learner():
        made = Learner(0, 1, model_dir, ModelConfig(dtype=dtype), cfg, algo, temperature=1.0, seed=0)
        made.setup("127.0.0.1", port)
        return made

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    first, second = (shard_for_learners(random_batch(tokenizer, s), 1, 1)[0] for s in (1, 2))
    second_again = shard_for_learners(random_batch(tokenizer, 2), 1, 1)[0]
    checkpoint_dir = os.path.join(work_dir, f"stage{stage}")

    original = learner()
    original.train_step(first)
    saved = _weights(original)
    original.save_checkpoint(checkpoint_dir)
    original.train_step(second)
    continued = _weights(original)
    del original

    restored = learner()
    restored.load_checkpoint(checkpoint_dir)
    loaded = _weights(restored)
    restored.train_step(second_again)
    resumed = _weights(restored)

    exported = load_file(os.path.join(checkpoint_dir, "hf", "model.safetensors"))
    return {
        "zero_stage": stage, "dtype": dtype, "backend": torch.distributed.get_backend(),
        "loaded_equals_saved": all(torch.equal(saved[n], loaded[n]) for n in saved),
        "second_step_equal": all(torch.equal(continued[n], resumed[n]) for n in continued),
        "second_step_max_diff": max(float((continued[n] - resumed[n]).abs().max()) for n in continued),
        "weights_moved": any(not torch.equal(saved[n], continued[n]) for n in saved),
        "export_equals_saved": all(torch.equal(exported[n].float(), saved[n]) for n in exported),
        "export_tensors": len(exported),
        "tokenizer_exported": os.path.isfile(os.path.join(checkpoint_dir, "hf", "tokenizer.json")),
    }


def passed(r: dict) -> bool:
    return (r["loaded_equals_saved"] and r["second_step_equal"] and r["weights_moved"]
            and r["export_equals_saved"] and r["tokenizer_exported"])


def main(argv: list[str] | None = None) -> int:
    return run_stages(argv, __doc__, "checkpoint round trip", check_stage, passed)


if __name__ == "__main__":
    raise SystemExit(main())
