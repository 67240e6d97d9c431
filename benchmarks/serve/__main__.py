"""``python -m benchmarks.serve``: see the package docstring."""

from .cli import main

main()
