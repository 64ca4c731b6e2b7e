"""The spark task's decision position, probed on a comparison run's first and last model.

Training metrics see the spark only when it is sampled. The probe asks the policy itself,
before RL and after: sampled at temperature 1 on the same held-out problems, how often the
spark ``W`` and the distractors follow the first answer and how often each path ends right;
and, at that position, the policy's entropy and the probability it gives the spark, the
distractors and the end (``launch.models.bootstrap.spark_calibration``). It runs on plain
torch, a few seconds a model, for runs of ``data.synthetic.kind=spark_sum`` that saved a
final checkpoint (``trainer.save_every``); the result is kept in the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from conf.schema import LpregConfig
from launch.training.checkpoint import HF_DIR, checkpoint_root, list_checkpoints

log = logging.getLogger("lpreg.compare")

PROBE_FILE = "spark_probe.json"
# Each problem is sampled 4 times: 2000 responses, a spread of about 0.7 points on a 10% share.
PROBE_PROBLEMS = 500

# calibration key -> what it means; the summary has each at the start and the end of training.
PROBE_DEFINITIONS = {
    "spark_frac": "share of sampled responses (T=1, 4 per held-out problem) whose first answer "
                  "the spark W follows",
    "distractor_frac": "share of sampled responses whose first answer an inert distractor follows",
    "direct_accuracy": "accuracy of the sampled responses without the spark",
    "spark_accuracy": "accuracy of the sampled responses with the spark (their last box)",
    "decision_entropy": "entropy of the policy just after the first answer, in nats, mean over "
                        "the sampled responses",
    "decision_spark_prob": "probability of W just after the first answer, mean over responses",
    "decision_distractor_prob": "probability of any distractor just after the first answer",
    "decision_end_prob": "probability of ending the response just after the first answer",
}
STAGES = {"start": "the model RL starts from", "end": "the run's last checkpoint"}


def probe_model(model_dir: Path, cfg: LpregConfig) -> dict:
    """``spark_calibration`` of the model in ``model_dir`` on the warm start's held-out problems."""
    from launch.data.synthetic import synthetic_problems
    from launch.models.bootstrap import one_torch_thread, spark_calibration
    from launch.models.tiny_model import load_tiny_model

    model, tokenizer = load_tiny_model(model_dir)
    # The held-out set the bootstrap calibrates on, so the start reads as bootstrap.json does.
    problems = synthetic_problems(cfg.data.synthetic, PROBE_PROBLEMS, seed=cfg.model.tiny.seed + 7919)
    with one_torch_thread():
        return spark_calibration(model, tokenizer, problems, seed=cfg.model.tiny.seed)


def start_model_dir(cfg: LpregConfig) -> Path:
    if cfg.model.path:
        return Path(cfg.model.path)
    from launch.models.bootstrap import tiny_model_dir

    return tiny_model_dir(cfg.model.cache_dir, cfg.model.tiny, cfg.data.synthetic, cfg.tool)


def final_model_dir(run_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_root(run_dir), warn=False)
    return found[-1][1] / HF_DIR if found else None


def probe_run(run_dir: Path, cfg: LpregConfig, digest: str, start_cache: dict[Path, dict]) -> dict:
    """``KEY@start`` and ``KEY@end`` for every ``PROBE_DEFINITIONS`` key of a finished
    spark_sum run; ``{}`` for other tasks. ``start_cache`` holds start models already probed."""
    if cfg.data.synthetic.kind != "spark_sum":
        return {}
    saved = run_dir / PROBE_FILE
    if saved.is_file():
        kept = json.loads(saved.read_text())
        if kept.get("config_digest") == digest:
            return kept["values"]
    start = start_model_dir(cfg).resolve()
    if start not in start_cache:
        start_cache[start] = probe_model(start, cfg) if (start / "config.json").is_file() else {}
    values = {f"{key}@start": start_cache[start].get(key) for key in PROBE_DEFINITIONS}
    final = final_model_dir(run_dir)
    if final is None:
        log.warning("%s saved no checkpoint, so its final policy is not probed at the decision "
                    "position: set trainer.save_every (e.g. to trainer.total_steps)", run_dir)
        end = {}
    else:
        end = probe_model(final, cfg)
    values |= {f"{key}@end": end.get(key) for key in PROBE_DEFINITIONS}
    saved.write_text(json.dumps({"config_digest": digest, "final_model": str(final),
                                 "values": values}, indent=2) + "\n")
    return values


def probe_definitions() -> dict[str, str]:
    return {f"{key}@{stage}": f"{meaning}; {where}" for key, meaning in PROBE_DEFINITIONS.items()
            for stage, where in STAGES.items()}
