"""Checkpoint directories: atomic writes, discovery that never picks a partial one, pruning."""

import json
import logging
import random

import pytest
import torch

from conf.load import ConfigError, load_config
from conf.schema import LpregConfig
from launch.training import checkpoint


class FakeLearners:
    """Writes what the learner ranks would, so the driver-side logic runs on its own."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, directory):
        (checkpoint.Path(directory) / "deepspeed" / "state").mkdir(parents=True)
        (checkpoint.Path(directory) / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
         ).write_bytes(b"x" * 1000)
        (checkpoint.Path(directory) / "hf").mkdir()
        (checkpoint.Path(directory) / "hf" / "model.safetensors").write_bytes(b"y" * 500)

    def load_checkpoint(self, directory):
        self.loaded.append(directory)


class FakeSampler:
    def __init__(self):
        self.state = None

    def load_state(self, state):
        self.state = state


def state(step):
    return checkpoint.TrainerState(step=step, weight_version=step, sampler={"epoch": 0, "position": 4 * step},
                                   num_prompts=100, learner_world_size=2, zero_stage=2, seed=0)


def write(root, step, keep_last=0):
    return checkpoint.save(root, state(step), FakeLearners(), keep_last=keep_last)


def test_newest_complete_checkpoint_is_found(tmp_path):
    for step in (2, 10, 4):
        write(tmp_path, step)
    assert checkpoint.find_latest(tmp_path) == tmp_path / "step_10"
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 4, 10]
    manifest = json.loads((tmp_path / "step_10" / checkpoint.MARKER).read_text())
    assert manifest["files"]["hf/model.safetensors"] == 500


def test_checkpoint_truncated_mid_write_is_ignored_with_a_warning(tmp_path, caplog):
    write(tmp_path, 2)
    newest = write(tmp_path, 4)
    blob = newest / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    blob.write_bytes(blob.read_bytes()[:300])  # cut short, as by a full disk or a broken copy
    with caplog.at_level(logging.WARNING, logger="lpreg"):
        assert checkpoint.find_latest(tmp_path) == tmp_path / "step_2"
    assert "step_4" in caplog.text and "300 bytes" in caplog.text


def test_unfinished_writes_are_never_picked(tmp_path, caplog):
    write(tmp_path, 2)
    write(tmp_path, 10)
    # A marker that is itself cut short.
    (tmp_path / "step_10" / checkpoint.MARKER).write_text('{"files": {"trainer_sta')
    # A crash before the rename leaves the temporary directory, even with its files.
    tmp = checkpoint.begin(tmp_path, 6)
    FakeLearners().save_checkpoint(str(tmp))
    (tmp / checkpoint.STATE_FILE).write_text(state(6).to_json())
    # A directory with the final name but no marker (copied by hand, half done).
    (tmp_path / "step_8").mkdir()
    (tmp_path / "step_8" / checkpoint.STATE_FILE).write_text(state(8).to_json())
    with caplog.at_level(logging.WARNING, logger="lpreg"):
        assert checkpoint.find_latest(tmp_path) == tmp_path / "step_2"
    for name in ("step_6.tmp", "step_8", "step_10"):
        assert name in caplog.text


def test_missing_file_is_detected(tmp_path):
    path = write(tmp_path, 2)
    (path / "hf" / "model.safetensors").unlink()
    assert "missing" in checkpoint.incomplete_reason(path)


def test_keep_last_prunes_old_checkpoints_and_leftover_temporaries(tmp_path):
    checkpoint.begin(tmp_path, 1)  # an interrupted write from before
    for step in (2, 4, 6):
        write(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6"]
    write(tmp_path, 8, keep_last=0)  # 0 keeps everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6", "step_8"]


def test_rewriting_a_step_replaces_it(tmp_path):
    write(tmp_path, 4)
    newer = checkpoint.TrainerState(**{**vars(state(4)), "weight_version": 99})
    checkpoint.save(tmp_path, newer, FakeLearners(), keep_last=0)
    assert checkpoint.read_state(tmp_path / "step_4").weight_version == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]


def test_resume_modes(tmp_path):
    run_dir = tmp_path / "run"
    root = checkpoint.checkpoint_root(run_dir)
    assert checkpoint.resolve_resume("never", run_dir) is None
    assert checkpoint.resolve_resume("auto", run_dir) is None  # nothing yet: a fresh start
    write(root, 2)
    write(root, 4)
    assert checkpoint.resolve_resume("never", run_dir) is None
    assert checkpoint.resolve_resume("auto", run_dir) == root / "step_4"
    assert checkpoint.resolve_resume(str(root / "step_2"), run_dir) == root / "step_2"
    assert checkpoint.resolve_resume(str(root), run_dir) == root / "step_4"
    with pytest.raises(ConfigError, match="trainer.resume"):
        checkpoint.resolve_resume(str(tmp_path / "nowhere"), run_dir)
    (root / "step_2" / checkpoint.MARKER).unlink()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(root / "step_2"), run_dir)


def test_fresh_run_over_earlier_checkpoints_is_refused(tmp_path, caplog):
    cfg = LpregConfig()
    cfg.trainer.output_dir, cfg.trainer.run_name, cfg.trainer.save_every = str(tmp_path), "r", 2
    assert checkpoint.plan(cfg) == (None, tmp_path / "r" / "checkpoints")
    write(tmp_path / "r" / "checkpoints", 2)
    with pytest.raises(ConfigError, match="trainer.resume=auto"):
        checkpoint.plan(cfg)
    cfg.trainer.resume = "auto"
    assert checkpoint.plan(cfg)[0] == tmp_path / "r" / "checkpoints" / "step_2"
    write(tmp_path / "r" / "checkpoints", 4)
    cfg.trainer.resume = str(tmp_path / "r" / "checkpoints" / "step_2")
    with caplog.at_level(logging.WARNING, logger="lpreg"):
        assert checkpoint.plan(cfg)[0].name == "step_2"
    assert "later checkpoints" in caplog.text and "step_4" in caplog.text
    with pytest.raises(ConfigError, match="trainer.save_every"):
        load_config(overrides=["trainer.save_every=-1"])


def test_layout_changes_that_zero_cannot_follow_are_refused(tmp_path):
    saved = state(2)  # ZeRO-2 over 2 ranks
    with pytest.raises(ConfigError, match="learner.num_workers"):
        checkpoint.check_compatible(saved, world_size=4, zero_stage=2, num_prompts=100, where=tmp_path)
    with pytest.raises(ConfigError, match="learner.zero_stage"):
        checkpoint.check_compatible(saved, world_size=2, zero_stage=3, num_prompts=100, where=tmp_path)
    checkpoint.check_compatible(saved, world_size=2, zero_stage=2, num_prompts=100, where=tmp_path)


def test_restore_hands_back_state_sampler_position_and_rng(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    path = write(tmp_path, 6)
    expected = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    learners, sampler = FakeLearners(), FakeSampler()
    restored = checkpoint.restore(path, learners, sampler)
    assert restored == state(6)
    assert learners.loaded == [str(path)]
    assert sampler.state == {"epoch": 0, "position": 24}
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])


def test_save_schedule():
    assert [s for s in range(1, 8) if checkpoint.due(s, 3, 7)] == [3, 6, 7]
    assert not any(checkpoint.due(s, 0, 7) for s in range(1, 8))
