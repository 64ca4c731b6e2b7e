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
from contextlib import contextmanager
from pathlib import Path

import torch

from conf.schema import SyntheticTaskConfig, TinyModelConfig, ToolConfig
from launch.data.prompts import PromptRecord
from launch.data.synthetic import (
    DISTRACTORS,
    SPARK_TOKEN,
    TOOL_KINDS,
    Segments,
    final_answer,
    product_program,
    program_output,
    synthetic_problems,
    warm_start_segments,
)
from rollout.multi_turn import Markers

log = logging.getLogger("lpreg.bootstrap")


def format_answer(answer: str) -> str:
    """The response the verifier accepts: the final answer in ``\\boxed{}``."""
    return "\\boxed{" + answer + "}"


def _encode(tokenizer, records: list[PromptRecord],
            responses: list[Segments] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids, with labels only on the response's trained pieces
    and EOS.

    ``responses``: the responses to train on, in (text, trained) pieces; None: each answer
    boxed."""
    rows, labels = [], []
    responses = responses or [[(format_answer(record.answer), True)] for record in records]
    for record, pieces in zip(records, responses, strict=True):
        prompt = tokenizer(record.prompt)["input_ids"]
        row, label = list(prompt), [-100] * len(prompt)
        for text, trained in pieces:
            ids = tokenizer(text)["input_ids"]
            row += ids
            label += ids if trained else [-100] * len(ids)
        rows.append(row + [tokenizer.eos_token_id])
        labels.append(label + [tokenizer.eos_token_id])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        lab[i, : len(label)] = torch.tensor(label)
    return ids, lab


def _left_padded(tokenizer, texts: list[str], batch_size: int):
    """``texts`` tokenised in batches of ``batch_size`` and left-padded, so that every row of a
    batch ends at the same column: (ids, attention mask) per batch."""
    for start in range(0, len(texts), batch_size):
        chunk = [tokenizer(t)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(len(t) for t in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(chunk):
            ids[i, width - len(t):] = torch.tensor(t)
            mask[i, width - len(t):] = 1
        yield ids, mask


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
              **sampling) -> list[str]:
    """Continuations of ``prompts`` (plain torch, no vLLM), decoded; greedy unless
    ``sampling`` says otherwise (``do_sample=True``, ...)."""
    sampling = {"do_sample": False} | sampling
    texts = []
    for ids, mask in _left_padded(tokenizer, prompts, batch_size):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **sampling)
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    return texts


@torch.no_grad()
def next_token_probs(model, tokenizer, prefixes: list[str], batch_size: int = 250) -> torch.Tensor:
    """The model's next-token distribution after each prefix, at temperature 1: [prefixes, vocab]."""
    rows = []
    for ids, mask in _left_padded(tokenizer, prefixes, batch_size):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        rows.append(torch.softmax(logits.float(), dim=-1))
    return torch.cat(rows)


@contextmanager
def one_torch_thread():
    """Run torch on one thread meanwhile. A model this small gains nothing from a second, and
    on a busy machine OpenMP threads that wait on each other make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[PromptRecord], max_new_tokens: int = 16,
                    batch_size: int = 250, kind: str = "sum", markers: Markers | None = None) -> float:
    """Share of problems whose greedy answer is exactly right (plain torch, no vLLM).

    ``kind=spark_sum``: responses may recheck, so the last box is what counts, as for the
    verifier, and they get room for the recheck. A tool kind: the accuracy of the tool
    path, ``tool_path_accuracy``."""
    if kind in TOOL_KINDS:
        return tool_path_accuracy(model, tokenizer, records, markers, batch_size)
    spark = kind == "spark_sum"
    if spark:
        max_new_tokens = max(max_new_tokens, 64)
    model.eval()
    texts = _generate(model, tokenizer, [r.prompt for r in records], max_new_tokens, batch_size)
    model.train()
    pairs = zip(records, texts, strict=True)
    if spark:
        return sum(final_answer(t) == r.answer for r, t in pairs) / len(records)
    return sum(t.strip() == format_answer(r.answer) for r, t in pairs) / len(records)


@torch.no_grad()
def tool_path_accuracy(model, tokenizer, records: list[PromptRecord], markers: Markers,
                       batch_size: int = 250) -> float:
    """How reliably the model uses the tool once it opens a code block: the share of
    problems where, greedily, it writes the right program and then copies the tool's
    output into its answer.

    The warm start stops on this, not on plain greedy accuracy: greedy decoding takes the
    direct guess that most warm-start responses make, and is almost never right. Nothing
    is executed: the program is compared with the expected one, and the second half is
    given the output that program prints."""
    model.eval()
    opened = [r.prompt + markers.code_start for r in records]
    programs = _generate(model, tokenizer, opened, len(product_program(records[0].prompt)) + 16, batch_size)
    shown = [o + product_program(r.prompt) + markers.code_end + markers.output_start
             + program_output(r.answer) + markers.output_end for o, r in zip(opened, records, strict=True)]
    answers = _generate(model, tokenizer, shown, len(format_answer(records[0].answer)) + 4, batch_size)
    model.train()
    right = 0
    for record, program, answer in zip(records, programs, answers, strict=True):
        cut = program.find(markers.code_end)
        right += (cut >= 0 and program[:cut] == product_program(record.prompt)
                  and final_answer(answer) == record.answer)
    return right / len(records)


@torch.no_grad()
def spark_calibration(model, tokenizer, records: list[PromptRecord], samples: int = 4,
                      batch_size: int = 250, seed: int = 0) -> dict:
    """What RL starts from on ``spark_sum``, sampled at temperature 1 as the rollouts are:
    how often the spark follows the first answer, how often a distractor does, and the
    accuracy of each path (the direct guess, and the recheck after the spark), judged on
    the last box as the verifier does."""
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    paths = {"direct": [0, 0], "spark": [0, 0]}
    distractors = 0
    decisions = []  # each sampled response up to its first answer: the decision position follows
    repeated = [r for r in records for _ in range(samples)]
    texts = _generate(model, tokenizer, [r.prompt for r in repeated], 64, batch_size,
                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    for record, text in zip(repeated, texts, strict=True):
        close = text.find("}")
        after = text[close + 1:close + 2] if close >= 0 else ""
        if close >= 0:
            decisions.append(record.prompt + text[:close + 1])
        distractors += after in DISTRACTORS
        path = paths["spark" if after == SPARK_TOKEN else "direct"]
        path[0] += 1
        path[1] += final_answer(text) == record.answer
    torch.random.set_rng_state(generator_state)
    total = len(repeated)
    found = {"samples": total, "spark_frac": paths["spark"][0] / total,
             "distractor_frac": distractors / total,
             "direct_accuracy": paths["direct"][1] / max(1, paths["direct"][0]),
             "spark_accuracy": paths["spark"][1] / max(1, paths["spark"][0])}
    if decisions:
        found |= decision_position(next_token_probs(model, tokenizer, decisions, batch_size), tokenizer)
    model.train()
    return found


def decision_position(probs: torch.Tensor, tokenizer) -> dict:
    """The policy at the decision position ([responses, vocab], one row per response), averaged
    over responses: its entropy in nats, and the probability of the spark, of the distractors
    together and of ending the response there."""
    def token(text: str) -> int:
        return tokenizer(text, add_special_tokens=False)["input_ids"][0]

    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    distractor_ids = [token(d) for d in DISTRACTORS]
    return {"decision_entropy": entropy.mean().item(),
            "decision_spark_prob": probs[:, token(SPARK_TOKEN)].mean().item(),
            "decision_distractor_prob": probs[:, distractor_ids].sum(-1).mean().item(),
            "decision_end_prob": probs[:, tokenizer.eos_token_id].mean().item()}


def warm_start(model, tokenizer, task: SyntheticTaskConfig, cfg: TinyModelConfig,
               markers: Markers | None = None) -> dict:
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
        responses = [warm_start_segments(task.kind, r.prompt, r.answer, response_rng, markers)
                     for r in records]
        ids, labels = _encode(tokenizer, records, responses)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % cfg.warm_start_probe_every == 0 or step == cfg.warm_start_steps:
            accuracy = greedy_accuracy(model, tokenizer, probe, kind=task.kind, markers=markers)
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


def tool_markers(task: SyntheticTaskConfig, tool: ToolConfig | None) -> Markers | None:
    """The markers a tool kind's warm start writes its tool calls in: the run's own, so that
    the model calls the tool as the rollout workers expect; None for the other kinds."""
    if task.kind not in TOOL_KINDS:
        return None
    tool = tool or ToolConfig()
    return Markers(tool.code_start, tool.code_end, tool.output_start, tool.output_end)


def model_task(task: SyntheticTaskConfig) -> dict:
    """The task settings a tiny model depends on. Not ``task.seed``: the warm start draws its
    problems from ``model.tiny.seed``, so runs on other problem sets share one model."""
    return {key: value for key, value in vars(task).items() if key != "seed"}


def tiny_model_dir(cache_dir: str | Path, cfg: TinyModelConfig, task: SyntheticTaskConfig,
                   tool: ToolConfig | None = None) -> Path:
    """Where the tiny model for these settings lives: one directory per distinct recipe."""
    import hashlib

    identity = {"tiny": vars(cfg), "task": model_task(task)}
    markers = tool_markers(task, tool)
    if markers is not None:  # only here, so that the other kinds keep their directories
        identity["markers"] = vars(markers)
    key = json.dumps(identity, sort_keys=True)
    return Path(cache_dir) / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def bootstrap(output_dir: str | Path, cfg: TinyModelConfig, task: SyntheticTaskConfig,
              eval_problems: int = 500, tool: ToolConfig | None = None) -> Path:
    """Build, warm-start and save the tiny model; reuse an existing complete one.

    ``tool``: the run's tool settings, whose markers a tool kind's warm start writes."""
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
    report: dict = {"tiny": vars(cfg), "task": model_task(task)}
    markers = tool_markers(task, tool)
    if markers is not None:
        report["markers"] = vars(markers)
    with one_torch_thread():
        if cfg.warm_start_steps > 0:
            report["warm_start"] = warm_start(model, tokenizer, task, cfg, markers)
            held_out = synthetic_problems(task, eval_problems, seed=cfg.seed + 7919)
            report["warm_start"]["greedy_accuracy"] = greedy_accuracy(model, tokenizer, held_out,
                                                                      kind=task.kind, markers=markers)
            log.info("warm-started model: %s %.1f%% on %d held-out problems",
                     "greedy accuracy" if markers is None else "tool-path accuracy",
                     100 * report["warm_start"]["greedy_accuracy"], len(held_out))
            if task.kind == "spark_sum":
                calibration = spark_calibration(model, tokenizer, held_out, seed=cfg.seed)
                report["warm_start"]["sampled"] = calibration
                log.info("sampled at temperature 1: the spark follows %.1f%% of first answers, a "
                         "distractor %.1f%%; accuracy %.1f%% after the spark, %.1f%% without",
                         100 * calibration["spark_frac"], 100 * calibration["distractor_frac"],
                         100 * calibration["spark_accuracy"], 100 * calibration["direct_accuracy"])
    save_tiny_model(model, tokenizer, output_dir, report)
    shutil.rmtree(scratch, ignore_errors=True)
    (output_dir / "bootstrap.json").write_text(json.dumps(report, indent=2))
    return output_dir
