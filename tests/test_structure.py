"""The package's import graph, read from the source with `ast`: no circles, and the one-way rules of
docs/architecture.md (commands → package; data/shards never reads data/loader; model never imports the trainer).

Every import counts: module level, inside functions and under `if TYPE_CHECKING:` (a type-only import still ties
two modules together for a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmtrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules (a name imported from a package may be a module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_circle_and_a_relative_import(tmp_path):
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "p.py"
    pkg.write_text("from . import x\nfrom .y import z\nif False:\n    import mmtrain.q\n")
    modules = {"mmtrain.p": pkg, "mmtrain.x": pkg, "mmtrain.y": pkg, "mmtrain.q": pkg}
    assert imports_of("mmtrain.p", pkg, modules) == {"mmtrain.x", "mmtrain.y", "mmtrain.q"}


def test_no_import_circles():
    assert circles(import_graph()) == []


def edges_into(graph: dict[str, set[str]], prefix: str) -> list[tuple[str, str]]:
    return sorted((src, dst) for src, targets in graph.items() for dst in targets
                  if dst == prefix or dst.startswith(prefix + "."))


def test_only_the_cli_imports_commands():
    graph = import_graph()
    outside = [(src, dst) for src, dst in edges_into(graph, "mmtrain.commands")
               if src != "mmtrain.cli" and not src.startswith("mmtrain.commands")]
    assert outside == []


ENTRY_POINT = "mmtrain.train.entry"
"""The rank entry point composes the run: it hands the engine the doctor's pre-flight check."""


@pytest.mark.parametrize("importer, imported", [
    ("mmtrain.data.shards", "mmtrain.data.loader"),  # building shards never needs the loader
    ("mmtrain.data", "mmtrain.model"),  # data knows slots per image as a number, never the model
    ("mmtrain.data", "mmtrain.train"),
    ("mmtrain.model", "mmtrain.data"),
    ("mmtrain.model", "mmtrain.train"),
    ("mmtrain.model", "mmtrain.eval"),
    ("mmtrain.train", "mmtrain.eval"),
    ("mmtrain.train", "mmtrain.doctor"),
])
def test_one_way_rules(importer, imported):
    graph = import_graph()
    bad = [(src, dst) for src, dst in edges_into(graph, imported)
           if (src == importer or src.startswith(importer + ".")) and src != ENTRY_POINT]
    assert bad == []


def test_model_never_imports_deepspeed():
    for name, path in all_modules().items():
        if name.startswith("mmtrain.model"):
            assert "import deepspeed" not in path.read_text(), name


def lazy_imports_without_a_reason(path: Path) -> list[str]:
    """In-function imports that are neither guarded by `try` (an optional or version-dependent module) nor carry a
    comment (on their line or the line above) saying why they wait."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in guarded:
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            block_above = above.startswith(("from ", "import ")) or above.startswith("#")
            if "#" in here or above.startswith("#") or (block_above and _block_has_comment(lines, node.lineno - 2)):
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    return found


def _block_has_comment(lines: list[str], index: int) -> bool:
    """Whether the run of import lines ending at `index` (0-based) starts under a comment line."""
    while index >= 0 and lines[index].strip().startswith(("from ", "import ")):
        index -= 1
    return index >= 0 and lines[index].strip().startswith("#")


def test_the_lazy_import_checker(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import os\n\n\ndef g():\n    import os  # lazy: why\n\n\n"
                      "def h():\n    try:\n        import tomllib\n    except ImportError:\n        pass\n")
    assert lazy_imports_without_a_reason(module) == ["m.py:2: import os"]


def test_in_function_imports_say_why():
    """Commands import their work inside `run` so `mmtrain --help` starts without torch (mmtrain/commands/__init__.py
    says so once); everywhere else an import waits only for a stated reason."""
    found = [row for name, path in all_modules().items()
             if not name.startswith("mmtrain.commands") and name != "mmtrain.cli"
             for row in lazy_imports_without_a_reason(path)]
    assert found == []
