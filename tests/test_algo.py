"""The RL maths against numbers worked out by hand (in the comments)."""

import math

import pytest
import torch

from async_or1.algo import (AdaptiveEntropy, grpo_advantages, kl_k1, kl_k3, logprobs_and_entropy,
                            naive_logprobs_and_entropy, policy_loss, truncation_mask)


# ---- advantages -------------------------------------------------------------------------------

def test_grpo_advantages_hand_values():
    # group 0: rewards [1, 0, 1, 1]: mean 0.75; deviations [.25, -.75, .25, .25];
    # unbiased var = (3·0.0625 + 0.5625)/3 = 0.25 → std 0.5 → A = dev / 0.500001
    # group 1: rewards [0, 1]: mean 0.5, unbiased std = sqrt(0.5) → A = ∓0.5/0.7071078
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([3, 3, 3, 3, 8, 8])
    a = grpo_advantages(r, g)
    e = 0.5 + 1e-6
    s = math.sqrt(0.5) + 1e-6
    assert a.tolist() == pytest.approx([0.25 / e, -0.75 / e, 0.25 / e, 0.25 / e, -0.5 / s, 0.5 / s], rel=1e-6)


def test_grpo_zero_variance_and_singleton_groups_get_zero():
    a = grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 0.3]), torch.tensor([0, 0, 0, 1]))
    assert a.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_groups_need_not_be_contiguous():
    a = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 1, 0, 1]))
    # each group {1, 0}: ±0.5 / (sqrt(0.5) + 1e-6)
    v = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert a.tolist() == pytest.approx([v, -v, -v, v], rel=1e-6)


# ---- policy loss ------------------------------------------------------------------------------

def _lp(ratios):
    return torch.log(torch.tensor(ratios, dtype=torch.float64))


