"""scripts/import_graph.py: module-level imports only, relative imports resolved, run as a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "import_graph.py"


def _package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import thing\n")
    (pkg / "a.py").write_text("import os\nfrom . import b\nfrom .sub.c import x\n\ndef f():\n    from . import d\n")
    (pkg / "b.py").write_text("try:\n    from .d import y\nexcept ImportError:\n    pass\n")
    (pkg / "d.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import b\nfrom ..a import f\nimport pkg.d\n")
    return pkg


def test_prints_module_level_imports_within_the_package(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(_package(tmp_path))], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == [
        "pkg -> pkg.a",
        "pkg.a -> pkg.b, pkg.sub.c",  # os is outside the package; d is imported inside a function
        "pkg.b -> pkg.d",             # under a module-level try
        "pkg.d -> -",
        "pkg.sub -> -",
        "pkg.sub.c -> pkg.a, pkg.b, pkg.d",
    ]


def test_a_directory_that_is_no_package_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a package directory" in r.stderr and r.stderr.count("\n") == 1
