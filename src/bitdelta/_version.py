"""The package version, in a module of its own so that any module can import it without importing
the package ``__init__`` (which imports those modules in turn)."""

__version__ = "0.1.0"
