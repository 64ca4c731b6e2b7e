"""lpreg bootstrap: a tiny model and tokenizer built offline, warm-started on a real task.

These train a real (small) model for a few seconds; nothing is mocked.
"""

from __future__ import annotations

import json
import logging

from conf.schema import SyntheticTaskConfig, TinyModelConfig
from launch.data.synthetic import synthetic_problems
from launch.models.bootstrap import bootstrap, format_answer, greedy_accuracy, tiny_model_dir
from launch.models.tiny_model import load_tiny_model

# Sums of one-digit operands: learnable in a few hundred small steps.
EASY = SyntheticTaskConfig(kind="sum", num_operands=2, min_operand=1, max_operand=3, seed=0)


def small(**overrides) -> TinyModelConfig:
    settings = dict(num_layers=1, hidden_size=64, num_heads=1, num_kv_heads=1,
                    intermediate_size=128, warm_start_batch_size=32, warm_start_lr=3e-3,
                    warm_start_warmup_steps=10, warm_start_probe_every=10,
                    warm_start_probe_problems=50)
    settings.update(overrides)
    return TinyModelConfig(**settings)


def test_warm_start_stops_once_the_probe_reaches_the_target(tmp_path):
    cfg = small(warm_start_steps=400, warm_start_target_accuracy=0.6)
    out = bootstrap(tmp_path / "tiny", cfg, EASY, eval_problems=100)

    report = json.loads((out / "bootstrap.json").read_text())["warm_start"]
    assert report["probe_accuracy"] >= 0.6
    assert report["steps"] < 400  # stopped early, not at the cap
    # What was saved is the warm-started model, in a format transformers loads.
    model, tokenizer = load_tiny_model(out)
    held_out = synthetic_problems(EASY, 100, seed=cfg.seed + 7919)
    assert greedy_accuracy(model, tokenizer, held_out) == report["greedy_accuracy"] > 0.3
    assert not (tmp_path / "tiny.random").exists() and not (tmp_path / "tiny.partial").exists()


def test_a_warm_start_that_misses_the_target_says_so(tmp_path, caplog):
    cfg = small(warm_start_steps=20, warm_start_target_accuracy=1.0)
    with caplog.at_level(logging.WARNING, logger="lpreg.bootstrap"):
        out = bootstrap(tmp_path / "tiny", cfg, EASY, eval_problems=20)
    assert json.loads((out / "bootstrap.json").read_text())["warm_start"]["steps"] == 20
    assert "model.tiny.warm_start_target_accuracy" in caplog.text


def test_an_existing_model_is_reused_and_settings_get_their_own_directory(tmp_path):
    cfg = small(warm_start_steps=0)
    first = bootstrap(tiny_model_dir(tmp_path, cfg, EASY), cfg, EASY)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert bootstrap(first, cfg, EASY) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_model_dir(tmp_path, small(warm_start_lr=1e-4), EASY) != first


def test_the_trained_answer_format_is_what_the_verifier_accepts():
    from verifier import MathVerifier

    with MathVerifier(num_workers=1) as verifier:
        assert verifier.score_batch([format_answer("42")], ["42"]) == [1.0]
