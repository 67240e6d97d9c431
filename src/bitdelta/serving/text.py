"""Text side of serving: each tenant's tokenizer and chat template, incremental detokenising, stops.

The engine sees token ids only; the API turns prompts/messages into ids with the tenant's own
tokenizer (the fine-tune's files carried in its artifact, else the base's) and turns ids back into
text as they stream, holding back text that could still become a stop sequence. Generation ends at
the tokenizer's end tokens (``eos_ids``: its eos and the generation config's) and, for chat, also at
the special token the chat template puts after an assistant turn (``chat_end_ids``, e.g.
``<|im_end|>``). Log-probabilities name tokens by their text and their exact bytes
(:meth:`TenantText.token_text`, :meth:`TenantText.token_bytes`).

    tt = TenantText.load("deltas/zephyr", fallback="base_dir")
    ids = tt.encode_chat([{"role": "user", "content": "hi"}])
    det = Detokenizer(tt, stop=["\\n\\n"]); piece, stopped = det.push(token_id)
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

# Used only when neither the fine-tune nor the base ships a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# A marker no chat template produces by itself: where an assistant turn's content ends.
_TURN_MARKER = "\u2063bitdelta-turn-end\u2063"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # the alphabet maps printable bytes to themselves and the rest to 256 + their rank
    table, extra = {}, 0
    for b in range(256):
        ch = chr(b)
        if ch in alphabet and (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255):
            table[ch] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kinds(tokenizer) -> set[str]:
    """The decoder types of a fast tokenizer (``ByteLevel``, ``Metaspace``, ``Replace``, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    if dec is None:
        return set()
    try:
        state = json.loads(dec.__getstate__())
    except Exception:  # noqa: BLE001 (an unusual decoder: fall back to decoding token by token)
        return set()
    parts = state.get("decoders") or [state]
    return {d.get("type") for d in parts if isinstance(d, dict)}


def chat_end_ids(tokenizer) -> tuple[int, ...]:
    """The special token a chat template writes right after an assistant turn (empty if none, or
    if the template cannot render a plain user/assistant exchange)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": _TURN_MARKER}], tokenize=False)
    except Exception:  # noqa: BLE001 (templates may refuse this exchange; then nothing to add)
        return ()
    at = text.rfind(_TURN_MARKER) if isinstance(text, str) else -1
    if at < 0:
        return ()
    tail = tokenizer(text[at + len(_TURN_MARKER):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return next(((int(t),) for t in tail if t in special), ())


def _has_tokenizer(path) -> bool:
    p = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return p.is_dir() and any((p / f).exists() for f in names)


class TenantText:
    """A tokenizer plus the ids that end generation (eos of the tokenizer and generation config)."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...], chat_template_source: str):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.chat_template_source = chat_template_source
        self.chat_end_ids = tuple(t for t in chat_end_ids(tokenizer) if t not in eos_ids)
        kinds = _decoder_kinds(tokenizer)
        self._byte_level = "ByteLevel" in kinds
        self._metaspace = bool(kinds & {"Metaspace", "Replace"})
        self._special = set(tokenizer.all_special_ids)
        self._texts: dict[int, tuple[str, bytes]] = {}

    @classmethod
    def load(cls, path, fallback=None) -> "TenantText":
        from transformers import AutoTokenizer

        src = path if path is not None and _has_tokenizer(path) else fallback
        if src is None:
            raise ValueError(f"no tokenizer files in {path} and no fallback")
        tok = AutoTokenizer.from_pretrained(src)
        origin = "tokenizer"
        if not getattr(tok, "chat_template", None):
            base_tok = None
            if fallback and src != fallback and _has_tokenizer(fallback):
                base_tok = AutoTokenizer.from_pretrained(fallback)
            if base_tok is not None and getattr(base_tok, "chat_template", None):
                tok.chat_template, origin = base_tok.chat_template, "base"
            else:
                tok.chat_template, origin = DEFAULT_CHAT_TEMPLATE, "default"
        eos = set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        for d in (path, fallback):
            gc = Path(d) / "generation_config.json" if d else None
            if gc is not None and gc.exists():
                try:
                    e = json.loads(gc.read_text()).get("eos_token_id")
                    eos.update([e] if isinstance(e, int) else (e or []))
                except (OSError, ValueError):
                    pass
                break
        return cls(tok, tuple(sorted(eos)), origin)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes ``token`` adds to a text (a special token: its name)."""
        return self._token(token)[1]

    def token_text(self, token: int) -> str:
        """``token`` as text; a token that ends inside a character is ``bytes:\\xNN...``, as OpenAI writes it."""
        return self._token(token)[0]

    def _token(self, token: int) -> tuple[str, bytes]:
        got = self._texts.get(token)
        if got is None:
            got = self._texts[token] = self._describe(token)
        return got

    def _describe(self, token: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):  # past the tokenizer's vocabulary (an id only a delta's head has)
            return f"<|token_{token}|>", b""
        if token in self._special:
            return piece, piece.encode()
        raw = None
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:  # SentencePiece byte fallback
            raw = bytes([int(m.group(1), 16)])
        elif self._byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
        elif self._metaspace:
            raw = piece.replace("\u2581", " ").encode()
        if raw is None:
            raw = self.tokenizer.decode([token], skip_special_tokens=False).encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class Detokenizer:
    """Turns a token stream into text pieces; stops at the first stop string (excluded from the text)."""

    def __init__(self, text: TenantText, stop: list[str] | None = None):
        self.text = text
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.full = ""
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """Adds a token; returns (new text safe to send, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        self.full = self.text.decode(self.ids)
        if self.stop:
            hits = [i for i in (self.full.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.full = self.full[:cut]
                self.stopped = True
                piece = self.full[self.sent:]
                self.sent = len(self.full)
                return piece, True
        end = len(self.full) - self.hold
        if self.full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            end = min(end, len(self.full) - 1)
        if end <= self.sent:
            return "", False
        piece = self.full[self.sent:end]
        self.sent = end
        return piece, False

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        piece = self.full[self.sent:]
        self.sent = len(self.full)
        return piece
