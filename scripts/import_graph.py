"""Helox's import graph between its packages: every `import helox.*` in src/helox, read with `ast`.

Prints, per package (a subpackage such as `helox.training`, or a top-level module such as
`helox.config`), the packages it imports, and the imports made inside functions, with the reason
they are there. Exits 1 when the graph between packages has a cycle or a layering rule is broken:

  - the model package imports no other Helox package but the config base and the errors;
  - eval/, export/ and observe/ never import training/;
  - no helox import hides inside a function, except in the cli package (its commands import
    lazily so that `helox --help` stays fast) and where the imported module needs an optional
    extra (the line says so: `# optional extra: NAME`).
Imports under `if TYPE_CHECKING:` never run; they are listed apart, as annotation-only edges.

    python scripts/import_graph.py            # the listing and the verdict
    python scripts/import_graph.py --local    # also each function-local import of any module
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "helox"
FORBIDDEN = {"helox.eval": {"helox.training"}, "helox.export": {"helox.training"},
             "helox.observe": {"helox.training"}}
MODEL_MAY_IMPORT = {"helox.model", "helox.configbase", "helox.errors"}
OPTIONAL_EXTRA = "# optional extra:"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """`helox.training.loop` → `helox.training`; `helox.config` → `helox.config`."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def imports_of(path: Path) -> list[tuple[str, str, int]]:
    """(imported module, where: "module", "function", "extra" or "typing", line) for every
    import in the file; "extra" is a function-local import marked `# optional extra:`,
    "typing" one under `if TYPE_CHECKING:`."""
    text = path.read_text()
    lines = text.splitlines()
    found = []

    def kind_of(node: ast.stmt, where: str) -> str:
        if where == "function" and OPTIONAL_EXTRA in lines[node.end_lineno - 1]:
            return "extra"
        return where

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, kind_of(child, where), child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = ([f"helox.{a.name}" for a in child.names] if child.module == "helox"
                         else [child.module])
                found.extend((name, kind_of(child, where), child.lineno) for name in names)
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(child, "typing")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, "typing" if where == "typing" else "function")
            else:
                visit(child, where)

    visit(ast.parse(text, str(path)), "module")
    return found


def _short(package: str) -> str:
    return "helox (API)" if package == "helox" else package.removeprefix("helox.")


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's node list, found by depth-first search from each node."""
    cycles, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        cycles.append(path + [start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", action="store_true", help="list every function-local import")
    args = parser.parse_args()
    graph: dict[str, set[str]] = defaultdict(set)
    typing_only: dict[str, set[str]] = defaultdict(set)
    problems, local_helox = [], []
    for path in sorted(ROOT.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():
            continue  # a script among the package data (evals/lm_eval/), not a module
        module = module_name(path)
        package = package_of(module)
        graph.setdefault(package, set())
        for imported, kind, line in imports_of(path):
            where = f"{path.relative_to(ROOT.parents[1])}:{line}"
            if kind in ("function", "extra") and args.local:
                print(f"local import  {where}  {imported}")
            if not (imported == "helox" or imported.startswith("helox.")):
                continue
            target = package_of(imported)
            if kind == "typing":
                if target != package:
                    typing_only[package].add(target)
                continue
            if package == "helox.model" and target not in MODEL_MAY_IMPORT:
                problems.append(f"{where}: the model package imports {imported}")
            if kind == "function" and module.split(".")[:2] != ["helox", "cli"]:
                local_helox.append(f"{where}: {imported} imported inside a function")
            if target != package:
                graph[package].add(target)
            if target in FORBIDDEN.get(package, ()):
                problems.append(f"{where}: {package} imports {target}")
    print("package      → the packages it imports (when it is imported)")
    for package in sorted(graph):
        targets = ", ".join(t.removeprefix("helox.") for t in sorted(graph[package])) or "-"
        print(f"{_short(package):<12} → {targets}")
    print("\nannotation-only imports (under `if TYPE_CHECKING:`, never run):")
    for package in sorted(typing_only):
        targets = ", ".join(t.removeprefix("helox.") for t in sorted(typing_only[package]))
        print(f"{_short(package):<12} ⇢ {targets}")
    cycles = find_cycles(graph)
    for cycle in cycles:
        problems.append("cycle: " + " → ".join(_short(p) for p in cycle))
    problems += local_helox
    print()
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{len(graph)} packages, {sum(map(len, graph.values()))} edges, {len(cycles)} cycles, "
          f"{len(local_helox)} function-local helox imports outside cli.py, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
