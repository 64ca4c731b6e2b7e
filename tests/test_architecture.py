"""The import rule that keeps the architecture visible, checked on the source with ``ast``.

- ``conf`` imports no other project package;
- ``verifier`` and ``rollout`` import only ``conf``;
- ``learner`` imports only ``conf`` and rollout's message types (``rollout.types``, and
  ``rollout.weight_wire``, the byte layout of a weight broadcast);
- ``launch`` (driver, cluster, CLI) may import everything;
- no cycle among the imports that run when a module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conf", "verifier", "rollout", "learner", "launch")
ALLOWED = {
    "conf": ("conf",),
    "verifier": ("conf", "verifier"),
    "rollout": ("conf", "rollout"),
    "learner": ("conf", "learner", "rollout.types", "rollout.weight_wire"),
    "launch": PACKAGES,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


MODULES = project_modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """Project modules an import statement names (``from a import b`` names ``a.b`` when it is one)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert node.level == 0, f"{importer}: relative import; the project spells imports out"
        base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def imports(module: str, *, import_time_only: bool) -> set[str]:
    """Project modules ``module`` imports: all of them, or only those that run at import time
    (module level, outside ``if TYPE_CHECKING:``), each with the packages it initialises."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(node, module))
            elif isinstance(node, ast.If) and _is_type_checking(node) and import_time_only:
                continue
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif not import_time_only:
                visit([n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)])

    visit(tree.body)
    if import_time_only:
        # Importing a.b.c first runs a/__init__.py and a/b/__init__.py, unless one of them
        # is a package of the importer itself: that one is already running.
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        found |= {".".join(m.split(".")[:i]) for m in set(found) for i in range(1, m.count(".") + 1)}
        found -= own
    return {m for m in found if m in MODULES}


def layer_of(module: str) -> str:
    return module.split(".")[0]


def allowed(importer: str, imported: str) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[layer_of(importer)])


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package):
    violations = sorted(f"{m} imports {t}" for m in MODULES if layer_of(m) == package
                        for t in imports(m, import_time_only=False) if not allowed(m, t))
    assert not violations, "\n".join(violations)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    graph = {m: imports(m, import_time_only=True) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_cycle_and_a_lazy_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # rollout.worker imports vllm lazily and conf at module level: both are seen, only
    # the module-level one counts for cycles.
    assert "conf.schema" in imports("rollout.worker", import_time_only=True)
    assert "launch.cluster.rollout_pool" in imports("launch.training.loop", import_time_only=False)
    assert "launch.cluster.rollout_pool" not in imports("launch.training.loop", import_time_only=True)
