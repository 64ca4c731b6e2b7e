"""``lpreg tool exec``: a program from stdin through the tool sandbox, the observation on
stdout exactly as the model would see it, exit status 0 whatever the program did and 2
for a bad setting."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from launch.cli.main import main

FAST = ["tool.timeout_s=2", "tool.cpu_time_s=1", "tool.memory_mb=256"]


def tool_exec(monkeypatch, capsys, program: str, *overrides: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(program))
    code = main(["tool", "exec", *FAST, *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("program, observation", [
    ("print('hello')\n", "hello\n"),
    ("import sys\nsys.exit(3)\n", "[exit code 3]\n"),
    ("import time\nprint('zzz', flush=True)\ntime.sleep(30)\n", "zzz\n[timed out after 2 s]\n"),
    ("", "[no output]\n"),
])
def test_prints_the_observation_and_exits_0(monkeypatch, capsys, program, observation):
    code, out, err = tool_exec(monkeypatch, capsys, program)
    assert code == 0 and out == observation
    assert "lpreg tool exec:" in err


def test_a_traceback_ends_the_observation(monkeypatch, capsys):
    code, out, _ = tool_exec(monkeypatch, capsys, "x = {}\nx['missing']\n", "tool.sandbox=rlimits")
    assert code == 0
    assert out.splitlines()[-2:] == ["KeyError: 'missing'", "[exit code 1]"]


@pytest.mark.parametrize("override, key", [
    ("tool.timeout_s=0", "tool.timeout_s"),
    ("tool.sandbox=vm", "tool.sandbox"),
    ("tool.max_concurrency=0", "tool.max_concurrency"),
    ("tool.no_such_key=1", "tool.no_such_key"),
    ("tool.plugins.python=a.b:c", "tool.plugins.python"),
    ("tool.plugins.calc=not-a-function", "tool.plugins.calc"),
    ("tool.python=/no/such/python", "tool.python"),
    ("tool.name=calc", "tool.name"),
])
def test_a_bad_setting_exits_2_naming_the_key(monkeypatch, capsys, override, key):
    code, out, err = tool_exec(monkeypatch, capsys, "print(1)\n", override)
    assert code == 2 and out == ""
    assert f"'{key}'" in err.strip().splitlines()[-1]


def test_a_plugin_runs_by_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("two words"))
    code = main(["tool", "exec", "--tool", "caps", "tool.plugins.caps=string:capwords"])
    assert (code, capsys.readouterr().out) == (0, "Two Words\n")


def test_tool_name_chooses_the_tool_as_a_rollout_does(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("two words"))
    code = main(["tool", "exec", "tool.name=caps", "tool.plugins.caps=string:capwords"])
    assert (code, capsys.readouterr().out) == (0, "Two Words\n")


def test_from_a_shell_pipe(tmp_path):
    program = tmp_path / "program.py"
    program.write_text("import os\nprint(sum(range(10)))\nprint('LPREG_SECRET' in os.environ)\n")
    with program.open() as stdin:
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "tool", "exec", *FAST],
                              stdin=stdin, capture_output=True, text=True, timeout=60,
                              env=os.environ | {"LPREG_SECRET": "x"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "45\nFalse\n"
