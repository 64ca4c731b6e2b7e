"""The decision-position probe of a comparison's spark runs: which model it reads, and its
record in the run directory. The probe itself runs on real models in the spark compare
integration test."""

from __future__ import annotations

import json
import logging

import pytest

from conf.load import load_config
from launch.experiments import spark_probe
from launch.experiments.spark_probe import PROBE_DEFINITIONS, PROBE_FILE, probe_run


# What probe_model returns for a model: each key, a number that tells the models apart.
def _fake_probe(calls):
    def probe(model_dir, cfg):
        calls.append(model_dir)
        return {key: float(len(calls)) for key in PROBE_DEFINITIONS}
    return probe


def test_other_tasks_are_not_probed(tmp_path):
    cfg = load_config("laptop_grpo", [])
    assert probe_run(tmp_path, cfg, "digest", {}) == {}
    assert not (tmp_path / PROBE_FILE).exists()


@pytest.fixture
def spark_run(tmp_path):
    """A spark run's config, starting from a model directory, and its run directory, which
    has no checkpoint: (config, run directory, start model)."""
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text("{}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return load_config("spark_grpo", [f"model.path={start}"]), run_dir, start


def test_a_run_without_a_checkpoint_has_its_start_only_and_says_why(spark_run, monkeypatch, caplog):
    cfg, run_dir, start = spark_run
    calls = []
    monkeypatch.setattr(spark_probe, "probe_model", _fake_probe(calls))
    with caplog.at_level(logging.WARNING, logger="lpreg.compare"):
        values = probe_run(run_dir, cfg, "d1", {})
    assert calls == [start.resolve()]
    assert all(values[f"{key}@start"] == 1.0 and values[f"{key}@end"] is None for key in PROBE_DEFINITIONS)
    assert "trainer.save_every" in caplog.text
    assert json.loads((run_dir / PROBE_FILE).read_text())["values"] == values


def test_the_record_is_reused_for_the_same_config_only(spark_run, monkeypatch):
    cfg, run_dir, _ = spark_run
    calls = []
    monkeypatch.setattr(spark_probe, "probe_model", _fake_probe(calls))
    shared: dict = {}
    first = probe_run(run_dir, cfg, "d1", shared)
    assert probe_run(run_dir, cfg, "d1", shared) == first and len(calls) == 1
    # Another config: probed again, but its start model only once per comparison.
    probe_run(run_dir, cfg, "d2", shared)
    assert len(calls) == 1
    probe_run(run_dir, cfg, "d3", {})
    assert len(calls) == 2
