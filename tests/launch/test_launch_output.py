"""Where an actor's output goes, and which warnings are silenced at their source
(launch.reporting.output). Real processes; no Ray here (test_integration_output runs the
demo with it)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from launch.cli.main import main
from launch.reporting import output

# A process that writes in every way an actor's libraries do: Python's streams, the raw
# file descriptors (C and C++ code), and a child process of its own.
WRITER = r'''
import os, subprocess, sys
from pathlib import Path
from launch.reporting.output import redirect_output
redirect_output(Path(sys.argv[1]), echo=sys.argv[2] == "echo")
print("python stdout")
print("python stderr", file=sys.stderr)
os.write(1, b"fd 1\n")
os.write(2, b"fd 2\n")
subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
'''
LINES = ["python stdout", "python stderr", "fd 1", "fd 2", "child process"]


def run_writer(tmp_path: Path, echo: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "logs" / "rollout-0.log"
    proc = subprocess.run([sys.executable, "-c", WRITER, str(log), "echo" if echo else "quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc, log.read_text().splitlines()


def test_everything_an_actor_writes_goes_to_its_log_file_only(tmp_path):
    proc, lines = run_writer(tmp_path, echo=False)
    assert proc.stdout == proc.stderr == ""
    assert lines[0].startswith("==== rollout-0: pid ")
    assert sorted(lines[1:]) == sorted(LINES)


def test_verbose_also_leaves_it_where_it_went(tmp_path):
    proc, lines = run_writer(tmp_path, echo=True)
    # tee copies it after the writer exits: wait for the file to hold every line.
    assert sorted(lines[1:]) == sorted(LINES)
    assert set(proc.stdout.splitlines()) == {"python stdout", "fd 1", "child process"}
    assert set(proc.stderr.splitlines()) == {"python stderr", "fd 2"}


def test_a_restarted_actor_appends_under_a_header_of_its_own(tmp_path):
    run_writer(tmp_path, echo=False)
    _, lines = run_writer(tmp_path, echo=False)
    assert sum(line.startswith("==== rollout-0: pid ") for line in lines) == 2
    assert len(lines) == 2 * (1 + len(LINES))


def test_known_harmless_warnings_are_silenced_at_their_loggers(caplog):
    output.silence_known_harmless()
    output.silence_known_harmless()  # idempotent
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    with caplog.at_level(logging.WARNING):
        reload_log.warning("%s: Failed to load weights", "RotaryEmbedding")
        # The same warning about a layer that has weights is news.
        reload_log.warning("%s: Failed to load weights", "QKVParallelLinear")
        logging.getLogger("vllm.platforms.cpu").warning(
            "Triton is not installed. triton-cpu is expected on x86 CPUs.")
        logging.getLogger("vllm.platforms.cpu").warning("something else")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU")
    assert [r.getMessage() for r in caplog.records] == [
        "QKVParallelLinear: Failed to load weights", "something else"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output.silence_known_harmless()
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use", FutureWarning,
                      stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]


def test_every_known_harmless_entry_names_a_logger_and_a_template():
    for name, start, arg in output.KNOWN_HARMLESS:
        assert name and start and (arg is None or isinstance(arg, str))


def test_the_runtime_env_runs_the_hook_in_every_actor(tmp_path):
    quiet = output.ray_runtime_env(tmp_path / "logs", verbose=False)
    assert quiet["worker_process_setup_hook"] == "launch.reporting.output.actor_process_setup"
    assert quiet["env_vars"][output.LOG_DIR_ENV] == str((tmp_path / "logs").resolve())
    assert quiet["env_vars"]["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert quiet["env_vars"][output.VERBOSE_ENV] == "0"
    loud = output.ray_runtime_env(tmp_path / "logs", verbose=True)
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in loud["env_vars"]
    assert loud["env_vars"][output.VERBOSE_ENV] == "1"
    assert output.LOG_DIR_ENV not in output.ray_runtime_env(None, verbose=True)["env_vars"]


def test_the_hook_never_stops_a_worker(tmp_path, monkeypatch, capsys):
    # A file where the logs directory should be: the output stays with Ray, and says why.
    (tmp_path / "logs").write_text("")
    monkeypatch.setenv(output.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setenv(output.ACTOR_NAME_ENV, "learner-0")
    monkeypatch.setenv(output.VERBOSE_ENV, "0")
    output.actor_process_setup()
    assert "actor output stays in Ray's worker log" in capsys.readouterr().err


def test_verbose_reaches_a_supervised_driver(monkeypatch):
    import launch.training.supervise as supervise_module

    calls = []
    monkeypatch.setattr(supervise_module, "supervise", lambda command, retries: calls.append(command) or 0)
    assert main(["train", "-v", "--retries", "1", "trainer.save_every=1"]) == 0
    assert calls[0][3:] == ["train", "--verbose", "trainer.save_every=1"]


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_train_takes_the_verbose_flag(flag, capsys):
    assert main(["train", flag, "--print-config"]) == 0
    assert "run_name: demo" in capsys.readouterr().out
