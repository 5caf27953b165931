"""Torch engine on a real (tiny, random) Qwen2 loaded with from_pretrained: log-probs against a
teacher-forced forward, continuous refilling, batch invariance, stop tokens, in-flight versions, abort."""

from __future__ import annotations

import pytest
import torch

from async_or1.generation.engine import GenRequest, SamplingParams
from async_or1.generation.torch_engine import TorchEngine

VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture
def engine(model_dir):
    return TorchEngine(model_dir, max_batch_size=3, seed=7)


def _requests(n, data_seed=0, **kw):
    g = torch.Generator().manual_seed(data_seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(1, 25, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (plen,), generator=g).tolist()
        params = dict(temperature=1.0, max_new_tokens=6 + 5 * i)
        params.update({k: (v(i) if callable(v) else v) for k, v in kw.items()})
        out.append(GenRequest(f"r{i}", prompt, SamplingParams(**params)))
    return out


def _teacher_logprobs(model, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [P + L, V]
    lp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return lp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_logprobs_match_teacher_forcing(engine, temperature):
    reqs = _requests(7, data_seed=1, temperature=temperature, top_p=lambda i: 0.9 if i % 2 else 1.0,
                     top_k=lambda i: 20 if i % 3 == 0 else -1)
    results = engine.generate(reqs)
    for q, r in zip(reqs, results):
        assert r.request_id == q.request_id
        assert len(r.tokens) == len(r.logprobs) == len(r.versions) == q.params.max_new_tokens
        assert r.finish_reason == "length"
        want = _teacher_logprobs(engine.model, q.prompt_ids, r.tokens, temperature)
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0), q.request_id


def test_refilling_keeps_slots_busy_and_matches_running_alone(engine):
    # 2 slots; one 40-token request and seven 5-token ones. Static batching would need 39 + 3*4
    # decode steps; refilling runs the short ones in the other slot while the long one decodes.
    eng = TorchEngine(engine.model.name_or_path, max_batch_size=2, seed=3)
    reqs = _requests(8, data_seed=2, temperature=1.3, top_p=0.95, max_new_tokens=lambda i: 40 if i == 0 else 5,
                     seed=lambda i: 1000 + i)
    steps = []
    results = eng.generate(reqs, between_steps=lambda: steps.append(1))
    assert [len(r.tokens) for r in results] == [40] + [5] * 7
    assert len(steps) == 39  # the first token of each request comes from its prefill
    for q, r in zip(reqs, results):  # per-request seeds: batch composition does not matter
        alone = eng.generate([q])[0]
        assert alone.tokens == r.tokens, q.request_id
        assert max(abs(a - b) for a, b in zip(alone.logprobs, r.logprobs)) < 1e-5


def test_requests_from_more_join_the_running_batch(engine):
    """Continuous leasing: requests handed over by ``more`` mid-run (one with a longer budget and
    an extra stop token than the batch was built for) sample exactly what they sample alone, and
    every result reaches ``on_result`` the moment its request finishes."""
    eng = TorchEngine(engine.model.name_or_path, max_batch_size=3, seed=3)
    reqs = _requests(6, data_seed=5, temperature=1.1, seed=lambda i: 300 + i,
                     max_new_tokens=lambda i: [30, 4, 4, 50, 3, 8][i])
    reqs[3].params.stop_token_ids = [VOCAB + 5, VOCAB + 6]  # never sampled: widens the stop buffer only
    first, later = reqs[:3], {3: [reqs[3], reqs[4]], 12: [reqs[5]]}
    steps, seen = [0], []

    def more():
        return later.pop(steps[0], [])

    def on_result(r):
        seen.append((steps[0], r.request_id))

    results = eng.generate(first, between_steps=lambda: steps.__setitem__(0, steps[0] + 1), on_result=on_result,
                           more=more)
    assert [r.request_id for r in results] == [q.request_id for q in reqs]  # submission order
    assert [len(r.tokens) for r in results] == [30, 4, 4, 50, 3, 8]
    assert sorted(rid for _, rid in seen) == sorted(q.request_id for q in reqs)
    done_at = dict((rid, step) for step, rid in seen)
    assert done_at["r1"] < done_at["r0"] and done_at["r4"] < done_at["r3"]  # handed over when finished
    assert done_at["r5"] < done_at["r3"]      # joined at step 12 and finished while r3 still ran
    for q, r in zip(reqs, results):
        alone = eng.generate([q])[0]
        assert alone.tokens == r.tokens, q.request_id
        assert max(abs(a - b) for a, b in zip(alone.logprobs, r.logprobs)) < 1e-5
    assert eng.generate([], more=lambda: []) == []


def test_prefill_budget_and_bf16_do_not_change_what_is_sampled(model_dir):
    reqs = _requests(6, data_seed=8, temperature=0.9, seed=lambda i: 50 + i)
    wide = TorchEngine(model_dir, max_batch_size=4).generate(reqs)
    narrow = TorchEngine(model_dir, max_batch_size=4, prefill_tokens=1).generate(reqs)  # newcomers one by one
    assert [r.tokens for r in wide] == [r.tokens for r in narrow]
    half = TorchEngine(model_dir, max_batch_size=4, dtype="bfloat16")
    for q, r in zip(reqs, half.generate(reqs)):
        assert len(r.tokens) == q.params.max_new_tokens
        want = _teacher_logprobs(half.model, q.prompt_ids, r.tokens, 0.9)  # bf16 noise, not a logic error
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=0.02, rtol=0)


