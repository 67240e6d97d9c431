"""The engine's sampler: penalties, log-probabilities, seeds, stops, and their fault isolation.

Unit tests of :mod:`bitdelta.serving.sampling` on crafted logits, then the engine on the tiny base:
log-probabilities of generated and prompt tokens (a scored prefill over several steps) against the
Hugging Face model, a penalty that overflows failing only its request, stop and end tokens, and
the same tokens with the decode-graph layout (emulated on CPU, captured on CUDA).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from bitdelta.serving.engine import SCORED_PREFILL_CHUNK, Engine, InvalidRequest, Request, SamplingParams
from bitdelta.serving.graphs import DecodeGraphs
from bitdelta.serving.model import DeltaLlama
from bitdelta.serving.sampling import (
    LOGPROB_FLOOR,
    SEED_MAX,
    PenaltyTable,
    check_params,
    derive_seed,
    sample_step,
    token_logprobs,
)
from bitdelta.serving.slots import DeltaSlots

# ---------------------------------------------------------------------------------- units


class _Req:
    """What sample_step reads from an engine request."""

    def __init__(self, slot, params, seed=0):
        self.kv_slot, self.params, self.tenant, self.id = slot, params, None, slot
        self.generator = torch.Generator().manual_seed(seed)


def test_penalties_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g) * 3
    table = PenaltyTable(num_slots=4, width=8, device="cpu")  # columns 8, 9: added tokens, never penalised
    table.start(1, [2, 3, 3])
    table.start(3, [7])
    table.record([1, 1, 3], [4, 4, 5])  # slot 1 generated 4 twice, slot 3 generated 5
    table.record([1], [2])
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(repetition_penalty=0.5)]
    got = table.apply(x[:2], [1, 3], params)
    want = x[:2].clone()
    for row, (slot_seen, counts, p) in enumerate((({2, 3, 4}, {4: 2, 2: 1}, params[0]), ({7, 5}, {5: 1}, params[1]))):
        for t in slot_seen:
            v = want[row, t]
            want[row, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t, c in counts.items():
            want[row, t] -= p.frequency_penalty * c + p.presence_penalty
    torch.testing.assert_close(got, want)
    table.start(1, [])  # a new sequence in the slot starts clean
    torch.testing.assert_close(table.apply(x[:1], [1], [params[0]]), x[:1])


def test_token_logprobs_are_the_log_softmax_json_safe():
    x = torch.tensor([[2.0, 1.0, float("-inf"), 0.5], [1.0, float("nan"), 0.0, 0.0], [float("-inf")] * 4])
    got = token_logprobs(x, [0, 0, 1, 2], [1, 2, 0, 0], k=3)
    lp = torch.log_softmax(x[0], -1)
    assert got[0].token == 1 and got[0].logprob == pytest.approx(float(lp[1]))
    assert got[0].top == [(0, pytest.approx(float(lp[0]))), (1, pytest.approx(float(lp[1]))),
                          (3, pytest.approx(float(lp[3])))]
    assert got[1].logprob == LOGPROB_FLOOR  # a ruled-out token: no -inf in JSON
    assert got[2] is None and got[3] is None  # NaN in the row; nothing finite at all
    assert token_logprobs(x, [0], [99], k=0) == [None]  # a target past the vocabulary


def test_sampler_reports_raw_logprobs_and_fails_only_non_finite_rows():
    x = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 1.0, 0.0], [5.0, 0.0, 4.9]])
    reqs = [_Req(0, SamplingParams(temperature=0, logprobs=1)), _Req(1, SamplingParams(temperature=0)),
            _Req(2, SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2))]
    table = PenaltyTable(3, 3, "cpu")
    table.start(2, [0])  # token 0 was in the prompt: its logit 5 is halved, so 2 (4.9) wins
    out = sample_step(x, [0, 1, 2], reqs, table)
    assert out[0].token == 1 and out[0].logprob.top == [(1, pytest.approx(float(torch.log_softmax(x[0], -1)[1])))]
    assert out[1].token is None and out[1].code == "invalid_output"
    assert out[2].token == 2
    raw = torch.log_softmax(x[2], -1)
    assert out[2].logprob.logprob == pytest.approx(float(raw[2]))  # the model's, not the penalised one
    assert [t for t, _ in out[2].logprob.top] == [0, 2]
    assert table.counts[2].tolist() == [0, 0, 1]  # the sampled token counted for the next step


def test_derived_seeds_are_distinct_and_in_range():
    assert derive_seed(7, 0) == 7 and derive_seed(-5, 0) == -5
    seeds = {derive_seed(s, i) for s in (-(2**63), -2, 0, 7, 8, SEED_MAX) for i in range(1, 17)}
    assert len(seeds) == 6 * 16 and all(0 <= s <= SEED_MAX for s in seeds)
    assert derive_seed(7, 1) != derive_seed(8, 0) and derive_seed(7, 3) == derive_seed(7, 3)


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
                                         ("logprobs", 21), ("prompt_logprobs", -1), ("logprobs", True),
                                         ("seed", 2**64)])
def test_out_of_range_settings_are_refused(field, value):
    with pytest.raises(InvalidRequest) as e:
        check_params(SamplingParams(**{field: value}))
    assert e.value.param == field


# ---------------------------------------------------------------------------------- the engine


def _load(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_hf(tiny_models):
    return _load(tiny_models["base"])


def _engine(base_hf, **kw):
    model = DeltaLlama.from_hf(base_hf)
    return Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=4, kv_cache_mb=16, **kw)


def _run(engine, reqs, limit=400):
    events = {id(r): [] for r in reqs}
    for r in reqs:
        r.on_event = events[id(r)].append
        engine.submit(r)
    for _ in range(limit):
        if all(r.finish_reason is not None for r in reqs):
            return [events[id(r)] for r in reqs]
        engine.step()
    raise AssertionError("requests did not finish")


def _prompt(n, seed=0):
    return [0] + torch.randint(3, 2048, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_engine_logprobs_and_scored_prompts_equal_the_model(base_hf):
    engine = _engine(base_hf)
    long_prompt, short = _prompt(SCORED_PREFILL_CHUNK + 30, 1), _prompt(9, 2)
    reqs = [Request(prompt=long_prompt,
                    params=SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)),
            Request(prompt=short, params=SamplingParams(max_tokens=12, temperature=0)),  # decodes meanwhile
            Request(prompt=short, params=SamplingParams(max_tokens=6, temperature=1.3, seed=3, logprobs=0,
                                                        prompt_logprobs=0, frequency_penalty=1.0))]
    events = _run(engine, reqs)
    for r, evs in zip(reqs, events):
        full = r.prompt + r.output
        want = torch.log_softmax(base_hf(torch.tensor([full])).logits[0].float(), -1)
        tokens = [e for e in evs if e.token is not None]
        if r.params.logprobs is not None:
            assert [e.logprob.token for e in tokens] == r.output
            for i, e in enumerate(tokens):
                row = want[len(r.prompt) - 1 + i]
                assert e.logprob.logprob == pytest.approx(float(row[e.token]), abs=2e-4)
                assert [t for t, _ in e.logprob.top] == row.topk(r.params.logprobs).indices.tolist()
        if r.params.prompt_logprobs is not None:
            scores = next(e.prompt_logprobs for e in evs if e.prompt_logprobs is not None)
            assert evs.index(next(e for e in evs if e.prompt_logprobs is not None)) == 0  # before any token
            assert scores[0] is None and len(scores) == len(r.prompt)
            got = [s.logprob for s in scores[1:]]
            assert got == pytest.approx([float(want[i - 1, r.prompt[i]]) for i in range(1, len(r.prompt))], abs=2e-4)
            assert all(len(s.top) == r.params.prompt_logprobs for s in scores[1:])
    # the short greedy request is what it is alone
    alone = _run(_engine(base_hf), [Request(prompt=short, params=SamplingParams(max_tokens=12, temperature=0))])
    assert [e.token for e in alone[0] if e.token is not None] == reqs[1].output


def test_a_penalty_that_overflows_fails_only_its_request(base_hf):
    """A logit near float32's limit divided by a repetition penalty of 0.01 is +inf: that request
    ends with invalid_output; the unpenalised one beside it reads the same logits and goes on."""
    prompt = [0, 40, 41, 42]

    def huge(run, batch):
        logits = run()
        logits[:, 41] = 1e37  # a token of the prompt
        return logits

    engine = _engine(base_hf, wrap_forward=huge)
    bad = Request(prompt=prompt, params=SamplingParams(max_tokens=4, temperature=0, repetition_penalty=0.01))
    good = Request(prompt=prompt, params=SamplingParams(max_tokens=4, temperature=0))
    sampled = Request(prompt=prompt, params=SamplingParams(max_tokens=4, temperature=0.8, seed=1,
                                                           repetition_penalty=0.01))
    events = _run(engine, [bad, good, sampled])
    for r, evs in ((bad, events[0]), (sampled, events[2])):
        assert r.finish_reason == "error" and evs[-1].code == "invalid_output" and "non-finite" in evs[-1].error
    assert good.finish_reason == "length" and good.output == [41] * 4
    assert engine.request_errors == 2
    assert sorted(engine.free_kv) == list(range(engine.max_batch))


def test_stop_ids_always_stop_and_end_tokens_unless_ignored(base_hf):
    prompt = _prompt(6, 4)
    ref = Request(prompt=prompt, params=SamplingParams(max_tokens=12, temperature=0))
    _run(_engine(base_hf), [ref])
    out = ref.output
    k = next(i for i in range(2, len(out)) if out[i] not in out[:i])
    cases = [(dict(eos_token_ids=(out[k],)), "stop", out[:k + 1]),
             (dict(eos_token_ids=(out[k],), ignore_eos=True), "length", out),
             (dict(stop_token_ids=(out[k],), ignore_eos=True), "stop", out[:k + 1])]
    reqs = [Request(prompt=prompt, params=SamplingParams(max_tokens=12, temperature=0, **kw)) for kw, _, _ in cases]
    events = _run(_engine(base_hf), reqs)
    for r, evs, (_, finish, output) in zip(reqs, events, cases):
        assert r.finish_reason == finish and r.output == output
        assert [e.token for e in evs if e.token is not None] == out[:k] if finish == "stop" else out  # never sent


def _workload(engine):
    prompts = [_prompt(7, 5), _prompt(11, 6), _prompt(5, 7)]
    params = [SamplingParams(max_tokens=10, temperature=0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=2),
              SamplingParams(max_tokens=10, temperature=0.9, seed=9, repetition_penalty=1.3, logprobs=1),
              SamplingParams(max_tokens=10, temperature=0, repetition_penalty=2.0)]
    reqs = [Request(prompt=p, params=s) for p, s in zip(prompts, params)]
    events = _run(engine, reqs)
    return [r.output for r in reqs], [[e.logprob.logprob for e in evs if e.logprob] for evs in events]


def test_emulated_graph_decode_keeps_penalties_and_logprobs(base_hf):
    eager_tokens, eager_lps = _workload(_engine(base_hf))
    engine = _engine(base_hf)
    engine.graphs = DecodeGraphs(engine.model, engine.kv, engine.slots, engine.max_batch, capture=False, min_span=8)
    tokens, lps = _workload(engine)
    assert engine.graphs.replays >= 5 and tokens == eager_tokens
    for a, b in zip(lps, eager_lps):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.cuda
def test_cuda_graph_decode_keeps_penalties_and_logprobs(base_hf):
    model = DeltaLlama.from_hf(base_hf, device="cuda")
    eager = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=4, cuda_graphs=False, kv_cache_mb=64)
    want_tokens, want_lps = _workload(eager)
    graphed = Engine(model, DeltaSlots(model, max_gpu_deltas=1), max_batch=4, cuda_graphs=True, kv_cache_mb=64)
    tokens, lps = _workload(graphed)
    assert graphed.graphs.replays >= 5 and tokens == want_tokens
    for a, b in zip(lps, want_lps):
        assert a == pytest.approx(b, abs=1e-4)
