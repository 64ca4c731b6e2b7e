"""Every shipped recipe resolves to the config it had before recipes could extend each other.

tests/conf/resolved_recipes/<name>.yaml is the fully resolved config of each shipped recipe,
written once from the self-contained recipes; a change to how recipes are written (a setting
moved into a base) must leave every value as it was. A key the schema gains later is not in
the fixtures; it must then hold the schema's default in every recipe, so a recipe that sets
it still fails here until its fixture says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conf.load import RECIPE_DIR, ConfigError, load_config
from conf.schema import LpregConfig

FIXTURES = Path(__file__).resolve().parent / "resolved_recipes"
SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _differences(expected, actual, default, key=""):
    """Where ``actual`` departs from ``expected`` (or, for keys ``expected`` lacks, from the
    schema's ``default``), one line per dotted key."""
    if not isinstance(expected, dict):
        return [] if expected == actual else [f"{key}: {expected!r} in the fixture, {actual!r} now"]
    if not isinstance(actual, dict):
        return [f"{key}: a mapping in the fixture, {actual!r} now"]
    default = default if isinstance(default, dict) else {}
    found = []
    for name, value in expected.items():
        full = f"{key}.{name}" if key else name
        if name not in actual:
            found.append(f"{full}: in the fixture, not in the schema")
        else:
            found += _differences(value, actual[name], default.get(name), full)
    for name in sorted(actual.keys() - expected.keys()):
        full = f"{key}.{name}" if key else name
        if actual[name] != default.get(name):
            found.append(f"{full}: not in the fixture, and {actual[name]!r} instead of the "
                         f"schema's default {default.get(name)!r}")
    return found


def _plain(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def test_every_shipped_recipe_has_a_fixture():
    assert SHIPPED == sorted(p.stem for p in FIXTURES.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_resolves_to_its_fixture(name):
    expected = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    found = _differences(expected, _plain(load_config(name)), _plain(LpregConfig()))
    assert not found, f"{name} no longer resolves to {FIXTURES.name}/{name}.yaml:\n" + "\n".join(found)


def test_a_changed_value_fails():
    expected = yaml.safe_load((FIXTURES / "lp_reg_off_policy.yaml").read_text())
    changed = _plain(load_config("lp_reg_off_policy", ["algorithm.mini_batches_per_step=4"]))
    assert _differences(expected, changed, _plain(LpregConfig())) == [
        "algorithm.mini_batches_per_step: 8 in the fixture, 4 now"]


def test_a_key_the_fixture_lacks_must_hold_the_schema_default():
    # What a key added to the schema after the fixtures were written looks like.
    expected = yaml.safe_load((FIXTURES / "grpo_entropy_on_policy.yaml").read_text())
    del expected["algorithm"]["entropy_coef"]
    found = _differences(expected, _plain(load_config("grpo_entropy_on_policy")), _plain(LpregConfig()))
    assert found == ["algorithm.entropy_coef: not in the fixture, and 0.001 instead of the "
                     "schema's default 0.0"]


# --- how recipes extend each other -------------------------------------------------------

def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def test_bases_merge_first_in_order_and_chain(tmp_path):
    _write(tmp_path, "root", "trainer: {total_steps: 7, eval_every: 3}\nalgorithm: {loss: gspo}\n")
    _write(tmp_path, "middle", "extends: root\ntrainer: {total_steps: 9}\n")
    _write(tmp_path, "mixin", "trainer: {eval_every: 5, total_steps: 11}\n")
    recipe = _write(tmp_path, "top", "extends: [middle, mixin]\ntrainer: {run_name: top}\n")
    cfg = load_config(str(recipe))
    # root, then middle over it, then mixin over both, then the recipe itself.
    assert (cfg.algorithm.loss, cfg.trainer.total_steps, cfg.trainer.eval_every,
            cfg.trainer.run_name) == ("gspo", 11, 5, "top")
    # Command-line overrides still come last.
    assert load_config(str(recipe), ["trainer.total_steps=2"]).trainer.total_steps == 2


def test_a_base_shared_by_two_bases_is_merged_once(tmp_path):
    _write(tmp_path, "shared", "trainer: {total_steps: 7, eval_every: 3}\n")
    _write(tmp_path, "first", "extends: shared\ntrainer: {total_steps: 9}\n")
    _write(tmp_path, "second", "extends: shared\ntrainer: {eval_every: 4}\n")
    recipe = _write(tmp_path, "top", "extends: [first, second]\n")
    # Merging shared again before second would put total_steps back to 7.
    assert load_config(str(recipe)).trainer.total_steps == 9


def test_a_user_recipe_extends_a_shipped_one_or_a_file_beside_it(tmp_path):
    (tmp_path / "mine").mkdir()
    _write(tmp_path / "mine", "cluster", "rollout: {num_workers: 2}\nlearner: {num_workers: 2}\n")
    recipe = _write(tmp_path, "run", "extends: [lp_reg_off_policy, mine/cluster.yaml]\n"
                                     "model: {path: /models/qwen3}\n")
    cfg = load_config(str(recipe))
    assert (cfg.algorithm.loss, cfg.algorithm.mini_batches_per_step, cfg.rollout.num_workers,
            cfg.model.path) == ("lp_reg", 8, 2, "/models/qwen3")


def test_a_cycle_is_refused_naming_the_files(tmp_path):
    _write(tmp_path, "a", "extends: b\n")
    _write(tmp_path, "b", "extends: a\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    _write(tmp_path, "self", "extends: self\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "self.yaml"))


@pytest.mark.parametrize(("text", "message"), [
    ("extends: nowhere\n", r"middle\.yaml: base recipe 'nowhere' not found"),
    ("extends: {a: 1}\n", r"middle\.yaml: 'extends' takes a recipe name or path"),
    ("extends: [3]\n", r"middle\.yaml: 'extends' takes a recipe name or path"),
    ("trainer: {total_stepz: 3}\n", r"middle\.yaml: unknown config key 'trainer.total_stepz'"),
    ("trainer: [1\n", r"middle\.yaml: not valid YAML"),
])
def test_a_bad_base_is_named(tmp_path, text, message):
    _write(tmp_path, "middle", text)
    recipe = _write(tmp_path, "top", "extends: middle\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(recipe))


def test_the_command_line_prints_the_resolved_recipe_and_refuses_a_cycle(tmp_path, capsys):
    from launch.cli.main import main

    assert main(["train", "-c", "clip_higher_off_policy", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load((FIXTURES / "clip_higher_off_policy.yaml").read_text())
    assert not _differences(expected, printed, _plain(LpregConfig()))
    assert "extends" not in printed
    _write(tmp_path, "loop", "extends: loop\n")
    assert main(["train", "-c", str(tmp_path / "loop.yaml"), "--print-config"]) == 2
    assert "cycle" in capsys.readouterr().err
