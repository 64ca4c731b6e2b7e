"""Every bad setting is refused when the config loads: exit status 2, one short message that
names the key and what it allows, and nothing started or written.

The cases come from the schema itself (every key declared with ``one_of`` or ``within``),
so a key added with a constraint is covered here without a new test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conf.load import ConfigError, load_config
from conf.schema import (
    ADVANTAGE_ESTIMATORS,
    KL_TYPES,
    LOSS_AGG_MODES,
    LR_SCHEDULERS,
    POLICY_LOSSES,
    SYNTHETIC_KINDS,
    WEIGHT_SYNC_ALIASES,
    WEIGHT_SYNC_TRANSPORTS,
    Range,
)
from conf.validate import constrained_keys
from launch.cli.main import main


def bad_values() -> list[tuple[str, object]]:
    """(key, a value the key must refuse): one per choice key, one per side of each range."""
    cases = []
    for key, f, _ in constrained_keys():
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            cases.append((key, 7 if isinstance(choices[0], int) else "no_such_choice"))
        if "range" in f.metadata:
            bounds: Range = f.metadata["range"]
            if bounds.ge is not None:
                cases.append((key, bounds.ge - 1))
            if bounds.gt is not None:
                cases.append((key, bounds.gt))
            if bounds.le is not None:
                cases.append((key, bounds.le + 1))
            if bounds.lt is not None:
                cases.append((key, bounds.lt))
    return cases


BAD_VALUES = bad_values()


def test_every_kind_of_key_is_covered():
    keys = {key for key, _ in BAD_VALUES}
    for expected in ("algorithm.loss", "algorithm.advantage", "algorithm.loss_agg_mode",
                     "algorithm.kl_type", "rollout.weight_sync", "ray.placement_strategy",
                     "data.synthetic.kind", "data.chat_template", "learner.zero_stage",
                     "learner.lr_scheduler", "trainer.total_steps", "rollout.temperature",
                     "rollout.top_p", "algorithm.lp_reg_min_p", "algorithm.lp_reg_neg_frac",
                     "learner.lr", "rollout.timeout_s", "rollout.num_workers", "learner.num_workers",
                     "verifier.timeout_s", "learner.max_tokens_per_micro_batch",
                     "algorithm.lp_reg_threshold_scope"):
        assert expected in keys, expected
    assert len(BAD_VALUES) > 80


def run_train(tmp_path, capsys, *overrides: str) -> tuple[int, list[str]]:
    out = tmp_path / "runs"
    code = main(["train", f"trainer.output_dir={out}", "trainer.run_name=r", *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not out.exists(), "a run directory was written before the setting was refused"
    return code, lines


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_exits_2_naming_the_key(tmp_path, capsys, key, value):
    code, lines = run_train(tmp_path, capsys, f"{key}={value}")
    assert code == 2
    assert 1 <= len(lines) <= 3, lines
    assert f"'{key}'" in lines[-1], lines


@pytest.mark.parametrize("override, allowed", [
    ("algorithm.loss=foo", "ppo_clip, lp_reg, gspo"),
    ("algorithm.advantage=bar", "grpo, drgrpo, rloo, reinforce_pp"),
    ("rollout.temperature=-1", "> 0"),
    ("trainer.total_steps=-3", ">= 1"),
    ("rollout.top_p=0", "> 0 and <= 1"),
    ("algorithm.lp_reg_min_p=1", "> 0 and < 1"),
])
def test_message_says_what_is_allowed(tmp_path, capsys, override, allowed):
    code, lines = run_train(tmp_path, capsys, override)
    assert code == 2 and allowed in lines[-1], lines


@pytest.mark.parametrize("overrides, key", [
    (["data.synthetic.min_operand=50", "data.synthetic.max_operand=10"], "data.synthetic.min_operand"),
    (["algorithm.clip_cov_lb=5", "algorithm.clip_cov_ub=1"], "algorithm.clip_cov_lb"),
    (["learner.betas=[0.9]"], "learner.betas"),
    (["learner.betas=[0.9,1.0]"], "learner.betas"),
    (["verifier.reward_fn=not a function"], "verifier.reward_fn"),
    (["verifier.boxed_commands=[]", "verifier.answer_line_fallback=false"], "verifier.boxed_commands"),
    (["trainer.run_name=a/b"], "trainer.run_name"),
    (["rollout.cpus_per_worker=0"], "rollout.cpus_per_worker"),
])
def test_inconsistent_combinations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=overrides)


def test_defaults_and_every_shipped_recipe_pass():
    from conf.load import RECIPE_DIR

    load_config()
    for recipe in sorted(RECIPE_DIR.glob("*.yaml")):
        load_config(str(recipe))


def test_choice_lists_equal_the_implementations():
    # conf names the choices without importing the code that implements them.
    from conf.schema import LP_REG_THRESHOLD_SCOPES, ROLLOUT_CORRECTIONS, STALE_POLICIES
    from launch.data.synthetic import SYNTHETIC_TASKS
    from launch.training.weight_sync import TRANSPORTS
    from learner import ADVANTAGE_ESTIMATORS as estimators
    from learner import AGG_MODES
    from learner import KL_TYPES as kl_types
    from learner import LP_REG_THRESHOLD_SCOPES as threshold_scopes
    from learner import POLICY_LOSSES as losses
    from learner.rollout_correction import ROLLOUT_CORRECTIONS as corrections
    from learner.schedule import LR_SCHEDULERS as schedulers
    from learner.step import STALE_POLICIES as stale_policies

    assert set(POLICY_LOSSES) == set(losses)
    assert set(ADVANTAGE_ESTIMATORS) == set(estimators)
    assert set(LOSS_AGG_MODES) == set(AGG_MODES)
    assert set(KL_TYPES) == set(kl_types)
    assert set(SYNTHETIC_KINDS) == set(SYNTHETIC_TASKS)
    assert set(WEIGHT_SYNC_TRANSPORTS) == {"auto", *WEIGHT_SYNC_ALIASES, *TRANSPORTS}
    assert set(WEIGHT_SYNC_ALIASES.values()) <= set(TRANSPORTS)
    assert set(LR_SCHEDULERS) == set(schedulers)
    assert set(ROLLOUT_CORRECTIONS) == set(corrections)
    assert set(STALE_POLICIES) == {"auto", *stale_policies}
    assert set(LP_REG_THRESHOLD_SCOPES) == set(threshold_scopes)


def test_a_new_user_gets_the_refusal_at_once_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "algorithm.loss=foo",
                           f"trainer.output_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lpreg: error: config key 'algorithm.loss' must be one of ppo_clip, lp_reg, gspo, kl_cov, "
        "clip_cov, entropy_8020; got 'foo'"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, policy, top_k", [
    ([], "learner", 0),
    (["rollout.max_staleness=1"], "behaviour", 20),
    (["rollout.max_staleness=1", "algorithm.loss=ppo_clip"], "behaviour", 0),
    (["rollout.max_staleness=1", "algorithm.stale_policy=learner"], "learner", 0),
    (["algorithm.stale_policy=behaviour", "rollout.top_logprobs=50"], "behaviour", 50),
])
def test_automatic_choices_are_made_for_the_actors(overrides, policy, top_k):
    from conf.validate import resolve_auto

    resolved = resolve_auto(load_config(overrides=overrides))
    assert resolved.algorithm.stale_policy == policy
    assert resolved.rollout.top_logprobs == top_k


def test_the_behaviour_proxy_needs_top_logprobs():
    with pytest.raises(ConfigError, match="'rollout.top_logprobs' is 0"):
        load_config(overrides=["rollout.max_staleness=1", "rollout.top_logprobs=0"])
