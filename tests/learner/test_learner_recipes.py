"""Every recipe only uses keys of the schema, the paper's Lp-Reg recipes hold the reference
settings, and the laptop pair, the spark arms and the tool pair differ in the method alone."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conf.load import load_config
from learner import ADVANTAGE_ESTIMATORS, AGG_MODES, KL_TYPES, POLICY_LOSSES

ALL_RECIPES = sorted((Path(__file__).resolve().parents[2] / "conf" / "recipes").glob("*.yaml"))
# The paper's settings, one per table row and update style; the rest are laptop-scale.
RECIPES = [p for p in ALL_RECIPES if p.stem.endswith(("_on_policy", "_off_policy"))]
LAPTOP_RECIPES = [p for p in ALL_RECIPES if p.stem.startswith("laptop_")]
SPARK_RECIPES = [p for p in ALL_RECIPES if p.stem.startswith("spark_")]
TOOL_RECIPES = [p for p in ALL_RECIPES if p.stem.startswith("tool_")]
METHODS = ("lp_reg", "grpo", "clip_higher", "gspo", "kl_cov", "entropy_8020", "grpo_entropy")


def load(path: Path):
    """The recipe as a run resolves it: its bases (``extends``) merged under it, checked
    against the schema (unknown keys and wrong types raise)."""
    return OmegaConf.structured(load_config(str(path)))


def test_one_on_and_one_off_policy_recipe_per_table_row():
    names = {p.stem for p in RECIPES}
    for method in METHODS:
        assert {f"{method}_on_policy", f"{method}_off_policy"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_keys_exist_in_schema(path):
    cfg = load(path)  # raises on unknown keys and wrong types
    algo = cfg.algorithm
    assert algo.loss in POLICY_LOSSES
    assert algo.loss_agg_mode in AGG_MODES
    assert algo.kl_type in KL_TYPES
    assert algo.advantage in ADVANTAGE_ESTIMATORS
    assert cfg.model.path is None  # the user points it at their model
    on_policy = path.stem.endswith("_on_policy")
    assert (algo.mini_batches_per_step == 1) == on_policy
    assert cfg.data.prompts_per_step // algo.mini_batches_per_step == (256 if on_policy else 32)
    assert cfg.trainer.run_name == path.stem


@pytest.mark.parametrize("variant", ["on_policy", "off_policy"])
def test_lp_reg_reference_settings(variant):
    cfg = load(next(p for p in RECIPES if p.stem == f"lp_reg_{variant}"))
    a = cfg.algorithm
    assert (a.loss, a.clip_ratio_low, a.clip_ratio_high) == ("lp_reg", 1.0, 9.0)
    assert (a.lp_reg_neg_frac, a.lp_reg_pos_frac, a.lp_reg_coef, a.lp_reg_min_p) == (0.01, 0.0, 1.0, 0.02)
    assert (a.kl_type, a.entropy_coef, a.loss_agg_mode) == ("low_var_kl", 0.0, "token-mean")
    assert (cfg.learner.lr, cfg.learner.grad_clip) == (1e-6, 1.0)
    assert (cfg.rollout.samples_per_prompt, cfg.rollout.temperature) == (8, 1.0)
    assert cfg.rollout.max_response_tokens == 8192


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_gpu_recipes_use_token_budgets_checkpointing_and_chunked_logits(path):
    cfg = load(path)
    learner = cfg.learner
    assert learner.gradient_checkpointing
    assert learner.logits_chunk_tokens > 0
    # No full-length sequence is ever over budget on its own.
    assert learner.max_tokens_per_micro_batch >= cfg.rollout.max_model_len


def test_every_recipe_is_a_paper_a_laptop_a_spark_or_a_tool_recipe():
    assert sorted(RECIPES + LAPTOP_RECIPES + SPARK_RECIPES + TOOL_RECIPES) == ALL_RECIPES


def test_tool_pair_differs_in_the_method_alone():
    grpo, lp_reg = (OmegaConf.to_container(load(p.with_name(f"tool_{name}.yaml")))
                    for p in TOOL_RECIPES[:1] for name in ("grpo", "lp_reg"))
    assert {k for k in grpo["algorithm"] if grpo["algorithm"][k] != lp_reg["algorithm"][k]} == \
        {"loss", "lp_reg_neg_frac"}
    for section in grpo:
        if section not in ("algorithm", "trainer"):
            assert grpo[section] == lp_reg[section], section
    assert {k for k in grpo["trainer"] if grpo["trainer"][k] != lp_reg["trainer"][k]} == {"run_name"}
    assert grpo["rollout"]["max_turns"] > 0 and grpo["data"]["synthetic"]["kind"] == "tool_product"


def test_spark_arms_differ_in_the_method_alone():
    arms = {p.stem: OmegaConf.to_container(load(p)) for p in SPARK_RECIPES}
    assert set(arms) == {"spark_grpo", "spark_grpo_entropy", "spark_lp_reg", "spark_lp_reg_no_filter",
                         "spark_lp_reg_strong"}
    grpo = arms["spark_grpo"]
    changed = {name: {k for k, v in arm["algorithm"].items() if v != grpo["algorithm"][k]}
               for name, arm in arms.items()}
    assert changed == {"spark_grpo": set(), "spark_grpo_entropy": {"entropy_coef"},
                       "spark_lp_reg": {"loss", "lp_reg_neg_frac"},
                       "spark_lp_reg_no_filter": {"loss", "lp_reg_neg_frac", "lp_reg_filter"},
                       "spark_lp_reg_strong": {"loss", "lp_reg_neg_frac", "lp_reg_coef"}}
    assert arms["spark_lp_reg_no_filter"]["algorithm"]["lp_reg_filter"] == "none"
    beta = {name: arms[name]["algorithm"]["lp_reg_coef"] for name in ("spark_lp_reg", "spark_lp_reg_strong")}
    assert beta == {"spark_lp_reg": 1.0, "spark_lp_reg_strong": 10.0}
    for name, arm in arms.items():
        for section in grpo:
            if section not in ("algorithm", "trainer"):
                assert arm[section] == grpo[section], (name, section)
        assert {k for k in grpo["trainer"] if arm["trainer"][k] != grpo["trainer"][k]} <= {"run_name"}
        assert arm["trainer"]["run_name"] == name
    # Off-policy, or the unfiltered arm would be GRPO; the spark task, with room for a recheck.
    assert grpo["algorithm"]["mini_batches_per_step"] > 1
    assert (grpo["data"]["synthetic"]["kind"], grpo["data"]["synthetic"]["num_operands"]) == ("spark_sum", 4)
    assert grpo["rollout"]["max_response_tokens"] == 64
    assert "W" in grpo["trainer"]["watch_tokens"] and grpo["trainer"]["watch_hist_every"] > 0
    assert grpo["model"]["path"] is None


def test_laptop_pair_differs_in_the_method_alone():
    grpo, lp_reg = (OmegaConf.to_container(load(p.with_name(f"laptop_{name}.yaml")))
                    for p in LAPTOP_RECIPES[:1] for name in ("grpo", "lp_reg"))
    method_keys = {"loss", "lp_reg_neg_frac"}
    assert {k for k in grpo["algorithm"] if grpo["algorithm"][k] != lp_reg["algorithm"][k]} == method_keys
    assert (grpo["algorithm"]["loss"], lp_reg["algorithm"]["loss"]) == ("ppo_clip", "lp_reg")
    for section in grpo:
        if section not in ("algorithm", "trainer"):
            assert grpo[section] == lp_reg[section], section
    assert {k for k in grpo["trainer"] if grpo["trainer"][k] != lp_reg["trainer"][k]} == {"run_name"}
    assert grpo["model"]["path"] is None  # the tiny model, built offline
