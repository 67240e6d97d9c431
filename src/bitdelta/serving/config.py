"""EngineConfig: every engine setting declared once, with its default and help text.

The same declaration makes the ``bitdelta serve`` flags (:meth:`EngineConfig.add_arguments`), reads
them back (:meth:`EngineConfig.from_args`), builds the engine (:func:`bitdelta.serving.runtime.
build_runtime` takes one) and travels to Ray replicas (:class:`~bitdelta.serving.ray_serve.RaySettings`
extends it), so a setting added here reaches the single server and Ray alike. Importing this module
loads neither torch nor the engine.

    cfg = EngineConfig(max_batch=16, kv_cache_mb=256)
    rt = build_runtime("models/tiny/base", {}, config=cfg)
    EngineConfig.add_arguments(parser); cfg = EngineConfig.from_args(parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _base_quant_name(text: str) -> str:
    """``--base-quant`` value: int8, fp8, or none (a dense base, even from a quantized directory)."""
    value = text.strip().lower()
    if value not in ("none", "int8", "fp8"):
        raise argparse.ArgumentTypeError(f"--base-quant must be none, int8 or fp8 (got {text!r})")
    return value


MAX_KV_BLOCK_SIZE = 256


def _kv_block_size(text: str) -> int:
    """``--kv-block-size`` value: a power of two from 1 to :data:`MAX_KV_BLOCK_SIZE`. The Triton decode
    attention walks a sequence's keys in tiles of whole blocks whose size is a power of two
    (:func:`bitdelta.ops.paged_attention.paged_decode_attention_triton`), so another block size would
    leave every decode step on the slower PyTorch path; past the maximum a block is larger than any
    tile the kernel's launch configuration was sized for, and wastes up to a block per sequence."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a power of two from 1 to {MAX_KV_BLOCK_SIZE}, got {text!r}"
                                         ) from None
    if not 1 <= value <= MAX_KV_BLOCK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two from 1 to {MAX_KV_BLOCK_SIZE} (got {value})")
    return value


def _setting(default, help: str, flag_type=None, optional_bool: bool = False):
    """A field with what its flag needs: ``flag_type(bitdelta.cli) -> argparse type`` (resolved when the
    flags are made, so that importing this module stays light), ``optional_bool``: ``--x/--no-x``."""
    return field(default=default, metadata={"help": help, "type": flag_type, "bool": optional_bool})


@dataclass
class EngineConfig:
    """The engine's settings (plain values: they travel to Ray workers as a dict)."""

    max_gpu_deltas: int = _setting(32, "device slots for deltas (default 32)", lambda c: c.int_range(1))
    max_cpu_deltas: int = _setting(128, "deltas kept in host memory (default 128)", lambda c: c.int_range(1))
    max_bits: int | None = _setting(None, "sign planes per pool slot (default: max of startup deltas)",
                                    lambda c: c.int_range(1, 8))
    max_extra_vocab: int | None = _setting(None, "added tokens a delta may carry (default: max of startup deltas)",
                                           lambda c: c.int_range(0))
    max_lowrank_rank: int = _setting(0, "rank of the low-rank corrections a device slot holds (default 0: none, "
                                        "and deltas with one are refused; raised to the startup deltas' largest)",
                                     lambda c: c.int_range(0, 4096))
    max_batch: int = _setting(64, "max running sequences (a cap: the paged KV cache gives each the blocks its tokens "
                                  "need)", lambda c: c.int_range(1))
    max_step_tokens: int | None = _setting(None, "tokens one engine step holds: a decode token per running sequence, "
                                                 "then prompt chunks (a longer prompt is split over steps); default "
                                                 "512, at least --max-batch", lambda c: c.int_range(1))
    max_queue: int = _setting(256, "max waiting requests before answering 429", lambda c: c.int_range(1))
    max_model_len: int | None = _setting(None, "context length (default: the model's)", lambda c: c.int_range(1))
    kv_cache_mb: float | None = _setting(None, "KV cache budget in MiB (default on CUDA: the memory free after the "
                                               "base and delta pool, less a tenth of the card and 512 MiB; CPU: 1024)",
                                         lambda c: c.float_range(0, strict_lo=True))
    kv_block_size: int = _setting(16, "positions per block of the paged KV cache: a power of two from 1 to "
                                      f"{MAX_KV_BLOCK_SIZE} (default 16)", lambda c: _kv_block_size)
    dtype: str | None = _setting(None, "dtype of the base weights (float32, bfloat16, float16; default: the "
                                       "checkpoint's own on CUDA, float32 on CPU)", lambda c: c.dtype_name)
    device: str | None = _setting(None, "cuda or cpu (default: cuda if available)", lambda c: c.device_name)
    base_quant: str | None = _setting(None, "serve the base quantized: int8 or fp8 (per-channel, as `compress "
                                            "--base-quant`; FP8 GEMMs on Hopper/Ada, INT8 weight-only elsewhere); "
                                            "none: dense weights. Default: as the base directory stores them",
                                      lambda c: _base_quant_name)
    cuda_graphs: bool = _setting(True, "on CUDA, decode steps and steps where short prompts join them replay CUDA "
                                       "graphs captured at start (default: on; --no-cuda-graphs runs every step "
                                       "eagerly)", optional_bool=True)
    engine_restart: bool = _setting(True, "restart the engine automatically if it stops (fresh KV state; in-flight "
                                          "requests fail)", optional_bool=True)

    # ------------------------------------------------------------------ flags

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Adds one ``--flag`` per setting (``max_gpu_deltas`` -> ``--max-gpu-deltas``) to ``parser``."""
        from .. import cli as checks  # the CLI's argparse value checkers

        for f in dataclasses.fields(EngineConfig):
            flag = "--" + f.name.replace("_", "-")
            meta = f.metadata
            if meta["bool"]:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            else:
                kind = meta["type"](checks) if meta["type"] else None
                parser.add_argument(flag, type=kind, default=f.default, help=meta["help"])

    @classmethod
    def apply_settings_file(cls, args, path, given=frozenset()) -> None:
        """``serve --config FILE``: the file's settings (YAML or TOML, keys named as these fields) go
        into parsed ``args``, except those whose flags ``given`` says were set on the command line."""
        from .. import cli as checks
        from ..configs import flag_reader, read_settings_file, settings_into_args

        readers = {f.name: flag_reader(f.metadata["type"](checks) if f.metadata["type"] else None, f.metadata["bool"])
                   for f in dataclasses.fields(EngineConfig)}
        settings_into_args(args, read_settings_file(path), readers, given, f"--config {path}")

    @classmethod
    def from_args(cls, args) -> "EngineConfig":
        """The settings of parsed arguments (those :meth:`add_arguments` made)."""
        return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})

    def load_dtype(self, device: str) -> str | None:
        """The dtype to load the base in on ``device``: the one asked for; otherwise, on CUDA, the
        checkpoint's own (None: as stored, e.g. bfloat16 for most releases: float32 would double the
        memory and halve the speed of every step), and on CPU float32 (half-precision matrix
        products are slow or missing on many CPUs)."""
        if self.dtype:
            return self.dtype
        return None if str(device).startswith("cuda") else "float32"

    def engine_settings(self) -> "EngineConfig":
        """Just the engine's settings (a subclass's other fields dropped)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})