def test_greedy_is_argmax_and_temperature_zero_equals_top_k_one(engine):
    reqs = _requests(4, data_seed=3, temperature=0.0)
    res = engine.generate(reqs)
    res_k1 = engine.generate(_requests(4, data_seed=3, temperature=1.0, top_k=1))
    for q, r, r1 in zip(reqs, res, res_k1):
        assert r.tokens == r1.tokens
        ids = torch.tensor([q.prompt_ids + r.tokens])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(q.prompt_ids) - 1:-1]
        assert logits.argmax(-1).tolist() == r.tokens
        want = _teacher_logprobs(engine.model, q.prompt_ids, r.tokens, 1.0)  # greedy reports T = 1
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)


def test_stop_token_is_kept_and_ends_the_response(engine):
    q = _requests(1, data_seed=4, temperature=0.0, max_new_tokens=30)[0]
    free = engine.generate([q])[0].tokens
    stop = free[5]
    first = free.index(stop)
    q.params.stop_token_ids = [VOCAB - 1, stop]
    r = engine.generate([q])[0]
    assert r.finish_reason == "stop"
    assert r.tokens == free[:first + 1] and r.tokens[-1] == stop


def test_same_engine_seed_reproduces_and_different_seed_differs(model_dir):
    a = TorchEngine(model_dir, max_batch_size=3, seed=11).generate(_requests(5, data_seed=5, max_new_tokens=12))
    b = TorchEngine(model_dir, max_batch_size=3, seed=11).generate(_requests(5, data_seed=5, max_new_tokens=12))
    c = TorchEngine(model_dir, max_batch_size=3, seed=12).generate(_requests(5, data_seed=5, max_new_tokens=12))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def _perturbed(model, scale=0.05, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()]


