"""Tools a model calls during a rollout: the sandbox that runs its code (``sandbox``), the
tools by name (``registry``), and the pool that runs calls beside the engine thread
(``pool``)."""

from rollout.tools.pool import ToolPool
from rollout.tools.registry import BUILTIN_TOOLS, Tool, build_tools
from rollout.tools.sandbox import Sandbox, ToolResult, ToolStatus

__all__ = ["BUILTIN_TOOLS", "Sandbox", "Tool", "ToolPool", "ToolResult", "ToolStatus", "build_tools"]
