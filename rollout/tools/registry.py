"""Tools by name: what a model may call in a rollout, and how a user adds one.

A tool is a function ``(code: str) -> str``: the text the model wrote for it in, the
observation out. "python" is built in and runs the code in the sandbox; ``tool.plugins``
adds others by name, as "package.module:function". A plugin runs in the caller's process
and is trusted like any other code of the run: sandbox inside it whatever needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from conf.errors import ConfigError
from conf.schema import ToolConfig
from rollout.tools.sandbox import Sandbox, ToolResult

# A tool may also return a full ToolResult, as the built-in one does.
Tool = Callable[[str], "str | ToolResult"]
BUILTIN_TOOLS = ("python",)


def load_tool(name: str, spec: str) -> Tool:
    """The function that ``spec`` ("package.module:function") names."""
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config key 'tool.plugins.{name}': cannot load {spec!r}: {err}") from None
    if not callable(function):
        raise ConfigError(f"config key 'tool.plugins.{name}': {spec!r} is not a function")
    return function


def build_tools(cfg: ToolConfig, sandbox: Sandbox) -> dict[str, Tool]:
    """Every tool of the run by name: the sandboxed "python", then the plugins."""
    tools: dict[str, Tool] = {"python": sandbox.run}
    for name, spec in cfg.plugins.items():
        tools[name] = load_tool(name, spec)
    return tools
