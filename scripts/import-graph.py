#!/usr/bin/env python3
"""Report import circles among aded's modules; exit status 1 when there is one.

A circle is a design smell even where Python happens to cope with it (because one side imports
inside a function, or only for type checking): the modules cannot be understood, tested or moved
apart, and the lower one silently depends on the higher. So every import counts here, wherever it
sits: module level, inside functions, and under `if TYPE_CHECKING:`. Only `import` statements are
read (with `ast`, nothing is imported); names looked up by string through importlib (the lazy
names of `aded/__init__.py`, the drafter registry) are deliberate late binding and are not edges.

    python scripts/import-graph.py [SRC]     # SRC: the folder holding the `aded` package (default src)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "aded"


def module_files(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `src`."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """(target module, line, where) for each import in one module; `where` says whether it runs at
    import time, so a reader of the report sees which side of a circle to move."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.found: list[tuple[str, int, str]] = []
        self._functions = 0
        self._type_checking = 0

    def _where(self) -> str:
        if self._type_checking:
            return "TYPE_CHECKING"
        return "function-local" if self._functions else "module level"

    def _add(self, name: str, line: int) -> None:
        # `import aded.a.b` or `from aded.a import b`: the most specific module that exists
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        edge = (name, line, self._where())
        if name and name != self.module and edge not in self.found:  # `from a import b, c`: one edge
            self.found.append(edge)

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.visit(test)
        self._type_checking += guarded
        for child in node.body:
            self.visit(child)
        self._type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
            package = self.module.split(".")
            if not self.is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else base, node.lineno)


def import_graph(src: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Module -> its imports of other aded modules, as (target, line, where)."""
    files = module_files(src)
    known = set(files)
    graph = {}
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[module] = visitor.found
    return graph


def cycles(graph: dict[str, list[tuple[str, int, str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src"
    graph = import_graph(src)
    found = cycles(graph)
    for component in found:
        members = set(component)
        print(f"cycle of {len(component)} modules: {', '.join(component)}")
        for module in component:
            for target, line, where in graph[module]:
                if target in members:
                    print(f"  {module}:{line} -> {target} ({where})")
    if not found:
        print(f"no import cycles among {len(graph)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
