"""Base fingerprints: sample positions stay in bounds for 7B-sized matrices; verifying against samples
read beforehand (BaseSamples) gives the verdicts and errors of verifying against the weights."""

import torch

from bitdelta.errors import ShapeMismatchError, WrongBaseError
from bitdelta.fingerprint import SAMPLES_PER_MODULE, BaseSamples, Fingerprint, sample_positions, sample_weight


def test_sample_positions_in_bounds_for_large_matrices():
    # 32000 x 4096 (a Llama-2-7B embedding) and 128256 x 4096 exceed float32's exact integers.
    for numel in (1, 2, 9, 4096 * 4096, 2**24 + 3, 32000 * 4096, 128256 * 4096):
        pos = sample_positions(numel)
        assert pos.shape == (SAMPLES_PER_MODULE,)
        assert int(pos.min()) == 0 and int(pos.max()) == numel - 1
        assert bool((pos[1:] >= pos[:-1]).all())


def test_sample_positions_match_evenly_spaced_rounding():
    numel = 12345
    want = [round(i * (numel - 1) / (SAMPLES_PER_MODULE - 1) + 1e-9) for i in range(SAMPLES_PER_MODULE)]
    assert sample_positions(numel).tolist() == want


def _fingerprint(weights):
    return Fingerprint.from_samples({n: (tuple(w.shape), sample_weight(w)) for n, w in weights.items()})


def _verdict(fp, live):
    """None when ``live`` passes, else the error's type and message."""
    try:
        fp.verify(live, delta_name="d", base_name="base", model_name="model")
    except (WrongBaseError, ShapeMismatchError) as e:
        return type(e), str(e)
    return None


def _base():
    g = torch.Generator().manual_seed(0)
    return {"a.q_proj": torch.randn(24, 16, generator=g), "a.up_proj": torch.randn(40, 16, generator=g)}


def _with_sampled_values_changed(weights, count):
    """A copy of ``weights`` whose first ``count`` sampled values (over all modules) differ."""
    out = {n: w.clone() for n, w in weights.items()}
    changed = 0
    for w in out.values():
        for p in sample_positions(w.numel()).tolist():
            if changed == count:
                return out
            w.view(-1)[p] += 1.0
            changed += 1
    return out


def test_cached_samples_give_the_live_weights_verdicts_and_messages():
    base = _base()
    fp = _fingerprint(base)
    g = torch.Generator().manual_seed(1)
    wrong = {n: torch.randn(w.shape, generator=g) for n, w in base.items()}
    cases = {
        "right base": base,
        "fp16 cast": {n: w.half() for n, w in base.items()},
        "bf16 cast": {n: w.bfloat16() for n, w in base.items()},
        "wrong base": wrong,
        "wrong base in bf16": {n: w.bfloat16() for n, w in wrong.items()},
        "missing module": {"a.q_proj": base["a.q_proj"]},
        "shape mismatch": {"a.q_proj": base["a.q_proj"], "a.up_proj": torch.randn(16, 40, generator=g)},
        # 32 samples at MATCH_FRACTION 0.95: one differing value is tolerated, two are not
        "one sampled value off": _with_sampled_values_changed(base, 1),
        "two sampled values off": _with_sampled_values_changed(base, 2),
    }
    verdicts = {}
    for what, live in cases.items():
        verdicts[what] = _verdict(fp, live)
        assert _verdict(fp, BaseSamples.of(live)) == verdicts[what], what
    assert verdicts["right base"] is verdicts["fp16 cast"] is verdicts["bf16 cast"] is None
    assert verdicts["one sampled value off"] is None
    assert verdicts["wrong base"][0] is WrongBaseError and "different weights" in verdicts["wrong base"][1]
    assert verdicts["wrong base in bf16"][0] is WrongBaseError
    assert verdicts["two sampled values off"][0] is WrongBaseError
    assert verdicts["missing module"][0] is WrongBaseError and "'a.up_proj'" in verdicts["missing module"][1]
    assert verdicts["shape mismatch"][0] is ShapeMismatchError and "40x16" in verdicts["shape mismatch"][1]


def test_base_samples_keep_each_weights_dtype_and_read_each_weight_once():
    base = _base()
    reads = []

    class Lazy(dict):  # as a quantized base reads: each item made anew when asked for
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name).bfloat16()

    samples = BaseSamples.of(Lazy(base))
    assert sorted(reads) == sorted(base)
    assert all(samples.sample(n).dtype == torch.bfloat16 and samples.sample(n).device.type == "cpu" for n in base)
    samples.alias("lm_head", "a.q_proj")
    assert "lm_head" in samples and samples.shape("lm_head") == (24, 16)
    assert torch.equal(samples.sample("lm_head"), sample_weight(base["a.q_proj"].bfloat16()))
