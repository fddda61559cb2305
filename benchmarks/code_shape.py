"""The package's shape: lines per module, the longest functions, the import graph's circles.

Run from the repository root: `python benchmarks/code_shape.py [--top 10]`. Issue 20's before/after numbers come from it
(twin pairs come from the `duplicates` tool, which is not part of the project).
"""

from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path

import grimp


def module_lines(root: Path) -> dict[str, int]:
    """Lines of every module of the package under `root`."""
    return {str(p.relative_to(root.parent)): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}


def body_start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The first line of a function's code: after its signature and its docstring."""
    first = node.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return node.body[1].lineno if has_doc and len(node.body) > 1 else first.lineno


def function_lengths(root: Path) -> list[tuple[int, str, int]]:
    """(lines, "module:qualified.name", code lines) of every function and method, longest first; code lines
    leave out the signature and the docstring."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    code = child.end_lineno - body_start(child) + 1
                    found.append((child.end_lineno - child.lineno + 1, f"{path.relative_to(root.parent)}:{name}", code))
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

        visit(tree, "")
    return sorted(found, reverse=True)


def circles(package: str) -> list[list[str]]:
    """Groups of modules that import each other round a circle (strongly connected, more than one module)."""
    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in modules:
        if m not in index:
            connect(m)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10, help="how many of the longest modules and functions to list")
    parser.add_argument("--package", default="musiclm")
    args = parser.parse_args()
    root = Path(args.package)
    lines = module_lines(root)
    print(f"modules: {len(lines)}, lines: {sum(lines.values())}, max {max(lines.values())}, "
          f"median {statistics.median(lines.values()):.0f}, over 400: {sum(n > 400 for n in lines.values())}")
    for path, n in sorted(lines.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {n:5d}  {path}")
    functions = function_lengths(root)
    print(f"functions: {len(functions)}, over 60 lines: {sum(n > 60 for n, _, _ in functions)}, "
          f"over 60 lines of code (no signature, no docstring): {sum(c > 60 for _, _, c in functions)}")
    for n, name, code in functions[: args.top]:
        print(f"  {n:5d}  {name} ({code} of code)")
    found = circles(args.package)
    print(f"import circles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))


if __name__ == "__main__":
    main()
