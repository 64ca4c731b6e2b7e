"""A run's prompts: loaded, tokenized (through the chat template where asked) and length-checked."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conf.schema import LpregConfig
from launch.data.prompts import DataError, PromptRecord, load_prompts_file
from launch.data.synthetic import synthetic_problems

log = logging.getLogger("lpreg")


def load_prompts_for(key: str, path: str, prompt_key: str | None = None,
                     answer_key: str | None = None) -> list[PromptRecord]:
    """``load_prompts_file``, with the config key that named the file in any error."""
    try:
        return load_prompts_file(path, prompt_key, answer_key)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def load_prompts(cfg: LpregConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Training prompts and held-out evaluation prompts."""
    keys = (cfg.data.prompt_key, cfg.data.answer_key)
    if cfg.data.train_path:
        train = load_prompts_for("data.train_path", cfg.data.train_path, *keys)
        held_out = (load_prompts_for("data.eval_path", cfg.data.eval_path, *keys)
                    if cfg.data.eval_path else [])
        return train, held_out
    if cfg.data.eval_path:
        held_out = load_prompts_for("data.eval_path", cfg.data.eval_path, *keys)
    else:
        # Distinct problems from their own seed...
        candidates = synthetic_problems(cfg.data.synthetic, 4 * cfg.data.num_synthetic_eval,
                                        seed=cfg.data.synthetic.seed + 1_000_003)
        unique = {r.prompt: r for r in candidates}
        held_out = list(unique.values())[: cfg.data.num_synthetic_eval]
    # ...that the policy never trains on.
    excluded = {r.prompt for r in held_out}
    train = [r for r in synthetic_problems(cfg.data.synthetic, cfg.data.num_synthetic_train,
                                           seed=cfg.data.synthetic.seed)
             if r.prompt not in excluded]
    return train, held_out


def prompt_token_ids(tokenizer, record: PromptRecord, chat_template: str = "auto") -> list[int]:
    """Token ids of one prompt, through the tokenizer's chat template where ``data.chat_template``
    and the tokenizer say so (see the config key for the three modes)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = record.is_chat or chat_template == "always" or (
        chat_template == "auto" and has_template)
    if not use_template:
        return tokenizer(record.prompt)["input_ids"]
    if not has_template:
        why = ("is a list of chat messages" if record.is_chat
               else "needs it (data.chat_template=always)")
        raise DataError(f"prompt '{record.id}' {why}, but the model's tokenizer has no chat "
                        "template")
    messages = record.messages() if record.is_chat else [{"role": "user", "content": record.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def tokenize_prompts(tokenizer, records: list[PromptRecord], max_tokens: int,
                     chat_template: str = "auto"):
    """Token ids per prompt; prompts over ``max_tokens`` are dropped and counted.

    A prompt that appears more than once (verl's DAPO-Math-17k repeats each problem 100
    times) is tokenized once, and its records share that one list: read it, never change it.
    """
    kept, ids, dropped = [], [], 0
    tokenized: dict = {}
    for record in records:
        tokens = tokenized.get(record.prompt)
        if tokens is None:
            tokens = tokenized[record.prompt] = prompt_token_ids(tokenizer, record, chat_template)
        if len(tokens) > max_tokens:
            dropped += 1
            continue
        kept.append(record)
        ids.append(tokens)
    return kept, ids, dropped


@dataclass
class PreparedPrompts:
    """Tokenized training and evaluation prompts, over-long ones already skipped."""

    records: list[PromptRecord]
    ids_of: dict[int, list[int]]  # id(record) -> prompt token ids
    eval_records: list[PromptRecord]
    eval_ids: list[list[int]]


def prepare_prompts(cfg: LpregConfig, tokenizer, train_records: list[PromptRecord],
                    eval_records: list[PromptRecord]) -> PreparedPrompts:
    """Tokenize what ``load_prompts`` returned (loaded first, so a bad row is reported
    before any model is built)."""
    records, prompt_ids, dropped = tokenize_prompts(
        tokenizer, train_records, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    eval_records, eval_ids, eval_dropped = tokenize_prompts(
        tokenizer, eval_records, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    if dropped or eval_dropped:
        log.warning("skipped %d training and %d evaluation prompts longer than "
                    "data.max_prompt_tokens=%d", dropped, eval_dropped, cfg.data.max_prompt_tokens)
    ids_of = {id(r): ids for r, ids in zip(records, prompt_ids, strict=True)}
    return PreparedPrompts(records, ids_of, eval_records, eval_ids)
