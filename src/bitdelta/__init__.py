"""bitdelta: compress fine-tunes to 1-bit deltas against their base, merge them back, serve many.

    import bitdelta
    delta = bitdelta.compress("base_dir", "finetune_dir", scale="scalar", bits=1)
    delta.save_pretrained("ft.bitdelta")
    model = bitdelta.apply(base_model, bitdelta.Delta.from_pretrained("ft.bitdelta"))
"""

__version__ = "0.1.0"

from .apply import apply, merge, unapply, verify_base  # noqa: E402
from .compress import compress  # noqa: E402
from .delta import Delta, PackedModule  # noqa: E402
from .errors import BitDeltaError, FormatError, InvalidDeltaError, ShapeMismatchError, WrongBaseError  # noqa: E402
from .pack import pack_signs, unpack_signs  # noqa: E402
from .reference_import import import_reference  # noqa: E402

__all__ = [
    "BitDeltaError",
    "Delta",
    "FormatError",
    "InvalidDeltaError",
    "PackedModule",
    "ShapeMismatchError",
    "WrongBaseError",
    "apply",
    "compress",
    "import_reference",
    "merge",
    "unapply",
    "verify_base",
    "pack_signs",
    "unpack_signs",
]
