"""Tool calls run beside the caller: ``submit`` hands back a future at once.

A rollout worker's engine thread must never wait on a program the model wrote, so calls
run on ``tool.max_concurrency`` threads of the pool's own, each with its own sandbox slot
(and so its own sandbox user). The caller polls or waits on the futures when it suits it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from conf.schema import ToolConfig
from rollout.tools.output import truncate
from rollout.tools.registry import Tool, build_tools
from rollout.tools.sandbox import Sandbox, ToolResult, ToolStatus

TOOL_PAUSE_ENV = "LPREG_TEST_PAUSE_TOOL"


def pause_for_fault_tests() -> None:
    """Where fault tests kill a rollout worker while one of its samples waits between two
    turns for its tool: a window no signal sent from outside could be sure to hit. With
    ``LPREG_TEST_PAUSE_TOOL=<file>``, the first call to start after the test creates
    ``<file>.armed`` creates ``<file>``, holding the process id, and then waits, on the
    pool's thread as a slow tool would, up to ten minutes for the test's SIGKILL. Only the
    call that creates the file pauses: one per run, in whichever worker gets there first,
    never in the killed one's replacement. Unset, it does nothing."""
    marker = os.environ.get(TOOL_PAUSE_ENV)
    if not marker or os.path.exists(marker) or not os.path.exists(f"{marker}.armed"):
        return
    # Written aside and linked into place: the link fails if the file exists, so two
    # calls cannot both pause, and a test never reads a half-written file.
    draft = f"{marker}.{os.getpid()}.{threading.get_ident()}"
    with open(draft, "w") as out:
        out.write(str(os.getpid()))
    try:
        os.link(draft, marker)
    except FileExistsError:
        return
    finally:
        os.unlink(draft)
    time.sleep(600)


def call_tool(tool: Tool, code: str, max_chars: int) -> ToolResult:
    """One call of ``tool``; whatever goes wrong in it becomes an observation, never an
    exception in the caller."""
    pause_for_fault_tests()
    start = time.monotonic()
    try:
        out = tool(code)
    except Exception as err:  # a plugin's bug is the model's observation, not the worker's crash
        return ToolResult(f"[tool error: {type(err).__name__}: {err}]", ToolStatus.FAILED,
                          wall_s=time.monotonic() - start)
    if isinstance(out, ToolResult):
        return out
    text, truncated = truncate(str(out), max_chars)
    return ToolResult(text, ToolStatus.OK, truncated=truncated, wall_s=time.monotonic() - start)


class ToolPool:
    """``submit(code, tool)`` -> ``Future[ToolResult]``, at most ``cfg.max_concurrency``
    calls running at once, the rest queued. ``extra_tools`` adds or replaces tools by name
    beyond those of the config."""

    def __init__(self, cfg: ToolConfig, extra_tools: Mapping[str, Tool] | None = None) -> None:
        self.cfg = cfg
        self.sandbox = Sandbox(cfg)
        self.tools: dict[str, Tool] = build_tools(cfg, self.sandbox) | dict(extra_tools or {})
        self._executor = ThreadPoolExecutor(max_workers=cfg.max_concurrency,
                                            thread_name_prefix="lpreg-tool")

    def submit(self, code: str, tool: str = "python") -> Future[ToolResult]:
        function = self.tools.get(tool)
        if function is None:
            future: Future[ToolResult] = Future()
            known = ", ".join(sorted(self.tools))
            future.set_result(ToolResult(f"[tool error: no tool named {tool!r}; the tools are "
                                         f"{known}]", ToolStatus.FAILED))
            return future
        return self._executor.submit(call_tool, function, code, self.cfg.max_output_chars)

    def run(self, code: str, tool: str = "python") -> ToolResult:
        """``submit`` and wait: for callers with nothing else to do (the CLI, tests)."""
        return self.submit(code, tool).result()

    def shutdown(self, wait: bool = True) -> None:
        """Drop the calls still queued and kill the programs still running."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.sandbox.close()
        if wait:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
