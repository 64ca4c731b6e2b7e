"""``lpreg eval``: evaluate a model directory on held-out problems, outside training.

It uses the same pieces as evaluation during training (rollout workers on vLLM, the
math verifier, ``launch.training.evaluation``) and the same config: ``model.path``,
``data.eval_path`` (lpreg's rows or verl's, e.g. verl's AIME Parquet files, with
``data.prompt_key``/``data.answer_key`` for other layouts), ``trainer.eval_temperature``,
``trainer.eval_samples``, ``rollout.*`` and ``verifier.*``. Metrics come overall and per
``data_source``.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from conf.load import ConfigError, load_config, to_yaml
from conf.schema import LpregConfig
from launch.cli.arguments import add_overrides_argument, add_recipe_argument
from launch.training import checkpoint
from launch.training.evaluation import EvalResult

log = logging.getLogger("lpreg")

# Shorthands for the two keys every evaluation sets.
SHORTHANDS = {"model": "model.path", "data": "data.eval_path"}


def expand_shorthands(overrides: list[str]) -> list[str]:
    """``model=PATH`` -> ``model.path=PATH``, ``data=FILE`` -> ``data.eval_path=FILE``."""
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        expanded.append(f"{SHORTHANDS[key]}={value}" if sep and key in SHORTHANDS else item)
    return expanded


def checkpoint_model_dir(path: Path) -> Path:
    """A checkpoint directory stands for its Hugging Face export."""
    if (path / checkpoint.HF_DIR / "config.json").is_file():
        return path / checkpoint.HF_DIR
    return path


def checkpoint_of(model_dir: Path) -> tuple[Path, int] | None:
    """(run directory, step) when ``model_dir`` is the export inside a run's checkpoint."""
    step_dir = model_dir.resolve().parent
    state_file = step_dir / checkpoint.STATE_FILE
    if model_dir.name != checkpoint.HF_DIR or not state_file.is_file():
        return None
    step = checkpoint.read_state(step_dir).step
    if step_dir.parent.name == checkpoint.CHECKPOINT_DIR:
        return step_dir.parent.parent, step
    return step_dir, step


def default_output(cfg: LpregConfig, model_dir: Path) -> Path:
    """Next to the run when evaluating one of its checkpoints, else the configured run dir."""
    found = checkpoint_of(model_dir)
    if found is not None:
        return found[0] / "eval.jsonl"
    return Path(cfg.trainer.output_dir) / cfg.trainer.run_name / "eval.jsonl"


def run_evaluation(cfg: LpregConfig, output: str | Path | None = None) -> tuple[EvalResult, Path]:
    """Evaluate, append one record to ``eval.jsonl``, and return it with the file's path."""
    from transformers import AutoTokenizer

    from conf.validate import resolve_auto
    from launch.cluster import ray_setup
    from launch.cluster.rollout_pool import RolloutPool
    from launch.data.prepare import load_prompts, tokenize_prompts
    from launch.models.resolve import resolve_model_path
    from launch.training.evaluation import evaluate
    from verifier import MathVerifier

    if cfg.data.train_path and not cfg.data.eval_path:
        raise ConfigError("config key 'data.eval_path' is not set: lpreg eval needs the "
                          "problems to evaluate on (or neither data path, for the synthetic set)")
    # The data first: a bad row is reported before a model is built.
    _, records = load_prompts(cfg)
    if cfg.model.path:
        cfg.model.path = str(checkpoint_model_dir(Path(cfg.model.path).expanduser()))
    model_path = Path(resolve_model_path(cfg))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    records, prompt_ids, dropped = tokenize_prompts(tokenizer, records, cfg.data.max_prompt_tokens,
                                                    cfg.data.chat_template)
    if dropped:
        log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", dropped,
                    cfg.data.max_prompt_tokens)
    if not records:
        raise ConfigError("config key 'data.max_prompt_tokens': no evaluation prompt fits")
    found = checkpoint_of(model_path)
    output = Path(output) if output else default_output(cfg, model_path)

    import ray

    started_ray = not ray.is_initialized()
    where = ray_setup.connect(cfg)
    log.info("Ray: %s; evaluating %s on %d problems", where, model_path, len(records))
    verifier = MathVerifier.from_config(cfg.verifier)
    rollout = None
    try:
        rollout = RolloutPool(cfg.rollout.num_workers, str(model_path), cfg.model,
                              resolve_auto(cfg).rollout, seed=cfg.trainer.seed, tool_cfg=cfg.tool)
        result = evaluate(rollout, verifier, records, prompt_ids,
                          step=found[1] if found else 0,
                          temperature=cfg.trainer.eval_temperature,
                          samples=cfg.trainer.eval_samples, seed=cfg.trainer.seed,
                          max_response_tokens=cfg.rollout.max_response_tokens,
                          top_p=cfg.rollout.top_p)
    finally:
        verifier.close()
        if rollout is not None:
            rollout.shutdown()
        if started_ray:
            ray.shutdown()

    record = {
        **result.as_record(),
        # Marks a stand-alone evaluation: a run's own curve leaves these records out.
        "source": "lpreg eval",
        "model": str(model_path),
        "data": cfg.data.eval_path or "synthetic",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if found is None:
        record["step"] = None
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return result, output


def format_result(result: EvalResult) -> str:
    """One line per metric, the overall ones first."""
    keys = sorted(result.metrics, key=lambda k: (k.count("/") > 1, k))
    width = max(len(k) for k in keys)
    lines = []
    for key in keys:
        value = result.metrics[key]
        shown = f"{int(value)}" if "num_problems" in key else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, expand_shorthands(args.overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result, output = run_evaluation(cfg, args.output)
    print(format_result(result))
    print(f"appended to {output}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "eval", help="evaluate a model directory or checkpoint on held-out problems")
    add_recipe_argument(evaluate)
    evaluate.add_argument("--output", help="eval.jsonl to append to (default: the run directory "
                          "of the checkpoint, else trainer.output_dir/trainer.run_name)")
    evaluate.add_argument("--print-config", action="store_true",
                          help="print the resolved config and exit")
    add_overrides_argument(
        evaluate, "e.g. model=runs/demo/checkpoints/step_60 data=aime.parquet "
                  "trainer.eval_samples=8 trainer.eval_temperature=0.6 "
                  "(model= and data= stand for model.path= and data.eval_path=)")
    evaluate.set_defaults(func=run)
