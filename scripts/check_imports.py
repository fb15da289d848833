#!/usr/bin/env python3
"""Check a package's imports: no cycles, and each layer imports only the layers below it.

    scripts/check_imports.py [PACKAGE_DIR]      (default: taskmesh)

Every import counts, including those inside functions: a lazy import that closes a
cycle is still a cycle for a reader. Exit 1 with one line per problem, else 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: layer → the layers (or single modules) it may import; modules outside any layer may import anything.
ALLOWED = {
    "core": {"core"},
    "state": {"core", "state"},
    "hardware": {"core", "hardware", "state.keys"},
    "worker": {"core", "state", "hardware", "worker"},
    "app": {"core", "state", "hardware", "app"},
    "run": {"core", "state", "hardware", "app", "run"},
    "observe": {"core", "state", "hardware", "app", "observe"},
}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import submodule" imports the submodule
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, top: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == top and parts[1] in ALLOWED else None


def may_import(importer: str, imported: str, top: str) -> bool:
    layer = layer_of(importer, top)
    if layer is None:
        return True
    rest = imported.split(".")[1:]
    return any(rest[: len(allowed.split("."))] == allowed.split(".") for allowed in ALLOWED[layer])


def check(root: Path) -> list[str]:
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    top = root.name
    for importer, targets in sorted(graph.items()):
        for imported in sorted(targets):
            if not may_import(importer, imported, top):
                problems.append(f"layering: {importer} imports {imported} "
                                f"({layer_of(importer, top)} may import {sorted(ALLOWED[layer_of(importer, top)])})")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parent.parent / "taskmesh")
    problems = check(root)
    for problem in problems:
        print(f"check_imports: {problem}")
    if not problems:
        print(f"check_imports: {root.name}: no cycles, layers respected ({len(modules(root))} modules)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
