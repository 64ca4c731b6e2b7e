"""``lpreg eval``: its shorthands, where results go, and config checks before anything starts."""

import json

import pytest

from conf.load import ConfigError
from conf.schema import LpregConfig
from launch.cli.eval import (
    checkpoint_model_dir,
    checkpoint_of,
    default_output,
    expand_shorthands,
    run_evaluation,
)
from launch.training import checkpoint
from launch.training.evaluation import EvalResult, load_eval_results


def fake_checkpoint(run_dir, step):
    step_dir = checkpoint.checkpoint_root(run_dir) / f"step_{step}"
    (step_dir / "hf").mkdir(parents=True)
    (step_dir / "hf" / "config.json").write_text("{}")
    (step_dir / checkpoint.STATE_FILE).write_text(checkpoint.TrainerState(
        step=step, weight_version=step, sampler={"epoch": 0, "position": 0}, num_prompts=1,
        learner_world_size=1, zero_stage=0, seed=0).to_json())
    return step_dir


def test_shorthands_expand_to_config_keys():
    assert expand_shorthands(["model=/m", "data=d.jsonl", "trainer.eval_samples=8"]) == [
        "model.path=/m", "data.eval_path=d.jsonl", "trainer.eval_samples=8"]


def test_a_checkpoint_stands_for_its_export_and_results_go_next_to_its_run(tmp_path):
    step_dir = fake_checkpoint(tmp_path / "runs" / "lp", 40)
    model_dir = checkpoint_model_dir(step_dir)
    assert model_dir == step_dir / "hf"
    assert checkpoint_of(model_dir) == ((tmp_path / "runs" / "lp").resolve(), 40)
    cfg = LpregConfig()
    assert default_output(cfg, model_dir) == (tmp_path / "runs" / "lp").resolve() / "eval.jsonl"
    other = tmp_path / "plain-model"
    other.mkdir()
    assert checkpoint_of(other) is None
    cfg.trainer.output_dir, cfg.trainer.run_name = str(tmp_path / "out"), "qwen-eval"
    assert default_output(cfg, other) == tmp_path / "out" / "qwen-eval" / "eval.jsonl"


def test_training_data_without_eval_data_is_a_config_error(tmp_path):
    cfg = LpregConfig()
    cfg.model.path = str(fake_checkpoint(tmp_path, 2))
    cfg.data.train_path = str(tmp_path / "train.jsonl")
    with pytest.raises(ConfigError, match="data.eval_path"):
        run_evaluation(cfg)


def test_run_evaluations_are_read_back_without_stand_alone_ones(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join([
        json.dumps({"step": 0, "eval/accuracy": 0.1}),
        json.dumps({"step": 5, "eval/accuracy": 0.2, "source": "lpreg eval", "model": "m"}),
        json.dumps({"step": 10, "eval/accuracy": 0.3}),
        '{"step": 20, "eval/acc',  # cut short by a kill
    ]) + "\n")
    assert load_eval_results(path) == [EvalResult(0, {"eval/accuracy": 0.1}),
                                       EvalResult(10, {"eval/accuracy": 0.3})]
    assert load_eval_results(path, up_to_step=5) == [EvalResult(0, {"eval/accuracy": 0.1})]
    assert load_eval_results(tmp_path / "none.jsonl") == []
