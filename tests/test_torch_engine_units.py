"""Pure pieces of the torch engine by hand: the counter hash, sampling rules, KV relayout and masks."""

from __future__ import annotations

import math

import torch

from async_or1.generation.torch_kv import SlotKV, decode_mask, prefill_mask, relayout
from async_or1.generation.torch_sampling import mix32, mix32_int, request_key, sample, uniforms

NEG = torch.finfo(torch.float32).min


def test_mix32_matches_the_pure_integer_hash_including_wrapping_products():
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64)
    xs[:3] = torch.tensor([0, 2**32 - 1, 0x80000000])
    assert mix32(xs).tolist() == [mix32_int(int(x)) for x in xs]
    assert mix32_int(0) == 0 and mix32_int(1) == 0x514E28B7  # murmur3 fmix32(1)


def test_uniforms_are_in_range_roughly_uniform_and_keyed():
    keys = torch.full((20000,), request_key(5), dtype=torch.long)
    steps = torch.arange(20000)
    u = uniforms(keys, steps)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float((hist - 2000).abs().max()) < 200  # ~4.5 sigma for a binomial(20000, 0.1)
    other = uniforms(torch.full((20000,), request_key(6), dtype=torch.long), steps)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.03
    assert torch.equal(u[:50], uniforms(keys[:50], steps[:50]))  # pure function of (key, step)
    assert request_key(-1) != request_key(2**64 - 2) and request_key(7) == request_key(7)


def _probs_logits(p):
    return torch.tensor([p]).log()  # [1, V]


def test_top_p_keeps_tokens_while_the_mass_before_them_is_at_most_p():
    logits = _probs_logits([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    grid = (torch.arange(1000, dtype=torch.float32) + 0.5) / 1000  # u values, evenly spread
    one = torch.ones(1000)

    def counts(top_p, top_k=0):
        tok, lp = sample(logits.expand(1000, 4), one, torch.full((1000,), top_p), torch.full((1000,), top_k), grid)
        # reported log-probs are the unfiltered ones, whatever was kept
        assert torch.allclose(lp, logits[0].log_softmax(-1)[tok], atol=1e-6)
        return torch.bincount(tok, minlength=4).tolist()

    assert counts(0.75) == [0, 625, 0, 375]            # before-mass 0, .5 kept; .8 > .75 dropped
    # kept .5, .3, .15 (sum .95), drawn in vocabulary order (tokens 1, 2, 3): CDF boundaries
    # .5/.95 = .5263 and .65/.95 = .6842, so the u grid gives 526, 158, 316
    assert counts(0.85) == [0, 526, 158, 316]
    assert counts(1.0) == [50, 500, 150, 300]           # nothing filtered: exact inverse CDF
    assert counts(1.0, top_k=2) == [0, 625, 0, 375]
    assert counts(1.0, top_k=1) == [0, 1000, 0, 0]


def test_temperature_scales_logits_and_zero_probability_is_never_drawn():
    logits = torch.tensor([[2.0, -1.0, float("-inf"), 0.5]])
    t = torch.tensor([2.0])
    for u in (0.0, 0.5, 1 - 2**-24):
        tok, lp = sample(logits, t, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([u]))
        assert int(tok) != 2
        assert math.isclose(float(lp), float(torch.log_softmax(logits[0] / 2, -1)[tok]), abs_tol=1e-6)
    tok, _ = sample(logits, t, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([1 - 2**-24]))
    assert int(tok) == 3  # the last token with mass


def test_rows_are_sampled_independently_with_mixed_parameters():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    temp = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.7])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.8])
    top_k = torch.tensor([0, 0, 5, 0, 1, 10])
    u = torch.rand(6, generator=g)
    tok, lp = sample(logits, temp, top_p, top_k, u)
    for i in range(6):
        t1, l1 = sample(logits[i:i + 1], temp[i:i + 1], top_p[i:i + 1], top_k[i:i + 1], u[i:i + 1])
        assert int(t1) == int(tok[i]) and math.isclose(float(l1), float(lp[i]), abs_tol=1e-6)
    assert int(tok[4]) == int(logits[4].argmax())


def test_relayout_moves_rows_and_columns_by_hand():
    buf = torch.arange(3 * 1 * 5 * 1, dtype=torch.float32).view(3, 1, 5, 1)  # rows 0..2, cols 0..4
    out = relayout(buf, torch.tensor([2, 0]), n_rows=3, col_lo=1, col_hi=4, dst_lo=2, capacity=6)
    assert out.shape == (3, 1, 6, 1)
    assert out[0, 0, :, 0].tolist() == [0, 0, 11, 12, 13, 0]
    assert out[1, 0, :, 0].tolist() == [0, 0, 1, 2, 3, 0]
    assert out[2].abs().sum() == 0


def test_masks_by_hand():
    m = decode_mask(torch.tensor([1, 3]), n=3, lo=1, dtype=torch.float32)  # window columns 1..3
    assert m.shape == (2, 1, 1, 3)
    assert (m[:, 0, 0] == 0).tolist() == [[True, True, True], [False, False, True]]
    p = prefill_mask(torch.tensor([0, 2]), 3, torch.float32)
    assert p.shape == (2, 1, 3, 3)
    assert (p[0, 0] == 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # row 1: pad columns 0, 1; pad query rows see only themselves (finite softmax)
    assert (p[1, 0] == 0).tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert float(p.min()) == NEG


def test_slot_cache_writes_in_place_and_returns_the_window():
    kv = SlotKV(capacity=4)
    k = torch.ones(2, 1, 3, 2)
    ks, vs = kv.update(k, 2 * k, 0)
    assert ks.shape == (2, 1, 3, 2) and kv.capacity == 4
    kv.n, kv.lo = 3, 1
    ks, vs = kv.update(3 * torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
    assert ks[0, 0, :, 0].tolist() == [1, 1, 3]  # columns 1..3
    try:
        kv.n = 4
        kv.update(k[:, :, :1], k[:, :, :1], 0)
    except RuntimeError as e:
        assert "past capacity 4" in str(e)
    else:
        raise AssertionError("writing past capacity must fail")


def test_take_group_bounds_the_padded_prefill_and_keeps_request_order():
    from async_or1.generation.torch_batch import Admit, take_group

    def a(i, plen):
        return Admit(index=i, prompt=[1] * plen, max_new=1, key=0, temp=1.0, top_p=1.0, top_k=0, stop=[])

    waiting = [a(4, 9), a(3, 9), a(2, 2), a(1, 3), a(0, 4)]  # popped from the end: 0, 1, 2, ...
    g = take_group(waiting, free=8, token_budget=12)
    assert [x.index for x in g] == [0, 1, 2]  # 3 x 4 = 12 fits; a 4th would be 4 x 9 = 36
    assert [x.index for x in take_group(waiting, free=8, token_budget=12)] == [3]  # 2 x 9 > 12
    assert [x.index for x in take_group(waiting, free=0, token_budget=12)] == []
    waiting = [a(1, 50)]
    assert [x.index for x in take_group(waiting, free=1, token_budget=12)] == [1]  # always at least one
    assert take_group([], free=3, token_budget=12) == []
