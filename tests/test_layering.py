"""The core never imports the UI, and the CLI starts without loading litellm."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_and_store_load_no_textual_and_no_litellm() -> None:
    mods = _modules_after("import loopterm.core, loopterm.core.engine, loopterm.core.model, loopterm.store")
    assert not {m for m in mods if m == "textual" or m.startswith("textual.")}
    assert not {m for m in mods if m == "litellm" or m.startswith("litellm.")}
    assert not {m for m in mods if m.startswith("loopterm.tui")}


def test_help_does_not_import_litellm_and_is_fast() -> None:
    mods = _modules_after("from loopterm.tui.cli import build_parser; build_parser().format_help()")
    assert "litellm" not in mods and "textual" not in mods
    done = subprocess.run([sys.executable, "-m", "loopterm.tui.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "loopterm" in done.stdout  # bench/startup.py measures how fast


# ----------------------------------------------------------------------------- import cycles

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = {"loopterm.core": "core", "loopterm.store": "store", "loopterm.tui": "tui", "loopterm.themes": "themes"}


def _source_modules() -> dict[str, Path]:
    """Every module of the four layers, named as installed (loopterm.core.model -> core/model.py)."""
    modules: dict[str, Path] = {}
    for package, folder in _PACKAGES.items():
        for path in sorted((_ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(_ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-level ones too, except the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the four layers it imports (``from pkg import mod`` imports pkg and pkg.mod)."""
    modules = _source_modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.append(base)  # `from pkg import mod` runs pkg/__init__ first: an edge to pkg too
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
            for target in targets:
                resolved = known(target)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_import_graph_is_acyclic() -> None:
    """No import cycles among loopterm's own modules, lazy (function-level) imports included."""
    graph = import_graph()
    assert "loopterm.core.model" in graph and "loopterm.tui.cli" in graph  # the graph is really built
    assert "loopterm.tui.commands" in graph["loopterm.tui.cli"]  # a function-level import is an edge
    cycles = import_cycles(graph)
    report = []
    for component in cycles:
        members = set(component)
        edges = [f"    {a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
        report.append(f"  cycle of {len(component)} modules:\n" + "\n".join(edges))
    assert not cycles, "import cycles (edges inside each cycle):\n" + "\n".join(report)
