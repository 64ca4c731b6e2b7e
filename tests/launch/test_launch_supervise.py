"""A lost training driver runs again from the newest checkpoint (``--retries``).

The "driver" here is a small real program that records how it was called and ends the
way a lost driver does (SIGKILL) or a refused one does (status 2).
"""

from __future__ import annotations

import json
import sys

import pytest

from launch.cli.main import main
from launch.cluster.jobs import train_entrypoint
from launch.training.supervise import RESUME_AUTO, describe_exit, supervise

DRIVER = r'''
import json, os, signal, sys
calls_file, plan = sys.argv[1], sys.argv[2].split(",")
calls = json.load(open(calls_file)) if os.path.exists(calls_file) else []
calls.append(sys.argv[3:])
json.dump(calls, open(calls_file, "w"))
outcome = plan[len(calls) - 1]
if outcome == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(outcome))
'''


def driver(tmp_path, plan: str) -> tuple[list[str], object]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    calls = tmp_path / "calls.json"
    return [sys.executable, str(script), str(calls), plan, "trainer.save_every=5"], calls


def test_a_killed_driver_runs_again_from_the_newest_checkpoint(tmp_path):
    command, calls = driver(tmp_path, "kill,1,0")
    assert supervise(command, retries=3) == 0
    made = json.loads(calls.read_text())
    assert made == [["trainer.save_every=5"], ["trainer.save_every=5", RESUME_AUTO],
                    ["trainer.save_every=5", RESUME_AUTO]]


def test_refused_input_is_not_retried(tmp_path):
    command, calls = driver(tmp_path, "2,0")
    assert supervise(command, retries=3) == 2
    assert len(json.loads(calls.read_text())) == 1


def test_retries_run_out(tmp_path):
    command, calls = driver(tmp_path, "kill,kill,0")
    assert supervise(command, retries=1) == -9
    assert len(json.loads(calls.read_text())) == 2


def test_exit_descriptions():
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"


def test_the_job_entrypoint_carries_the_retries():
    assert train_entrypoint("lp_reg_on_policy", ["trainer.save_every=10"], retries=2) == (
        "python -m launch.cli train --retries 2 -c lp_reg_on_policy trainer.save_every=10")


@pytest.mark.parametrize("args", [["--retries", "2"], ["--retries", "-1", "trainer.save_every=5"]])
def test_retries_need_checkpoints_to_resume_from(tmp_path, capsys, args):
    assert main(["train", *args, f"trainer.output_dir={tmp_path}"]) == 2
    assert "--retries" in capsys.readouterr().err
