"""Print which modules of a package import which other modules of it, at module level.

Reads the source with ``ast`` (nothing is imported, so no torch, no side effects) and prints one
line per module, ``module -> imported modules`` (comma-separated, sorted; ``-`` when it imports
none of the package's modules). Only module-level imports count, including those under a
module-level ``if``/``try``; imports inside functions and classes are lazy and are left out, since
they do not run when the module is imported. Relative imports are resolved; ``from . import x``
names the submodule ``x`` when there is one. Python also runs every enclosing package's
``__init__`` before a module: read those lines too when asking what one import pulls in.

    python scripts/import_graph.py src/bitdelta/serving > /tmp/import_graph.txt
    python scripts/import_graph.py src/bitdelta/serving --within bitdelta   # every bitdelta module it reaches
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def package_root(directory: Path) -> Path:
    """The directory on ``sys.path`` for ``directory``: the first parent without an ``__init__.py``."""
    root = directory.resolve()
    while (root / "__init__.py").is_file():
        root = root.parent
    return root


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported (not those inside defs or classes)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def imported_modules(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
    subs = {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    return subs or {target}


def import_graph(directory: Path, within: str | None = None) -> dict[str, set[str]]:
    """``{module: modules it imports at module level}``, keeping only modules whose name starts with
    ``within`` (default: the package ``directory`` itself)."""
    directory = directory.resolve()
    root = package_root(directory)
    files = sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)
    names = {p: module_name(p, root) for p in files}
    known = set(names.values())
    prefix = within or module_name(directory / "__init__.py", root)
    graph = {}
    for path, name in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = set()
        for node in module_level_imports(tree):
            found |= imported_modules(node, name, path.name == "__init__.py", known)
        graph[name] = {m for m in found if m == prefix or m.startswith(prefix + ".")} - {name}
    return graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a package directory, e.g. src/bitdelta/serving")
    parser.add_argument("--within", help="keep imports of modules under this name (default: the package itself)")
    args = parser.parse_args(argv)
    if not (args.directory / "__init__.py").is_file():
        print(f"{args.directory} is not a package directory (no __init__.py); pass one such as src/bitdelta/serving",
              file=sys.stderr)
        return 2
    for name, deps in sorted(import_graph(args.directory, args.within).items()):
        print(f"{name} -> {', '.join(sorted(deps)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
