"""List the longest functions and the largest files of a source tree, to watch for code that grows too big.

Reads the source with ``ast`` (nothing is imported) and prints two tables: the N longest
functions and methods (qualified name, file, line count from ``def`` to the last line of the
body, decorators excluded) and the N largest ``.py`` files by line count.

    python scripts/code_size.py src benchmarks            # 15 of each
    python scripts/code_size.py src --top 30
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def python_files(roots: list[Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return files


def function_lengths(path: Path) -> list[tuple[int, str, str]]:
    """``(lines, qualified name, path)`` for every function and method defined in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - child.lineno + 1, name, str(path)))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories or .py files to measure")
    parser.add_argument("--top", type=int, default=15, help="how many functions and files to list")
    args = parser.parse_args(argv)

    files = python_files(args.roots)
    functions = sorted((f for path in files for f in function_lengths(path)), reverse=True)
    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p)) for p in files), reverse=True)

    print(f"# {args.top} longest functions (lines, name, file)")
    for lines, name, path in functions[: args.top]:
        print(f"{lines:5d}  {name}  {path}")
    print(f"\n# {args.top} largest files (lines, file)")
    for lines, path in sizes[: args.top]:
        print(f"{lines:5d}  {path}")


if __name__ == "__main__":
    main()
