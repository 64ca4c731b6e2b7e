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

from conf.load import RECIPE_DIR, load_config
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
