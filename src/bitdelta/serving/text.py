"""Text side of serving: each tenant's tokenizer and chat template, incremental detokenising, stops.

The engine sees token ids only; the API turns prompts/messages into ids with the tenant's own
tokenizer (the fine-tune's files carried in its artifact, else the base's) and turns ids back into
text as they stream, holding back text that could still become a stop sequence.

    tt = TenantText.load("deltas/zephyr", fallback="base_dir")
    ids = tt.encode_chat([{"role": "user", "content": "hi"}])
    det = Detokenizer(tt, stop=["\\n\\n"]); piece, stopped = det.push(token_id)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Used only when neither the fine-tune nor the base ships a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _has_tokenizer(path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


class TenantText:
    """A tokenizer plus the ids that end generation (eos of the tokenizer and generation config)."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...], chat_template_source: str):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.chat_template_source = chat_template_source

    @classmethod
    def load(cls, path, fallback=None) -> "TenantText":
        from transformers import AutoTokenizer

        src = path if path is not None and _has_tokenizer(path) else fallback
        if src is None:
            raise ValueError(f"no tokenizer files in {path} and no fallback")
        tok = AutoTokenizer.from_pretrained(src)
        origin = "tokenizer"
        if not getattr(tok, "chat_template", None):
            base_tok = AutoTokenizer.from_pretrained(fallback) if fallback and src != fallback and _has_tokenizer(fallback) else None
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
