"""bitdelta: compress fine-tunes to 1-bit deltas against their base, merge them back, serve many.

    import bitdelta
    delta = bitdelta.compress("base_dir", "finetune_dir", scale="scalar", bits=1)
    delta = bitdelta.compress("base_dir", "finetune_dir", bitdelta.CompressConfig(scale="row", bits=2))
    delta.save_pretrained("ft.bitdelta")
    model = bitdelta.apply(base_model, bitdelta.Delta.from_pretrained("ft.bitdelta"))
"""

from ._version import __version__
from .apply import apply, merge, unapply, verify_base
from .compress import compress
from .configs import CompressConfig, DistillConfig
from .delta import Delta, PackedModule
from .errors import BitDeltaError, ConfigError, FormatError, InvalidDeltaError, ShapeMismatchError, WrongBaseError
from .pack import pack_signs, unpack_signs
from .recipes import RECIPES, Recipe, get_recipe
from .reference_import import import_reference
from .scale_modes import ScaleMode, scale_shape

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
