"""Fail if the package's import graph has a cycle (docs/design.md §4).

Every import statement counts, function-local ones included: a cycle hidden behind a
function-local import is still a cycle. Prints the graph's cycles, or one line saying there
are none.

    python tools/check_imports.py [PACKAGE_DIR]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py below ``package_dir``."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def extension_names(package_dir: Path) -> set[str]:
    """Dotted names of compiled modules (``_C``), declared by their C++ sources or built.

    They import nothing from the package; knowing them keeps `from . import _C` from being
    read as an import of the package itself."""
    built = {p.name.split(".")[0] for p in package_dir.glob("*.so")}
    return {f"{package_dir.name}.{name}" for name in built | {"_C"}}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module) if node.level \
                else node.module or ""
            # `from pkg import name`: each name is a submodule, or else an attribute of pkg.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            candidates = submodules if submodules else [base]
        else:
            continue
        found.update(name for name in candidates if name in known and name != module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
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
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def main(argv: list[str]) -> int:
    package_dir = Path(argv[1] if len(argv) > 1 else Path(__file__).parents[1] / "consequential_ext")
    names = module_names(package_dir)
    known = set(names) | extension_names(package_dir)
    graph = {m: imports_of(m, p, known) - extension_names(package_dir) for m, p in names.items()}
    found = cycles(graph)
    for component in found:
        print("import cycle among: " + ", ".join(component))
    print(f"{len(names)} modules, {sum(map(len, graph.values()))} imports, "
          f"{len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
