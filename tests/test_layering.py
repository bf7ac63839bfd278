"""Every import inside pipeserve points down the layer order of docs/architecture.md, and none closes a cycle.

The modules are read with `ast`, never imported: every import statement counts, at module level, inside a
function (a lazy import) or under `if TYPE_CHECKING:` (a type is a dependency too).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pipeserve"

# Lowest first. A module belongs to the layer of the longest prefix that names it; it may import modules of
# its own layer or of layers below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("contracts", ("pipeserve.sampling_params", "pipeserve.outputs", "pipeserve.types", "pipeserve.timeline")),
    ("config", ("pipeserve.config",)),
    ("distributed", ("pipeserve.distributed",)),
    ("layers", ("pipeserve.layers",)),
    ("models", ("pipeserve.models",)),
    ("loader", ("pipeserve.loader",)),
    ("control messages", ("pipeserve.control.messages", "pipeserve.control.process")),
    ("worker", ("pipeserve.worker",)),
    ("launchers", ("pipeserve.control.launcher", "pipeserve.control.node_agent")),
    ("executor", ("pipeserve.executor",)),
    ("engine", ("pipeserve.engine",)),
    ("planner", ("pipeserve.planner",)),
    ("entrypoints", ("pipeserve.entrypoints", "pipeserve.bench", "pipeserve")),
    ("test utilities", ("pipeserve.testing_netns",)),
]
# Empty `__init__` modules of subpackages: importing `a.b.c` runs them, but they import nothing.
PACKAGES_WITHOUT_CODE = {"pipeserve.control", "pipeserve.distributed", "pipeserve.engine", "pipeserve.executor",
                         "pipeserve.layers", "pipeserve.loader", "pipeserve.models", "pipeserve.worker",
                         "pipeserve.entrypoints", "pipeserve.entrypoints.openai", "pipeserve.bench",
                         "pipeserve.planner"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported pipeserve module, line) for every import statement in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod when there is one
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(target, line) for target, line in found if target in modules and target != name]


def import_graph(root: Path) -> dict[str, list[tuple[str, int]]]:
    modules = discover(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md")
    return best[1]


def upward_imports(root: Path) -> list[str]:
    """'file:line: importer (layer) imports target (layer), a layer above' for each such import."""
    files, graph = discover(root), import_graph(root)
    found = []
    for module, targets in sorted(graph.items()):
        if module in PACKAGES_WITHOUT_CODE:
            continue
        for target, line in targets:
            if layer_of(target) > layer_of(module):
                where = files[module].relative_to(root.parent)
                found.append(f"{where}:{line}: {module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]}), a layer above")
    return found


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted({t for t, _ in graph[start]}))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted({t for t, _ in graph[nxt]})))
    return None


def test_every_module_has_a_layer():
    for module in discover(PACKAGE_DIR):
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    found = upward_imports(PACKAGE_DIR)
    assert not found, "\n".join(found)


def test_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pipeserve"


def test_the_checks_catch_a_lazy_upward_import_and_a_relative_cycle(tmp_path):
    """The checker itself, on a made-up package: an import inside a function that points up (and closes a
    cycle with a relative import), and a cycle closed by a relative import under TYPE_CHECKING."""
    root = _write(tmp_path, {
        "pipeserve/__init__.py": "",
        "pipeserve/config.py": "def load():\n    from pipeserve.loader import gguf\n",
        "pipeserve/loader/__init__.py": "",
        "pipeserve/loader/gguf.py": "from ..config import load\n",
        "pipeserve/engine/__init__.py": "",
        "pipeserve/engine/a.py": "from pipeserve.engine import b\n",
        "pipeserve/engine/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
    })
    graph = import_graph(root)
    assert graph["pipeserve.engine.b"] == [("pipeserve.engine.a", 3)]
    assert upward_imports(root) == ["pipeserve/config.py:2: pipeserve.config (config) imports pipeserve.loader.gguf "
                                    "(loader), a layer above"]
    assert find_cycle(graph) == ["pipeserve.config", "pipeserve.loader.gguf", "pipeserve.config"]
    del graph["pipeserve.config"]
    graph["pipeserve.loader.gguf"] = []
    assert find_cycle(graph) == ["pipeserve.engine.a", "pipeserve.engine.b", "pipeserve.engine.a"]



def test_no_test_module_imports_another():
    """Shared test code lives in helper modules (helpers.py, planner_fixtures.py, ...), so running one test file
    never runs or depends on another's collection."""
    tests = Path(__file__).resolve().parent
    found = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_") and n.startswith(("tests.", "test_"))]
    assert not found, "\n".join(found)
