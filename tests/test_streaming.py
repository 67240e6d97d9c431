"""Compression streams from safetensors: peak memory is a few modules, not two models.

Builds a base/fine-tune pair of ~165 MB each (written straight to safetensors, never held as
two models), compresses it in a fresh process and compares that process's peak RSS growth
with the size of one model.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file

from bitdelta.sources import meta_model


def _write_model(cfg, path, seed, base_params=None):
    path.mkdir()
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in meta_model(cfg).named_parameters():
        if base_params is not None:
            t = base_params[name] + torch.randn(p.shape, generator=g) * 1e-3
        else:
            t = torch.randn(p.shape, generator=g) * 0.02
        tensors[name] = t
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    return tensors


@pytest.mark.slow  # a fresh process compresses a 165 MB pair
def test_peak_rss_is_a_few_modules(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    base = _write_model(cfg, tmp_path / "base", 0)
    model_bytes = sum(t.numel() * 4 for t in base.values())
    _write_model(cfg, tmp_path / "ft", 1, base_params=base)
    largest_module = max(t.numel() * 4 for t in base.values())
    del base
    script = textwrap.dedent(f"""
        import json, torch, bitdelta, transformers
        from bitdelta.sources import load_config, meta_model
        torch.set_num_threads(2)
        meta_model(load_config(__import__("pathlib").Path("{tmp_path / 'base'}")))  # imports, not data
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = status("VmRSS")
        delta = bitdelta.compress("{tmp_path / 'base'}", "{tmp_path / 'ft'}", progress=False)
        print(json.dumps({{"before": before, "peak": status("VmHWM"), "delta_bytes": delta.nbytes()}}))
    """)
    import os

    # Serve allocations of 1 MB and up with mmap so freed tensors leave RSS at once; otherwise
    # glibc keeps freed heap pages around and RSS measures the allocator, not our working set.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1000000")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    print(f"model {model_bytes / 1e6:.0f} MB each (pair {2 * model_bytes / 1e6:.0f} MB), largest module "
          f"{largest_module / 1e6:.1f} MB, delta {m['delta_bytes'] / 1e6:.1f} MB, "
          f"peak RSS growth {growth / 1e6:.1f} MB")
    assert m["delta_bytes"] < model_bytes / 25
    # a few modules' worth of working memory plus the packed result, far below one model (holding the
    # base or the fine-tune whole would be 159 MB here). The peak varies from run to run on the same
    # code (32-57 MB seen on a 2-core machine, in two clusters; the cause is not pinned down), hence the room.
    assert growth < 0.5 * model_bytes
    assert growth < m["delta_bytes"] + 16 * largest_module
