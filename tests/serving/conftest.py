"""Fixtures for the serving tests: the embedded default model set (models/tiny) and its deltas.

When models/tiny has not been built, a stand-in with the same layout is made locally: a random tiny
Llama base with a byte-level tokenizer and two noisy "fine-tunes" carrying their own chat templates.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny"
NAMES = ("base", "shakespeare", "gsm8k")
TEMPLATES = {
    "shakespeare": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    "gsm8k": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}",
}


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[2], model_max_length=256, clean_up_tokenization_spaces=False)


def _build_standin(out: Path) -> dict[str, Path]:
    from serving.engine_checks import tiny_llama  # only when models/tiny is missing: keeps collection light

    tok = _byte_tokenizer()
    base = tiny_llama(tok, max_positions=256)
    dirs = {}
    for i, name in enumerate(NAMES):
        model = copy.deepcopy(base)
        if name != "base":
            g = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 else 1.0))
        d = out / name
        model.save_pretrained(d)
        t = copy.deepcopy(tok)
        t.chat_template = TEMPLATES.get(name)
        t.save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Directories of the base and the two fine-tunes (models/tiny when it exists)."""
    if all((TINY / n / "config.json").exists() for n in NAMES):
        return {n: TINY / n for n in NAMES}
    return _build_standin(tmp_path_factory.mktemp("tiny-standin"))


@pytest.fixture(scope="session")
def delta_dir(tiny_models, tmp_path_factory) -> Path:
    """An allow-listed directory with the two default deltas (row scales)."""
    import bitdelta

    d = tmp_path_factory.mktemp("deltas")
    for name in ("shakespeare", "gsm8k"):
        bitdelta.compress(tiny_models["base"], tiny_models[name], scale="row", progress=False).save_pretrained(d / name)
    return d


@pytest.fixture(scope="session")
def corrupt_delta(delta_dir) -> Path:
    """A copy of a delta with its tensor file truncated."""
    bad = delta_dir / "corrupt"
    if not bad.exists():
        shutil.copytree(delta_dir / "gsm8k", bad)
        for f in bad.glob("*.safetensors"):
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
    return bad


# ---------------------------------------------------------------------------------- live servers


class LiveServer:
    """A real uvicorn server on a random loopback port, in a background thread."""

    def __init__(self, argv: list[str]):
        import socket
        import threading

        import uvicorn

        from bitdelta.cli import build_parser
        from bitdelta.serving.cli import build_app

        self.runtime, app = build_app(build_parser().parse_args(["serve", *argv]))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        import time

        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.runtime.shutdown()


@pytest.fixture(scope="session")
def live_server():
    """The :class:`LiveServer` class, for tests that start a server of their own (``from conftest import``
    in a test would find whichever conftest module pytest imported last)."""
    return LiveServer


@pytest.fixture(scope="session")
def wrong_base_delta(delta_dir, tiny_models, tmp_path_factory) -> Path:
    """A well-formed delta made against a different base of the same shapes."""
    from transformers import AutoModelForCausalLM

    import bitdelta

    tmp = tmp_path_factory.mktemp("other-base")
    other = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    other.save_pretrained(tmp / "base")
    out = delta_dir / "wrongbase"
    if not out.exists():
        bitdelta.compress(tmp / "base", tiny_models["shakespeare"], scale="row", progress=False).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def server(tiny_models, delta_dir, corrupt_delta, wrong_base_delta):
    """The main server: base + every artifact of the allow-listed dir, runtime deltas on (admin key 'adm')."""
    s = LiveServer(["--base", str(tiny_models["base"]), "--base-name", "base", "--delta-dir", str(delta_dir),
                    "--allow-runtime-deltas", "--admin-key", "adm", "--max-gpu-deltas", "3", "--max-batch", "16",
                    "--kv-cache-mb", "256"])
    yield s
    s.close()


@pytest.fixture(scope="session")
def keyed_server(tiny_models, delta_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text('[keys]\n"sk-shk" = ["shakespeare"]\n"sk-all" = ["*"]\n')
    s = LiveServer(["--base", str(tiny_models["base"]), "--base-name", "base",
                    "--delta", f"shakespeare={delta_dir / 'shakespeare'}", "--delta", f"gsm8k={delta_dir / 'gsm8k'}",
                    "--api-keys", str(keys), "--kv-cache-mb", "64"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client on the main server (an optional extra: skipped without it)."""
    openai = pytest.importorskip("openai")

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    """A raw ``httpx`` client on the main server (an optional extra: skipped without it)."""
    httpx = pytest.importorskip("httpx")

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
