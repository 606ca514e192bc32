"""The layers, held by tools: import-linter's contracts (pyproject.toml) and no import cycle between files.

`lint-imports` checks the contracts in `make test`; these tests show that it runs on the whole tree, that it
really fails on a violation, and check what it cannot see: cycles between single modules, `bench/` (not a
package), and worker code named by "module:attribute" strings (the family registry imports on first use).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "tasks", "broker", "workers", "darkroom", "testkit")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def importlinter_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def contract_name(contract_id: str) -> str:
    return next(c["name"] for c in importlinter_config()["contracts"] if c["id"] == contract_id)


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: install the dev extras (import-linter)"
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_every_top_level_package_is_linted() -> None:
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert set(importlinter_config()["root_packages"]) == found == set(PACKAGES)


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")


def test_deliberate_violations_break_the_contracts(tmp_path: Path) -> None:
    def not_python(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))]

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=not_python)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    append(tmp_path / "tasks" / "names.py", "import broker.app")
    append(tmp_path / "workers" / "pipelines" / "png.py", "import darkroom.submit")
    append(tmp_path / "tasks" / "seeds.py", "import torch")
    append(tmp_path / "workers" / "convert" / "sd.py", "import celery")
    (tmp_path / "storage" / "ring_a.py").write_text("import storage.ring_b  # noqa: F401\n")
    (tmp_path / "storage" / "ring_b.py").write_text("import storage.ring_a  # noqa: F401\n")

    result = lint_imports(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    for contract, evidence in (
        ("layers", [r"tasks is not allowed to import broker", r"tasks\.names -> broker\.app \(l\.\d+\)",
                    r"workers is not allowed to import darkroom",
                    r"workers\.pipelines\.png -> darkroom\.submit \(l\.\d+\)"]),
        ("no-ml-no-client-in-contract", [r"tasks\.seeds -> torch \(l\.\d+\)"]),
        ("no-celery-in-openvino-code", [r"workers\.convert\.sd -> celery \(l\.\d+\)"]),
        ("acyclic", [r"No cycles are allowed in storage\.", r"- \.ring_[ab] -> \.ring_[ab] \(1 import\)"]),
    ):
        assert f"{contract_name(contract)} BROKEN" in out, out
        missing = [pattern for pattern in evidence if not re.search(pattern, out)]
        assert not missing, f"{contract}: {missing} not in\n{out}"
    # The copy is what was linted, and the added lines are what broke it: the tree itself has none of them.
    assert "broker.app" not in lint_imports(ROOT).stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm without recursion: the groups of two or more modules that import each other in a ring."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    work: list[tuple[str, Iterator[str]]] = []  # the depth-first path, each node with its imports left to see

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(graph.find_modules_directly_imported_by(node)))))

    for start in sorted(graph.modules):
        if start in index:
            continue
        visit(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                visit(child)
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def shortest_cycle(graph: grimp.ImportGraph, group: set[str]) -> list[str]:
    """A shortest ring through the group's first module, as module names, the first repeated at the end."""
    start = min(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.find_modules_directly_imported_by(node) & group):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    steps = [cycle[0]]
    for importer, imported in zip(cycle, cycle[1:], strict=False):
        lines = sorted(d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported))
        steps.append(f"-> {imported} (l.{','.join(map(str, lines))} of {importer})")
    return " ".join(steps)


def test_no_import_cycle_between_modules() -> None:
    # Every import counts, the ones inside functions and under TYPE_CHECKING too, as for lint-imports.
    graph = grimp.build_graph(*PACKAGES, "tests", cache_dir=None)
    cycles = [describe(graph, shortest_cycle(graph, group)) for group in strongly_connected(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_a_ring() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.one", "a.two", "a.three", "a.four"):
        graph.add_module(module)
    for importer, imported in (("a.one", "a.two"), ("a.two", "a.three"), ("a.three", "a.one"), ("a.four", "a.one")):
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert strongly_connected(graph) == [{"a.one", "a.two", "a.three"}]
    assert shortest_cycle(graph, {"a.one", "a.two", "a.three"}) == ["a.one", "a.two", "a.three", "a.one"]


def imported_modules(path: Path, package: str | None) -> Iterator[tuple[str, int]]:
    """Every module a file imports, at any depth, with its line: import statements, import_module("...") and
    the "package.module:attribute" strings of registries. `package` is the file's package, for relative imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package, f"{path}:{node.lineno}: a relative import outside a package"
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                yield (f"{base}.{node.module}" if node.module else base), node.lineno
            else:
                yield node.module or "", node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # Dotted, so that Redis keys ("darkroom:batch:...") are not taken for modules.
            module, colon, attribute = node.value.partition(":")
            dotted = "." in module and all(part.isidentifier() for part in module.split("."))
            if colon and dotted and attribute.isidentifier():
                yield module, node.lineno


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_module_finder_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "import a.b\nfrom c import d\nfrom . import e\nfrom ..f import g\n"
        "def h():\n    import importlib\n"
        "    return importlib.import_module('i.j'), 'k.l:m', 'darkroom:batch', 'no: x'\n"
    )
    found = {module for module, _ in imported_modules(source, "p.q")}
    assert found == {"a.b", "c", "p.q", "p.f", "importlib", "i.j", "k.l"}


def test_bench_never_imports_tests() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in sorted((ROOT / "bench").rglob("*.py"))
                 if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)  # .venv-peers, .work
                 for module, line in imported_modules(path, None) if in_package(module, "tests")]
    assert not offenders, "\n".join(offenders)


def test_workers_never_import_darkroom() -> None:
    offenders = []
    for path in sorted((ROOT / "workers").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        offenders += [f"{path.relative_to(ROOT)}:{line} imports {module}"
                      for module, line in imported_modules(path, package) if in_package(module, "darkroom")]
    assert not offenders, "\n".join(offenders)
