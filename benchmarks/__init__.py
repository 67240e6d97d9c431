"""Benchmarks of bitdelta (kernels, serving, fidelity, compression): small programs, each run as
``python -m benchmarks.NAME`` or ``python benchmarks/NAME.py`` from the repository root; what they
share is in :mod:`benchmarks._common`."""
