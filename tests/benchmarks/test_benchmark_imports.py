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


def test_a_script_run_as_a_file_does_not_shadow_installed_packages(tmp_path):
    """``python benchmarks/NAME.py`` puts the benchmarks folder on the path; once the script imports the
    package, a top-level ``import kernels`` (what transformers does when Hugging Face's kernels package
    is installed) must not find ``benchmarks/kernels.py``."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"  # a stand-in script: what the benchmarks' own first lines do
    script.write_text(
        "import importlib.util, sys\n"
        f"sys.path[:0] = [{str(BENCHMARKS)!r}, {str(BENCHMARKS.parent)!r}]  # as when run from that folder\n"
        "assert importlib.util.find_spec('kernels').origin.endswith('benchmarks/kernels.py')\n"
        "import benchmarks._common\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"print('shadowed' if spec is not None and spec.origin.startswith({str(BENCHMARKS)!r}) else 'clear')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "clear"
