"""Benchmarks of bitdelta (kernels, serving, fidelity, compression): small programs, each run from the
repository root as ``python -m benchmarks.NAME`` (the packages ``serve`` and ``fidelity``) or
``python benchmarks/NAME.py``; what they share is in :mod:`benchmarks._common`.

Importing this package puts the checkout's ``src/`` first on the path, so a benchmark measures the
library beside it whether or not that is installed (a GPU machine gets a bare copy of the tree).
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)