def test_weights_switch_in_flight_and_later_tokens_carry_the_new_version(model_dir):
    eng = TorchEngine(model_dir, max_batch_size=2, seed=1, version=4)
    new = _perturbed(eng.model)
    reqs = _requests(4, data_seed=6, max_new_tokens=lambda i: [12, 12, 3, 3][i])
    steps = []

    def between():
        steps.append(1)
        if len(steps) == 5:
            eng.load_state(new, 5)

    res = eng.generate(reqs, between_steps=between)
    # rows 0 and 1 ran from the start: tokens 0..5 (prefill + 5 steps) under v4, the rest under v5
    for r in res[:2]:
        assert r.versions == [4] * 6 + [5] * 6
    for r in res[2:]:  # admitted after the switch: all new, and exactly the new policy's log-probs
        assert r.versions == [5] * 3
    for q, r in zip(reqs[2:], res[2:]):
        want = _teacher_logprobs(eng.model, q.prompt_ids, r.tokens, 1.0)
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)
    state = dict(eng.model.named_parameters())
    for n, t in new:
        assert torch.equal(state[n], t)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight  # still tied
    assert eng.version == 5


def test_load_state_rejects_bad_updates_and_keeps_the_version(engine):
    good = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    with pytest.raises(ValueError, match="unknown parameter names.*'nope'"):
        engine.load_state(good + [("nope", torch.zeros(1))], 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        engine.load_state([(n, t if i else t[:-1]) for i, (n, t) in enumerate(good)], 1)
    with pytest.raises(ValueError, match="not in the update"):
        engine.load_state(good[1:], 1)
    assert engine.version == 0
    engine.load_state([(n, t) for n, t in good if n != "model.embed_tokens.weight"]
                      + [("lm_head.weight", dict(good)["model.embed_tokens.weight"])], 2)  # tied alias counts
    assert engine.version == 2


def test_abort_finishes_running_and_waiting_requests(engine):
    reqs = _requests(6, data_seed=7, max_new_tokens=20)
    steps = []

    def between():
        steps.append(1)
        if len(steps) == 3:
            engine.abort()

    res = engine.generate(reqs, between_steps=between)
    assert [r.finish_reason for r in res] == ["aborted"] * 6
    assert [len(r.tokens) for r in res] == [4, 4, 4, 0, 0, 0]  # 3 slots: prefill token + 3 steps
    again = engine.generate(reqs[:1])  # the abort does not outlive its generate()
    assert again[0].finish_reason == "length" and len(again[0].tokens) == 20


def test_invalid_requests_fail_loudly(engine):
    with pytest.raises(ValueError, match="'bad'.*empty"):
        engine.generate([GenRequest("bad", [], SamplingParams())])
    with pytest.raises(ValueError, match="'bad'.*outside the vocabulary"):
        engine.generate([GenRequest("bad", [1, VOCAB], SamplingParams())])
    with pytest.raises(ValueError, match="'bad'.*top_p"):
        engine.generate([GenRequest("bad", [1], SamplingParams(top_p=0.0))])
    assert engine.generate([]) == []


def test_mixed_lengths_stress_matches_alone_and_teacher_forcing(model_dir):
    # Prompts 1-60 and 1-50 new tokens over 6 slots with a small prefill budget: exercises slot
    # growth, left-shifting for longer newcomers, capacity growth and shrinking of the cache.
    eng = TorchEngine(model_dir, max_batch_size=6, prefill_tokens=64)
    g = torch.Generator().manual_seed(12)
    reqs = []
    for i in range(24):
        plen, new = int(torch.randint(1, 61, (1,), generator=g)), int(torch.randint(1, 51, (1,), generator=g))
        reqs.append(GenRequest(f"s{i}", torch.randint(0, VOCAB, (plen,), generator=g).tolist(),
                               SamplingParams(temperature=0.8, top_p=0.9 if i % 2 else 1.0, max_new_tokens=new,
                                              stop_token_ids=[3, 4], seed=i)))
    results = eng.generate(reqs)
    for q, r in zip(reqs, results):
        alone = eng.generate([q])[0]
        assert (alone.tokens, alone.finish_reason) == (r.tokens, r.finish_reason), q.request_id
        want = _teacher_logprobs(eng.model, q.prompt_ids, r.tokens, 0.8)
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0), q.request_id
        assert r.finish_reason == ("stop" if r.tokens[-1] in (3, 4) else "length")
