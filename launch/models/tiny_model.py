"""Build a tiny Qwen2-architecture model and its tokenizer, fully offline.

The tokenizer is character level over printable ASCII, so it can spell any math
prompt and any ``\\boxed{...}`` answer. vLLM and transformers both load the folder.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from conf.schema import TinyModelConfig

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = tuple(string.printable[:95])  # digits, letters, punctuation, space


def build_tokenizer():
    """A character-level fast tokenizer: one token per printable ASCII character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(output_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a randomly initialised tiny model plus tokenizer to ``output_dir``.

    Idempotent: an existing complete model directory is reused as it is.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = cfg or TinyModelConfig()
    output_dir = Path(output_dir)
    marker = output_dir / "lpreg_tiny.json"
    if marker.exists():
        return output_dir
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError("model.tiny.hidden_size must be a multiple of model.tiny.num_heads")
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim < 32:
        raise ValueError(
            f"model.tiny: head_dim={head_dim} is too small for vLLM's CPU attention; "
            "use hidden_size / num_heads >= 64"
        )

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)

    save_tiny_model(model, tokenizer, output_dir, {"tiny": vars(cfg)})
    return output_dir


def load_tiny_model(path: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def save_tiny_model(model, tokenizer, output_dir: str | Path, info: dict) -> Path:
    """Write model, tokenizer and a marker; the directory appears only when complete."""
    import shutil

    output_dir = Path(output_dir)
    tmp_dir = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "lpreg_tiny.json").write_text(json.dumps(info, indent=2))
    # Rename last, so a half-written model is never mistaken for a complete one.
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp_dir.rename(output_dir)
    return output_dir
