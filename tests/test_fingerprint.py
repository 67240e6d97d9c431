"""Base fingerprint sampling: positions stay in bounds for 7B-sized matrices."""


from bitdelta.fingerprint import SAMPLES_PER_MODULE, sample_positions


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
