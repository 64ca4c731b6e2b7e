import subprocess
import sys

import pytest

from conf.load import ConfigError, load_config


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.path is None
    assert cfg.ray.address is None


def test_dotted_overrides_apply_with_types():
    cfg = load_config(overrides=["trainer.total_steps=7", "rollout.temperature=0.5",
                                 "learner.betas=[0.8,0.9]", "model.path=/x"])
    assert cfg.trainer.total_steps == 7
    assert cfg.rollout.temperature == 0.5
    assert cfg.learner.betas == [0.8, 0.9]
    assert cfg.model.path == "/x"


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.num_worker'.*'rollout.num_workers'"):
        load_config(overrides=["rollout.num_worker=2"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="trainer.total_steps"):
        load_config(overrides=["trainer.total_steps=many"])


def test_indivisible_batch_names_the_key():
    with pytest.raises(ConfigError, match="algorithm.mini_batches_per_step"):
        load_config(overrides=["data.prompts_per_step=3", "algorithm.mini_batches_per_step=2"])


def test_group_advantage_needs_two_samples():
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt"):
        load_config(overrides=["rollout.samples_per_prompt=1", "learner.num_workers=1"])


def test_cli_exits_2_with_one_line_naming_the_key():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "trainer.total_stepz=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.total_stepz" in proc.stderr
    assert "trainer.total_steps" in proc.stderr


def test_print_config_shows_the_resolved_value():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--print-config",
                           "trainer.run_name=xyz"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run_name: xyz" in proc.stdout


def test_bad_placement_strategy_is_caught_when_the_config_loads():
    with pytest.raises(ConfigError, match="ray.placement_strategy"):
        load_config(overrides=["ray.placement_strategy=EVERYWHERE"])


@pytest.mark.parametrize("override, key", [
    ("model.tiny.warm_start_target_accuracy=1.5", "model.tiny.warm_start_target_accuracy"),
    ("model.tiny.warm_start_warmup_steps=-1", "model.tiny.warm_start_warmup_steps"),
    ("model.tiny.warm_start_probe_problems=0", "model.tiny.warm_start_probe_problems"),
])
def test_bad_warm_start_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_no_warm_start_still_needs_valid_settings():
    # A key is judged on its own, whatever other keys say: a recipe that turns the warm
    # start off and on again must not find a nonsense value waiting for it.
    assert load_config(None, ["model.tiny.warm_start_steps=0"]).model.tiny.warm_start_steps == 0
    with pytest.raises(ConfigError, match=r"model\.tiny\.warm_start_lr"):
        load_config(None, ["model.tiny.warm_start_steps=0", "model.tiny.warm_start_lr=0"])
