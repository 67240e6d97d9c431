"""bitdelta: compress fine-tunes to 1-bit deltas against their base, merge them back, serve many.

    import bitdelta
    delta = bitdelta.compress("base_dir", "finetune_dir", scale="scalar", bits=1)
    delta = bitdelta.compress("base_dir", "finetune_dir", bitdelta.CompressConfig(scale="row", bits=2))
    delta.save_pretrained("ft.bitdelta")
    model = bitdelta.apply(base_model, bitdelta.Delta.from_pretrained("ft.bitdelta"))
"""

import importlib
import importlib.util
import sys
import types

from ._version import __version__
from .configs import CompressConfig, DistillConfig
from .errors import BitDeltaError, ConfigError, FormatError, InvalidDeltaError, ShapeMismatchError, WrongBaseError
from .recipes import RECIPES, Recipe, get_recipe
from .scale_modes import ScaleMode, scale_shape

# What needs torch loads on first use, so that a light submodule (the serving HTTP layer's key
# checks, the Ray ingress, the delta store) can be imported without paying for torch.
_LAZY = {"apply": ".apply", "merge": ".apply", "unapply": ".apply", "verify_base": ".apply",
         "compress": ".compress", "Delta": ".delta", "PackedModule": ".delta", "pack_signs": ".pack",
         "unpack_signs": ".pack", "import_reference": ".reference_import"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule not imported yet
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule ``compress`` (or ``apply``) binds it as ``bitdelta.compress``; the
        # package's ``compress`` is the function of that name, as when everything was imported eagerly.
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == "." + name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BitDeltaError",
    "CompressConfig",
    "ConfigError",
    "Delta",
    "DistillConfig",
    "FormatError",
    "InvalidDeltaError",
    "PackedModule",
    "RECIPES",
    "Recipe",
    "ScaleMode",
    "ShapeMismatchError",
    "WrongBaseError",
    "__version__",
    "apply",
    "compress",
    "get_recipe",
    "import_reference",
    "merge",
    "scale_shape",
    "unapply",
    "verify_base",
    "pack_signs",
    "unpack_signs",
]
