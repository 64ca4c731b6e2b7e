"""``lpreg bootstrap``: a tiny model that is already right sometimes, built offline.

RL from verifiable rewards only learns from answers that are sometimes correct, so a
random model gives it nothing to work with. Bootstrap builds the tiny model and its
tokenizer, then runs a short supervised warm start on synthetic problems and stops
early, leaving the model well below its ceiling so that RL has room to help.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from conf.schema import SyntheticTaskConfig, TinyModelConfig
from launch.data.prompts import PromptRecord
from launch.data.synthetic import final_answer, synthetic_problems, warm_start_response

log = logging.getLogger("lpreg.bootstrap")


def format_answer(answer: str) -> str:
    """The response the verifier accepts: the final answer in ``\\boxed{}``."""
    return "\\boxed{" + answer + "}"


def _encode(tokenizer, records: list[PromptRecord],
            responses: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids, with labels only on the response and EOS.

    ``responses``: the responses to train on; None: each answer boxed."""
    rows, labels = [], []
    responses = responses or [format_answer(record.answer) for record in records]
    for record, text in zip(records, responses, strict=True):
        prompt = tokenizer(record.prompt)["input_ids"]
        response = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        lab[i, : len(label)] = torch.tensor(label)
    return ids, lab


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[PromptRecord], max_new_tokens: int = 16,
                    batch_size: int = 250, kind: str = "sum") -> float:
    """Share of problems whose greedy answer is exactly right (plain torch, no vLLM).

    ``kind=spark_sum``: responses may recheck, so the last box is what counts, as for the
    verifier, and they get room for the recheck."""
    spark = kind == "spark_sum"
    if spark:
        max_new_tokens = max(max_new_tokens, 64)
    model.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [tokenizer(r.prompt)["input_ids"] for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, so every row ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for record, row in zip(chunk, out[:, width:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            if spark:
                correct += final_answer(text) == record.answer
            else:
                correct += text.strip() == format_answer(record.answer)
    model.train()
    return correct / len(records)


def warm_start(model, tokenizer, task: SyntheticTaskConfig, cfg: TinyModelConfig) -> dict:
    """Supervised training on the answer tokens of fresh synthetic problems.

    Small models learn arithmetic in a sudden jump, and where the jump falls depends
    on the seed, so a fixed step count could leave the model at 5% or at 95%. Instead
    it stops as soon as greedy accuracy on a probe set reaches the target.
    """
    rng = random.Random(cfg.seed)
    # Its own stream, so that the problems each step draws do not depend on the task's responses.
    response_rng = random.Random(cfg.seed + 1)
    probe = synthetic_problems(task, cfg.warm_start_probe_problems, seed=cfg.seed + 104729)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warm_start_lr, weight_decay=0.0)
    warmup = max(1, cfg.warm_start_warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / warmup))
    model.train()
    start = time.perf_counter()
    loss_value, accuracy, step = float("nan"), 0.0, 0
    for step in range(1, cfg.warm_start_steps + 1):
        records = synthetic_problems(task, cfg.warm_start_batch_size, seed=rng.randrange(2**31))
        responses = [warm_start_response(task.kind, r.prompt, r.answer, response_rng) for r in records]
        ids, labels = _encode(tokenizer, records, responses)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % cfg.warm_start_probe_every == 0 or step == cfg.warm_start_steps:
            accuracy = greedy_accuracy(model, tokenizer, probe, kind=task.kind)
            log.info("warm start %d/%d loss %.4f probe accuracy %.1f%% (%.0fs)", step,
                     cfg.warm_start_steps, loss_value, 100 * accuracy, time.perf_counter() - start)
            if accuracy >= cfg.warm_start_target_accuracy:
                break
    if accuracy < cfg.warm_start_target_accuracy:
        log.warning("warm start used all %d steps and reached %.1f%% probe accuracy, short of "
                    "model.tiny.warm_start_target_accuracy=%.0f%%: RL learns little from a model "
                    "that is rarely right (see docs/troubleshooting.md)", step,
                    100 * accuracy, 100 * cfg.warm_start_target_accuracy)
    return {"steps": step, "final_loss": loss_value, "probe_accuracy": accuracy,
            "seconds": time.perf_counter() - start}


def tiny_model_dir(cache_dir: str | Path, cfg: TinyModelConfig, task: SyntheticTaskConfig) -> Path:
    """Where the tiny model for these settings lives: one directory per distinct recipe."""
    import hashlib

    key = json.dumps({"tiny": vars(cfg), "task": vars(task)}, sort_keys=True)
    return Path(cache_dir) / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def bootstrap(output_dir: str | Path, cfg: TinyModelConfig, task: SyntheticTaskConfig,
              eval_problems: int = 500) -> Path:
    """Build, warm-start and save the tiny model; reuse an existing complete one."""
    from launch.models.tiny_model import build_tiny_model, load_tiny_model, save_tiny_model

    output_dir = Path(output_dir)
    marker = output_dir / "lpreg_tiny.json"
    if marker.exists():
        return output_dir
    scratch = output_dir.with_name(output_dir.name + ".random")
    shutil.rmtree(scratch, ignore_errors=True)
    build_tiny_model(scratch, cfg)
    model, tokenizer = load_tiny_model(scratch)
    torch.manual_seed(cfg.seed)
    # A model this small gains nothing from a second thread, and on a busy machine
    # OpenMP threads that wait on each other make every step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report: dict = {"tiny": vars(cfg), "task": vars(task)}
    try:
        if cfg.warm_start_steps > 0:
            report["warm_start"] = warm_start(model, tokenizer, task, cfg)
            held_out = synthetic_problems(task, eval_problems, seed=cfg.seed + 7919)
            report["warm_start"]["greedy_accuracy"] = greedy_accuracy(model, tokenizer, held_out,
                                                                      kind=task.kind)
            log.info("warm-started model: greedy accuracy %.1f%% on %d held-out problems",
                     100 * report["warm_start"]["greedy_accuracy"], len(held_out))
    finally:
        torch.set_num_threads(threads)
    save_tiny_model(model, tokenizer, output_dir, report)
    shutil.rmtree(scratch, ignore_errors=True)
    (output_dir / "bootstrap.json").write_text(json.dumps(report, indent=2))
    return output_dir
