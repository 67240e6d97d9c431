"""No benchmark imports the tests: benchmarks share code through benchmarks/_common.py and the library."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TEST_MODULES = {p.stem for p in (BENCHMARKS.parent / "tests").rglob("*.py")} | {"tests", "conftest"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_benchmark_imports_tests():
    files = sorted(BENCHMARKS.rglob("*.py"))
    assert len(files) > 20  # the scan sees the packages, not only the top-level scripts
    offenders = {str(f.relative_to(BENCHMARKS)): sorted(imported_modules(f) & TEST_MODULES) for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}


def test_scan_catches_a_test_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nfrom models import make_pair\nfrom tests.ops import _inputs\n")
    assert imported_modules(bad) & TEST_MODULES == {"models", "tests"}
