"""The base: the SmolLM2-135M-Instruct GGUF dequantised to a plain float32 safetensors model dir, and
a check that the conversion works (a greedy chat reply and a WikiText-2 slice perplexity).

    convert_gguf(Path("/tmp/smol.gguf"), work / "base", wheel=None)
    record = sanity_check_base(args, work / "base")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bitdelta.atomic import atomic_directory
from bitdelta.evaluate import perplexity
from bitdelta.hf import load_model, load_tokenizer

from .settings import log

CHAT_PROBE = "What is the capital of France?"


def convert_gguf(gguf: Path, out: Path, wheel: str | None = None) -> None:
    """GGUF -> plain float32 safetensors model dir. transformers dequantises the GGUF on load, but
    cannot save a GGUF-loaded model, so its weights go into a freshly built model of the same config."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        if not wheel:
            raise SystemExit("reading a GGUF needs the `gguf` package: pip install gguf, or pass --gguf-wheel FILE.whl")
        sys.path.insert(0, str(Path(wheel).resolve()))  # a pure-Python wheel is an importable zip
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, strict=True)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise SystemExit("the converted model lost its tied embeddings")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


@torch.no_grad()
def sanity_check_base(args, base_dir: Path) -> dict:
    """Greedy chat reply and a WikiText-2 slice perplexity: a broken conversion shows up here."""
    model = load_model(str(base_dir), dtype="float32", device=args.device)
    tok = load_tokenizer(str(base_dir))
    out = {}
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_PROBE}], tokenize=False,
                                         add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
        gen = model.generate(**enc, max_new_tokens=12 if args.smoke else 30, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out["chat_reply"] = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        log(f"base greedy reply to {CHAT_PROBE!r}: {out['chat_reply']!r}")
    text = (args.data / "eval" / "wikitext2_test.txt").read_text(encoding="utf-8")[: 2000 if args.smoke else 50000]
    r = perplexity(model, tok, text, window=min(512, args.wikitext_window), stride=min(256, args.wikitext_stride),
                   batch_size=args.eval_batch, progress=False)
    out["wikitext_slice_ppl"], out["wikitext_slice_tokens"] = r.ppl, r.n_tokens
    log(f"base WikiText-2 slice perplexity {r.ppl:.2f} over {r.n_tokens} tokens")
    return out
