"""The configuration reference: every key has a meaning, and docs/configuration.md is what
the schema generates."""

import dataclasses

from omegaconf import OmegaConf

from conf.reference import REFERENCE_PATH, REGENERATE, missing_meanings, render, sections
from conf.schema import LpregConfig, doc


def leaf_keys(node, prefix=""):
    keys = []
    for key in node.keys():
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and OmegaConf.get_type(child) not in (dict, None):
            keys += leaf_keys(child, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_key_and_section_says_what_it_means():
    assert missing_meanings() == [], (
        "give these a meaning in conf/schema.py (within/one_of(..., doc=...), or doc(default, "
        "meaning)), or a docstring for a section")


def test_the_reference_lists_every_key_of_the_loaded_config_once():
    documented = [k.key for s in sections() for k in s.keys]
    assert sorted(documented) == sorted(leaf_keys(OmegaConf.structured(LpregConfig)))
    assert len(documented) == len(set(documented))
    assert "data.synthetic.kind" in documented and "model.tiny.num_layers" in documented


def test_committed_reference_is_what_the_schema_generates():
    committed = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.is_file() else ""
    assert committed == render(), (
        f"{REFERENCE_PATH} differs from what conf/schema.py generates; run `{REGENERATE}` "
        "and commit the page")


def test_rows_show_the_schema_defaults_choices_and_ranges():
    page = render()
    assert "| `rollout.top_logprobs` | int | `20` | >= 0 |" in page
    assert "| `algorithm.stale_policy` | str | `auto` | `auto`, `learner`, `behaviour` |" in page
    assert "| `learner.betas` | list[float] | `[0.9, 0.999]` |" in page
    assert "| `algorithm.loss_scale_factor` | float or null | `null` | > 0 |" in page
    assert "## data.synthetic\n" in page and "## model.tiny\n" in page
    assert f"`{REGENERATE}`" in page.split("## model")[0]


def test_doc_gives_each_config_its_own_list():
    @dataclasses.dataclass
    class Example:
        items: list[str] = doc(["a"], "some items")

    first, second = Example(), Example()
    first.items.append("b")
    assert second.items == ["a"]
    assert dataclasses.fields(Example)[0].metadata["doc"] == "some items"
