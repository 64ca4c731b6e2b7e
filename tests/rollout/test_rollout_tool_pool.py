"""The tool pool: calls run beside the caller, tools by name, plugins from the config."""

from __future__ import annotations

import shutil
import time

import pytest

from conf.errors import ConfigError
from conf.schema import ToolConfig
from rollout.tools import ToolPool, ToolStatus


def config(tmp_base, **overrides) -> ToolConfig:
    settings = dict(timeout_s=3.0, cpu_time_s=2, memory_mb=256, max_processes=16, max_file_mb=4,
                    max_output_chars=200, max_concurrency=2, tmp_dir=tmp_base)
    return ToolConfig(**(settings | overrides))


def shout(code: str) -> str:
    return code.upper()


def broken(code: str) -> str:
    raise RuntimeError("plugin bug")


@pytest.fixture(scope="module")
def pool(tmp_base):
    with ToolPool(config(tmp_base, plugins={"caps": "string:capwords"}),
                  extra_tools={"shout": shout, "broken": broken}) as tools:
        yield tools


def test_submit_returns_at_once_and_the_result_comes_later(pool):
    start = time.monotonic()
    future = pool.submit("import time\ntime.sleep(0.5)\nprint('late')\n")
    assert time.monotonic() - start < 0.2 and not future.done()
    result = future.result(timeout=10)
    assert result.status is ToolStatus.OK and result.observation == "late\n"


@pytest.mark.parametrize("mode", ["rlimits", "bwrap"])
def test_a_fork_bomb_in_one_slot_leaves_the_other_slot_working(tmp_base, mode):
    if mode == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (make install installs it)")
    try:
        tools = ToolPool(config(tmp_base, sandbox=mode))
    except ConfigError as err:
        if "bwrap does not run here" not in str(err):
            raise
        pytest.skip(str(err))
    # Each slot has a user of its own, so the bomb exhausts only its own process limit.
    with tools:
        bomb = tools.submit("import os\nwhile True:\n    try:\n        os.fork()\n"
                            "    except OSError:\n        pass\n")
        time.sleep(0.3)
        start = time.monotonic()
        assert tools.run("print('fine')").observation == "fine\n"
        assert time.monotonic() - start < 2.5
        assert bomb.result(timeout=10).status in (ToolStatus.TIMEOUT, ToolStatus.KILLED)


def test_tools_by_name_plugins_and_their_failures(pool):
    assert pool.run("hello tool world", "caps").observation == "Hello Tool World"
    assert pool.run("abc", "shout").observation == "ABC"
    result = pool.run("x", "broken")
    assert result.status is ToolStatus.FAILED
    assert result.observation == "[tool error: RuntimeError: plugin bug]"
    result = pool.run("x", "search")
    assert result.status is ToolStatus.FAILED
    assert result.observation == ("[tool error: no tool named 'search'; the tools are broken, "
                                  "caps, python, shout]")


def test_a_plugins_long_answer_is_cut_like_a_programs(pool):
    result = pool.run("y" * 1000, "shout")
    assert result.truncated and result.observation.startswith("Y" * 100)
    assert "800 characters omitted" in result.observation


def test_a_plugin_that_cannot_be_loaded_is_a_config_error(tmp_base):
    with pytest.raises(ConfigError, match="tool.plugins.calc"):
        ToolPool(config(tmp_base, sandbox="rlimits", plugins={"calc": "no_such_module:run"}))


def test_shutdown_kills_what_runs_and_drops_what_waits(tmp_base):
    tools = ToolPool(config(tmp_base, sandbox="rlimits", timeout_s=60.0, max_concurrency=1))
    running = tools.submit("import time\ntime.sleep(60)\n")
    waiting = tools.submit("print('never')")
    time.sleep(0.5)
    start = time.monotonic()
    tools.shutdown()
    assert time.monotonic() - start < 5
    assert running.result().status is ToolStatus.KILLED
    assert waiting.cancelled()
    assert tools.sandbox.run("print(1)").status is ToolStatus.FAILED