def test_policy_loss_clip_higher_hand_values():
    # One row, four tokens, A = +1; ε_low 0.2, ε_high 0.28; old logp 0.
    # ratios [1.0, 1.5, 0.5, 1.1] → clipped at 1.28 for 1.5 (A>0: min(1.5, 1.28) = 1.28);
    # 0.5 stays 0.5 (min(0.5, 0.8) = 0.5 for A>0); pg = −[1.0, 1.28, 0.5, 1.1]; mean = −3.88/4 = −0.97
    lp = _lp([[1.0, 1.5, 0.5, 1.1]])
    loss, st = policy_loss(lp, torch.zeros_like(lp), torch.tensor([1.0], dtype=torch.float64), torch.ones_like(lp),
                           clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.97)
    assert st["clip_high_count"].item() == 1 and st["clip_low_count"].item() == 0
    assert st["clip_frac_high"].item() == pytest.approx(0.25)
    assert st["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1) / 4)


def test_policy_loss_negative_advantage_clips_low_side():
    # A = −2, ratios [0.5, 1.5]: token 1: min(0.5·−2, 0.8·−2) = min(−1, −1.6) = −1.6 → pg 1.6 (clipped low);
    # token 2: min(1.5·−2, 1.2·−2) = −3 → pg 3 (unclipped: the pessimistic branch). mean = 2.3
    lp = _lp([[0.5, 1.5]])
    loss, st = policy_loss(lp, torch.zeros_like(lp), torch.tensor([-2.0], dtype=torch.float64), torch.ones_like(lp),
                           clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(2.3)
    assert st["clip_low_count"].item() == 1 and st["clip_high_count"].item() == 0


def test_policy_loss_boundary_ratio_is_not_clipped():
    lp = _lp([[1.2, 0.8]])
    _, st = policy_loss(lp, torch.zeros_like(lp), torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                        torch.ones_like(lp), clip_low=0.2, clip_high=0.2)
    assert st["clip_high_count"].item() == 0 and st["clip_low_count"].item() == 0


def test_policy_loss_token_level_global_mean_and_entropy():
    # Row 0 has 3 tokens, row 1 has 1 (mask). All ratios 1: pg = −A. A = [1, −1].
    # Σ pg = −3 + 1 = −2; entropy 0.5 everywhere, coef 0.1 → −0.1·0.5·4 = −0.2; num_tokens 4 → −2.2/4
    lp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    ent = torch.full((2, 3), 0.5, dtype=torch.float64)
    loss, st = policy_loss(lp, lp.clone(), torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                           entropy=ent, entropy_coef=0.1)
    assert loss.item() == pytest.approx(-2.2 / 4)
    assert st["entropy_mean"].item() == pytest.approx(0.5)
    # A per-sequence mean would give ((−3/3) + (1/1))/2 = 0 instead: token-level is not that.
    assert loss.item() != pytest.approx(0.0)


def test_micro_batches_with_global_num_tokens_equal_the_full_batch():
    torch.manual_seed(0)
    lp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    old = torch.randn(4, 5, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    mask = (torch.rand(4, 5) > 0.3).double()
    full, _ = policy_loss(lp, old, adv, mask, clip_high=0.28)
    g_full, = torch.autograd.grad(full, lp)
    n = mask.sum()
    a, _ = policy_loss(lp[:2], old[:2], adv[:2], mask[:2], clip_high=0.28, num_tokens=n)
    b, _ = policy_loss(lp[2:], old[2:], adv[2:], mask[2:], clip_high=0.28, num_tokens=n)
    g_parts, = torch.autograd.grad(a + b, lp)
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(g_parts, g_full, atol=1e-12)


def test_all_masked_gives_zero_not_nan():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, st = policy_loss(lp, lp.detach(), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.all(lp.grad == 0)


def test_weight_scales_the_token_loss_and_carries_no_gradient():
    # weight 2 (e.g. a capped behaviour ratio), ratio 1, A = 1 → pg = −1 · 2 = −2; d/dlp = −2
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.full((1, 1), 2.0, dtype=torch.float64, requires_grad=True)
    loss, st = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                           torch.ones(1, 1, dtype=torch.float64), weight=w)
    assert loss.item() == pytest.approx(-2.0) and st["weight_mean"].item() == pytest.approx(2.0)
    g_lp, g_w = torch.autograd.grad(loss, [lp, w], allow_unused=True)
    assert g_lp.item() == pytest.approx(-2.0) and g_w is None  # the weight scales, it is not optimised


def test_unclipped_surrogate_has_no_trust_region():
    # ratio 2, A = +1: clipped −min(2, 1.28) = −1.28 (no gradient); unclipped −2 with gradient −2
    lp = torch.full((1, 1), math.log(2.0), dtype=torch.float64, requires_grad=True)
    old, a, m = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.ones(1, 1)
    clipped, st = policy_loss(lp, old, a, m.double(), clip_high=0.28)
    free, st_free = policy_loss(lp, old, a, m.double(), clip_high=0.28, clip=False)
    assert clipped.item() == pytest.approx(-1.28) and free.item() == pytest.approx(-2.0)
    assert torch.autograd.grad(clipped, lp)[0].item() == 0.0
    assert torch.autograd.grad(free, lp)[0].item() == pytest.approx(-2.0)
    assert st["clip_high_count"].item() == 1 and st_free["clip_high_count"].item() == 0


def test_kl_k3_hand_value_and_term():
    # d = ref − logp = log 2 → e^d − d − 1 = 2 − 0.693147 − 1 = 0.306853
    lp = torch.zeros(1, 1, dtype=torch.float64)
    ref = lp + math.log(2.0)
    assert kl_k3(lp, ref).item() == pytest.approx(1 - math.log(2.0))
    loss, st = policy_loss(lp, lp.clone(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                           kl_coef=0.5, ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2.0)))
    assert st["kl_mean"].item() == pytest.approx(1 - math.log(2.0))
    with pytest.raises(ValueError):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1), kl_coef=0.5)


