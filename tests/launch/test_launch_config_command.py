"""``lpreg config``: the resolved config as YAML, and the reference page from the schema."""

from conf.reference import render
from launch.cli.main import main


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "trainer.run_name=xyz", "rollout.max_staleness=1"]) == 0
    out = capsys.readouterr().out
    assert "run_name: xyz" in out
    assert "stale_policy: auto" in out


def test_resolve_auto_shows_the_choices_a_run_makes(capsys):
    assert main(["config", "--resolve-auto", "rollout.max_staleness=1"]) == 0
    out = capsys.readouterr().out
    assert "stale_policy: behaviour" in out
    assert "weight_sync: object_store" in out


def test_bad_override_exits_2(capsys):
    assert main(["config", "rollout.temperature=-1"]) == 2
    assert "rollout.temperature" in capsys.readouterr().err


def test_reference_writes_the_page_and_check_finds_it_stale(tmp_path, capsys):
    page = tmp_path / "docs" / "configuration.md"
    assert main(["config", "--reference", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == render()
    assert main(["config", "--reference", str(page), "--check"]) == 0
    page.write_text("old\n", encoding="utf-8")
    assert main(["config", "--reference", str(page), "--check"]) == 1
    assert "lpreg config --reference" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == "old\n"


def test_reference_takes_no_overrides(tmp_path, capsys):
    assert main(["config", "--reference", str(tmp_path / "x.md"), "trainer.seed=1"]) == 2
    assert not (tmp_path / "x.md").exists()
