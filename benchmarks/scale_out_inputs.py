"""What the scale-out measurement serves, written to disk once: a base directory and a delta store.

Two kinds. A random Llama-shaped base (``write_random_base``: the tensors of
:func:`benchmarks._common.build_base` saved as Hugging Face safetensors shards with a ``config.json``
and a byte-level tokenizer covering the whole vocabulary, so every generated id decodes to text) with
random 1-bit deltas made for it (``write_random_store``: :func:`benchmarks._common.synthetic_delta`,
so each passes the base check at registration). Or the bundled tiny base with copies of its two real
deltas under tenant names (``write_tiny_store``). A store is one artifact directory per tenant;
tenants past ``distinct`` share files with an earlier one through hard links (disk is saved, each
tenant still loads its own directory).

    model = write_random_base(work / "base", LLAMA2_7B, torch.bfloat16, "cuda")
    write_random_store(work / "store", model, tenant_names(64), distinct=64)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import string
from pathlib import Path

import torch

from benchmarks._common import build_base, synthetic_delta

SPECIALS = ["<s>", "</s>", "<pad>"]
SHARD_LAYERS = 4  # decoder layers per safetensors shard (about 3.2 GB each for a 7B bf16 base)
INPUTS_RECORD = "scale_out_inputs.json"  # what a work directory holds, so a later run can reuse it


def tenant_names(n: int) -> list[str]:
    return [f"t{i:03d}" for i in range(n)]


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer with exactly ``vocab_size`` ids: 3 specials, the 256 bytes, then
    three-letter ASCII tokens that text never encodes to but every id decodes from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIALS) + len(alphabet):
        raise ValueError(f"a byte-level tokenizer needs at least {len(SPECIALS) + len(alphabet)} ids, not {vocab_size}")
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    letters = string.ascii_letters + string.digits  # printable ASCII: the byte-level alphabet maps them to themselves
    for triple in itertools.product(letters, repeat=3):
        if len(vocab) == vocab_size:
            break
        vocab["".join(triple)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2], clean_up_tokenization_spaces=False)


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """A served model's tensors under the Hugging Face Llama names (``...q_proj.weight``, norms as they are)."""
    out = {f"{name}.weight": w for name, w in model.weights.items()}
    out.update(model.params1d)
    return out


def shard_of(name: str) -> int:
    """Shard index of a tensor: decoder layers in groups of SHARD_LAYERS, the rest in shard 0."""
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2]) // SHARD_LAYERS
    return 0


def save_shards(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Safetensors shards plus ``model.safetensors.index.json``, one shard in host memory at a time."""
    from safetensors.torch import save_file

    groups: dict[int, list[str]] = {}
    for name in tensors:
        groups.setdefault(shard_of(name), []).append(name)
    total = max(groups) + 1
    weight_map, size = {}, 0
    for i in sorted(groups):
        file = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        part = {n: tensors[n].detach().to("cpu").contiguous() for n in groups[i]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        size += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({n: file for n in part})
        del part
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llama_config(shape: dict, dtype):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["max_pos"], rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype=str(dtype).removeprefix("torch."))


def write_random_base(out: Path, shape: dict, dtype, device, seed: int = 0):
    """Builds the random base on ``device``, saves it under ``out`` as a Hugging Face directory and
    returns the served model (the deltas are made against it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_base(shape, dtype, device, seed)
    save_shards(hf_tensors(model), out)
    llama_config(shape, dtype).save_pretrained(out)
    byte_tokenizer(shape["vocab"]).save_pretrained(out)
    return model


def link_artifact(src: Path, dst: Path) -> None:
    """``dst`` as a copy of the artifact ``src`` whose files are hard links (a plain copy across devices)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def write_random_store(store: Path, model, tenants: list[str], distinct: int, log=print) -> None:
    """One random 1-bit delta of ``model`` per tenant; tenants past ``distinct`` link an earlier one's files."""
    store = Path(store)
    for i, name in enumerate(tenants):
        if i < distinct:
            synthetic_delta(model, seed=i).save_pretrained(store / name)
        else:
            link_artifact(store / tenants[i % distinct], store / name)
        if (i + 1) % 16 == 0 or i + 1 == len(tenants):
            log(f"store: {i + 1}/{len(tenants)} tenants written")


def write_tiny_store(store: Path, tiny: Path, tenants: list[str]) -> None:
    """The bundled tiny model's two deltas (compressed here, row scales), copied under the tenant names in turn."""
    import bitdelta

    src = []
    for name in ("shakespeare", "gsm8k"):
        path = Path(store).parent / "compressed" / name
        bitdelta.compress(tiny / "base", tiny / name, scale="row", progress=False).save_pretrained(path)
        src.append(path)
    for i, name in enumerate(tenants):
        shutil.copytree(src[i % 2], Path(store) / name)


def inputs_ready(work: Path, want: dict) -> bool:
    """True when ``work`` already holds the inputs ``want`` describes (a previous run wrote them)."""
    rec = Path(work) / INPUTS_RECORD
    return rec.exists() and json.loads(rec.read_text()) == want


def mark_inputs(work: Path, want: dict) -> None:
    (Path(work) / INPUTS_RECORD).write_text(json.dumps(want, indent=1, sort_keys=True))