def test_kl_k1_and_k3_gradients_by_hand():
    # logp = log 0.5, ref = log 0.25 (d = ref − logp = −log 2):
    #   k1 = logp − ref = log 2 = 0.693147, d k1/d logp = 1
    #   k3 = e^d − d − 1 = 0.5 + 0.693147 − 1 = 0.193147, d k3/d logp = −e^d + 1 = 0.5
    # Two tokens (the second masked out), β = 0.1, num_tokens 1: loss = β·KL of token 1.
    lp = torch.log(torch.tensor([[0.5, 0.9]], dtype=torch.float64)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    zero_adv = torch.zeros(1, dtype=torch.float64)
    assert kl_k1(lp[:, :1], ref[:, :1]).item() == pytest.approx(math.log(2.0))
    for est, value, grad in (("k1", math.log(2.0), 1.0), ("k3", 0.5 + math.log(2.0) - 1.0, 0.5)):
        loss, st = policy_loss(lp, lp.detach(), zero_adv, mask, kl_coef=0.1, ref_logprobs=ref, kl_estimator=est)
        assert loss.item() == pytest.approx(0.1 * value), est
        g, = torch.autograd.grad(loss, lp)
        assert g[0, 0].item() == pytest.approx(0.1 * grad) and g[0, 1].item() == 0.0, est
    with pytest.raises(ValueError, match="kl_estimator"):
        policy_loss(lp, lp.detach(), zero_adv, mask, kl_coef=0.1, ref_logprobs=ref, kl_estimator="k2")


def test_truncation_mask():
    m = torch.ones(2, 3)
    assert torch.equal(truncation_mask(m, torch.tensor([True, False]), "none"), m)
    assert truncation_mask(m, torch.tensor([True, False]), "mask_truncated").tolist() == [[0, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError):
        truncation_mask(m, torch.tensor([True, False]), "bogus")


# ---- adaptive entropy -------------------------------------------------------------------------

def test_adaptive_entropy_paper_settings():
    ctl = AdaptiveEntropy(target=0.2, delta=0.005)
    # e=0.1 < 0.2: α = c = 0, then c = 0.005; again: α = 0.005, c = 0.010; e=0.3 ≥ 0.2: α = 0, c = 0.005
    assert ctl.step(0.1) == 0.0 and ctl.coef == pytest.approx(0.005)
    assert ctl.step(0.1) == pytest.approx(0.005) and ctl.coef == pytest.approx(0.010)
    assert ctl.step(0.3) == 0.0 and ctl.coef == pytest.approx(0.005)
    assert ctl.step(0.3) == 0.0 and ctl.coef == pytest.approx(0.0)
    assert ctl.step(0.3) == 0.0 and ctl.coef == 0.0  # clipped at coef_min


def test_adaptive_entropy_released_script_settings_clip_at_max():
    ctl = AdaptiveEntropy(target=0.2, delta=1e-4, coef_max=5e-3)
    alphas = [ctl.step(0.05) for _ in range(60)]
    assert alphas[1] == pytest.approx(1e-4) and alphas[49] == pytest.approx(49e-4)
    assert ctl.coef == pytest.approx(5e-3) and alphas[-1] == pytest.approx(5e-3)


def test_adaptive_entropy_state_round_trip():
    a = AdaptiveEntropy(0.2, 0.005)
    for e in (0.1, 0.1, 0.3):
        a.step(e)
    b = AdaptiveEntropy(0.2, 0.005)
    b.load_state_dict(a.state_dict())
    assert [a.step(x) for x in (0.1, 0.5, 0.1)] == [b.step(x) for x in (0.1, 0.5, 0.1)]


# ---- chunked log-probs and entropy ------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_equals_naive_values_and_gradients(temperature):
    torch.manual_seed(1)
    h = torch.randn(53, 24, requires_grad=True)
    w = torch.randn(301, 24, requires_grad=True)
    b = torch.randn(301, requires_grad=True)
    t = torch.randint(0, 301, (53,))
    lp, ent = logprobs_and_entropy(h, w, t, temperature=temperature, chunk_tokens=16, bias=b)
    lp0, ent0 = naive_logprobs_and_entropy(h, w, t, temperature=temperature, bias=b)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(ent, ent0, atol=1e-5)
    gw = torch.randn(53)
    g1 = torch.autograd.grad((lp * gw).sum() + (ent * gw.flip(0)).sum(), (h, w, b))
    g0 = torch.autograd.grad((lp0 * gw).sum() + (ent0 * gw.flip(0)).sum(), (h, w, b))
    for a_, b_ in zip(g1, g0):
        assert torch.allclose(a_, b_, atol=1e-5)


def test_chunked_hand_value_uniform_logits():
    # zero weights → uniform over V=4: logp = −log 4 and entropy = log 4 for every token
    lp, ent = logprobs_and_entropy(torch.ones(3, 2), torch.zeros(4, 2), torch.tensor([0, 1, 3]), chunk_tokens=2)
    assert lp.tolist() == pytest.approx([-math.log(4)] * 3) and ent.tolist() == pytest.approx([math.log(4)] * 3)


def test_chunked_gradcheck_float64():
    torch.manual_seed(2)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w: logprobs_and_entropy(h, w, t, temperature=0.7, chunk_tokens=3),
                                    (h, w))
