"""The demo's terminal holds lpreg's own lines only; every actor's output is in the run
directory (docs/output.md).

``lpreg train`` as ``make demo`` runs it (the shipped defaults, the tiny model from the
project's model cache, built there on a fresh clone), for 2 steps. vLLM runs at its INFO
level here, so the engines have plenty to say, all of which must land in the rollout
workers' log files and none of it on the terminal.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# lpreg's log lines ("12:04:31 lpreg step 1/2 ..."; its own modules log under their
# names), and what `lpreg train` prints when the run ends.
LPREG_LINE = re.compile(r"^\d\d:\d\d:\d\d (lpreg|launch|verifier|rollout|learner|conf)(\.\w+)* \S"
                        r"|^run finished: |^held-out accuracy: ")
# vLLM's own log lines: "(MainProcess pid=123) INFO 11-30 05:22:02 [llm.py:123] ...".
VLLM_LINE = re.compile(r"\b(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+\.py:\d+\] ")


def lpreg_command() -> list[str]:
    script = Path(sys.executable).parent / "lpreg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "launch.cli"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([*lpreg_command(), "train", "trainer.total_steps=2",
                           f"trainer.output_dir={out}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout.splitlines(), out / "demo"


def test_the_terminal_shows_lpreg_lines_only(demo):
    lines, _ = demo
    foreign = [line for line in lines if not LPREG_LINE.match(line)]
    assert not foreign, "not lpreg's:\n" + "\n".join(foreign)
    assert any(" lpreg step 2/2 " in line for line in lines)
    assert any(line.startswith("run finished: 2 steps") for line in lines)


def test_every_actor_has_its_log_in_the_run_directory(demo):
    _, run_dir = demo
    actors = json.loads((run_dir / "actors.json").read_text())
    names = {a["name"]: a["pid"] for kind in ("rollout", "learner") for a in actors[kind]}
    assert set(names) == {"rollout-0", "rollout-1", "learner-0", "learner-1"}
    for name, pid in names.items():
        first = (run_dir / "logs" / f"{name}.log").read_text().splitlines()[0]
        assert first.startswith(f"==== {name}: pid {pid} on "), first


def test_the_rollout_logs_hold_the_engines_output(demo):
    _, run_dir = demo
    for name in ("rollout-0", "rollout-1"):
        text = (run_dir / "logs" / f"{name}.log").read_text()
        engine = [line for line in text.splitlines() if VLLM_LINE.search(line)]
        assert len(engine) >= 10, text[-3000:]
        # Silenced at its logger: harmless at every weight reload (docs/troubleshooting.md).
        assert "RotaryEmbedding: Failed to load weights" not in text
