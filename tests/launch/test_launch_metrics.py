"""Metric loggers: metrics.jsonl always, TensorBoard and Weights & Biases as trainer.loggers
says; W&B offline writes under the run directory and a resumed run keeps its W&B run."""

from __future__ import annotations

import json
import socket

import pytest

from conf.load import ConfigError, load_config, to_yaml
from conf.schema import METRICS_LOGGERS
from launch.reporting import metrics as metrics_module
from launch.reporting.metrics import (
    LOGGERS,
    WANDB_RUN_ID_FILE,
    JsonlLogger,
    MetricsWriter,
    TensorBoardLogger,
    read_metrics,
)

LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost", "0.0.0.0"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with its own directories, and any connection off this machine
    refused from Python, so a test that reaches for the network fails instead."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        path = tmp_path / "wandb-home" / name.lower()
        path.mkdir(parents=True)
        monkeypatch.setenv(name, str(path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)

    original_connect = socket.socket.connect

    def local_only(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL_HOSTS:
            raise AssertionError(f"a network connection was attempted: {address}")
        return original_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    yield


def config(tmp_path, *overrides: str):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path / 'runs'}", "trainer.run_name=r",
                                 *overrides])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir


def test_logger_names_match_the_config_choices():
    assert set(METRICS_LOGGERS) == set(LOGGERS)


def test_default_is_jsonl_and_tensorboard(tmp_path):
    cfg, run_dir = config(tmp_path)
    assert cfg.trainer.loggers == ["jsonl", "tensorboard"]
    writer = MetricsWriter(run_dir, cfg)
    writer.write(1, {"reward/mean": 0.5, "rollout/requests_per_worker": [1, 2]})
    writer.close()
    assert read_metrics(run_dir) == [{"step": 1, "reward/mean": 0.5,
                                      "rollout/requests_per_worker": [1, 2]}]
    assert any((run_dir / "tensorboard").iterdir())


def test_jsonl_is_always_on(tmp_path):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[]")
    writer = MetricsWriter(run_dir, cfg)
    assert [type(logger) for logger in writer.loggers] == [JsonlLogger]
    writer.write(3, {"x": 1.0})
    writer.close()
    assert read_metrics(run_dir) == [{"step": 3, "x": 1.0}]
    assert not (run_dir / "tensorboard").exists()


def test_without_a_config_the_run_directorys_config_decides(tmp_path):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[jsonl]")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    writer = MetricsWriter(run_dir)
    assert [type(logger) for logger in writer.loggers] == [JsonlLogger]
    writer.close()
    bare = tmp_path / "bare"
    bare.mkdir()
    writer = MetricsWriter(bare)
    assert [type(logger) for logger in writer.loggers] == [JsonlLogger, TensorBoardLogger]
    writer.close()


@pytest.mark.parametrize("loggers", ["[jsonl,mlflow]", "[console]"])
def test_unknown_logger_is_refused_naming_the_key(loggers):
    with pytest.raises(ConfigError, match=r"'trainer.loggers' takes entries from jsonl, "
                                          r"tensorboard, wandb; got '(mlflow|console)'"):
        load_config(overrides=[f"trainer.loggers={loggers}"])


def test_wandb_offline_writes_under_the_run_directory(tmp_path, offline_wandb):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[jsonl,wandb]", "trainer.project=lp",
                          "trainer.experiment=exp-1")
    writer = MetricsWriter(run_dir, cfg)
    run = writer.loggers[-1].run
    assert (run.project, run.name) == ("lp", "exp-1")
    assert run.config["trainer"]["run_name"] == "r"
    writer.write(1, {"reward/mean": 0.25, "weights/rollout_checksums": ["a"]})
    writer.close()

    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1 and (offline_runs[0] / f"run-{run_id}.wandb").is_file()
    assert read_metrics(run_dir)[0]["reward/mean"] == 0.25
    assert not list((tmp_path / "wandb-home" / "wandb_dir").glob("*run-*"))


def test_experiment_defaults_to_the_run_name(tmp_path, offline_wandb):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[wandb]")
    writer = MetricsWriter(run_dir, cfg)
    assert writer.loggers[-1].run.name == "r"
    writer.close()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[jsonl,wandb]")
    first = MetricsWriter(run_dir, cfg)
    first_id = first.loggers[-1].run.id
    first.write(1, {"x": 1.0})
    first.close()

    resumed_cfg, _ = config(tmp_path, "trainer.loggers=[jsonl,wandb]", "trainer.resume=auto")
    resumed = MetricsWriter(run_dir, resumed_cfg)
    assert resumed.loggers[-1].run.id == first_id
    resumed.write(2, {"x": 2.0})
    resumed.close()
    assert (run_dir / WANDB_RUN_ID_FILE).read_text() == first_id

    # A fresh run in the same directory (trainer.resume=never) is a new W&B run.
    fresh = MetricsWriter(run_dir, cfg)
    assert fresh.loggers[-1].run.id != first_id
    fresh.close()
    assert (run_dir / WANDB_RUN_ID_FILE).read_text() != first_id


def test_a_logger_that_fails_to_start_leaves_nothing_open(tmp_path, monkeypatch):
    cfg, run_dir = config(tmp_path, "trainer.loggers=[jsonl,wandb]")
    closed = []
    monkeypatch.setattr(JsonlLogger, "close", lambda self: closed.append("jsonl"))

    def no_wandb(*args, **kwargs):
        raise RuntimeError("no wandb here")

    monkeypatch.setattr(metrics_module, "_wandb_logger", no_wandb)
    with pytest.raises(RuntimeError, match="no wandb here"):
        MetricsWriter(run_dir, cfg)
    assert closed == ["jsonl"]


def test_records_are_plain_json(tmp_path):
    import torch

    cfg, run_dir = config(tmp_path, "trainer.loggers=[jsonl]")
    writer = MetricsWriter(run_dir, cfg)
    writer.write(1, {"actor/entropy": torch.tensor(0.5)})
    writer.close()
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {"step": 1, "actor/entropy": 0.5}
