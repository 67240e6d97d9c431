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
# A script run as ``python benchmarks/NAME.py`` has this folder on the path, where its modules would
# shadow installed packages of the same name (``kernels.py`` hides Hugging Face's ``kernels``, which
# transformers imports when present); the benchmarks import each other through the package only.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
