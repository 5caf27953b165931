"""Off-policy corrections against values worked out by hand (in the comments).

One training step with two mini-batches of one response each, so that the second is trained by
weights one update past π_prox and its PPO ratio r = π_θ/π_prox is not 1:

    mini-batch 1, A = +1   π_θ = π_prox = [0.5, 0.45]   μ = [0.2, 0.5]   ρ = [2.5, 0.9]   r = [1, 1]
    mini-batch 2, A = −1   π_prox = [0.3, 0.6]   π_θ = [0.36, 0.3]   μ = [0.5, 0.2]   ρ = [0.6, 3]
                                                                                    r = [1.2, 0.5]
ε_low 0.2, ε_high 0.28, each loss a token mean over the mini-batch's 2 tokens.
For A = −1, pg = −min(rA, clip(r)A) = max(r, clip(r, 0.8, 1.28)).
"""

import math
import threading

import pytest
import torch

from async_or1.algo import (CorrectionParams, behaviour_sums, correction_weights, m2po_cutoff, policy_loss,
                            summarize_behaviour)
from async_or1.algo.corrections import clipped, ratio_anchor_is_behaviour

P = lambda *xs: torch.log(torch.tensor([list(xs)], dtype=torch.float64))  # noqa: E731  probabilities → [1, T] log
MB1 = dict(theta=P(0.5, 0.45), prox=P(0.5, 0.45), behav=P(0.2, 0.5), adv=1.0)
MB2 = dict(theta=P(0.36, 0.3), prox=P(0.3, 0.6), behav=P(0.5, 0.2), adv=-1.0)
MASK = torch.ones(1, 2, dtype=torch.float64)


def _loss(correction: str, mb: dict, params: CorrectionParams = CorrectionParams(), cut: float | None = None):
    """The loss of one mini-batch the way the learner builds it: weights from log ρ, then policy_loss."""
    theta = mb["theta"].clone().requires_grad_(True)
    log_rho = mb["prox"] - mb["behav"]
    w = correction_weights(correction, log_rho, MASK, params, cut)
    anchor = mb["behav"] if ratio_anchor_is_behaviour(correction) else mb["prox"]
    loss, st = policy_loss(theta, anchor, torch.tensor([mb["adv"]], dtype=torch.float64), MASK, clip_low=0.2,
                           clip_high=0.28, clip=clipped(correction), weight=w.weight)
    grad, = torch.autograd.grad(loss, theta)
    return loss.item(), grad[0].tolist(), st, w


SQ = torch.cat([((mb["prox"] - mb["behav"]) ** 2).reshape(-1) for mb in (MB1, MB2)]).float()  # step's (log ρ)²


def _kept(threshold: float) -> tuple[float, list]:
    """M2PO's cut over the whole step (both mini-batches) and which of the four tokens it keeps."""
    cut = m2po_cutoff(SQ, threshold)
    return cut, (SQ <= cut).tolist()


# (log ρ)² of the four tokens: log 2.5² = 0.839589, log 0.9² = 0.011101, log 0.6² = 0.260943, log 3² = 1.206949
HAND = {
    # mini-batch 1: none ratios against μ: r_μ = ρ = [2.5, 0.9] → −min(2.5, 1.28) = −1.28, −0.9 → −1.09
    #               tis  w = min(ρ, 2) = [2, 0.9], pg(1) = −1 → (−2 − 0.9)/2 = −1.45
    #               seq_is  Πρ = 2.25 → w = 2 on both → −2
    #               mis  Πρ = 2.25 > 2 → the response is masked → 0
    #               icepop  ρ ∈ [0.5, 5] → w = ρ → (−2.5 − 0.9)/2 = −1.7
    ("none", 1): -1.09, ("tis", 1): -1.45, ("seq_is", 1): -2.0, ("mis", 1): 0.0, ("icepop", 1): -1.7,
    # mini-batch 2: none r_μ = π_θ/μ = [0.72, 1.5] → max(0.72, 0.8) = 0.8 (clipped low), max(1.5, 1.28) = 1.5 → 1.15
    #               tis  pg(r) = [max(1.2, 1.2), max(0.5, 0.8)] = [1.2, 0.8]; w = [0.6, min(3, 2)] → (0.72 + 1.6)/2 = 1.16
    #               seq_is  Πρ = 1.8 < 2 → (1.8·1.2 + 1.8·0.8)/2 = 1.8;  mis: 1.8 ∈ [0.5, 2] → the same 1.8
    #               icepop  w = ρ = [0.6, 3] → (0.72 + 2.4)/2 = 1.56
    ("none", 2): 1.15, ("tis", 2): 1.16, ("seq_is", 2): 1.8, ("mis", 2): 1.8, ("icepop", 2): 1.56,
}


@pytest.mark.parametrize("correction,which", sorted(HAND))
def test_correction_losses_by_hand(correction, which):
    loss, _, _, _ = _loss(correction, MB1 if which == 1 else MB2)
    assert loss == pytest.approx(HAND[(correction, which)], abs=1e-9)


def test_gradients_by_hand_second_mini_batch():
    # tis, mini-batch 2: token 1 unclipped (r = 1.2): d/dℓ of −w·r·A = −0.6·1.2·(−1) = 0.72, /2 tokens = 0.36;
    # token 2 clipped low (r = 0.5 < 0.8, A < 0): no gradient.
    _, g, st, w = _loss("tis", MB2)
    assert g == pytest.approx([0.36, 0.0])
    assert st["clip_low_count"].item() == 1 and w.truncated.tolist() == [[False, True]]
    # none, mini-batch 2: token 1 clipped low (r_μ = 0.72), token 2 unclipped: d/dℓ = −1.5·(−1)/2 = 0.75
    _, g, st, _ = _loss("none", MB2)
    assert g == pytest.approx([0.0, 0.75]) and st["clip_low_count"].item() == 1
    # icepop, mini-batch 1 (r = 1, inside the clip): d/dℓ = −ρ·A/2 = [−1.25, −0.45]
    assert _loss("icepop", MB1)[1] == pytest.approx([-1.25, -0.45])


def test_tis_ratio_against_prox_is_one_only_at_the_first_update():
    # Today's degenerate case (ratio 1, clip never binds) is the first mini-batch; the second has r ≠ 1.
    _, _, st1, _ = _loss("tis", MB1)
    _, _, st2, _ = _loss("tis", MB2)
    assert st1["ratio_mean"].item() == pytest.approx(1.0) and st1["clip_low_count"] + st1["clip_high_count"] == 0
    assert st2["ratio_mean"].item() == pytest.approx((1.2 + 0.5) / 2) and st2["clip_low_count"].item() == 1
    # ...and its weight is not 1 either: ρ = π_prox/μ ≠ 1 under staleness.
    assert st1["weight_mean"].item() == pytest.approx((2.0 + 0.9) / 2)


def test_m2po_cut_and_losses_by_hand():
    # τ = 0.04: sorted (log ρ)² = [0.0111, 0.2609, 0.8396, 1.2069]; {0.0111} has mean 0.0111 ≤ 0.04, adding
    # 0.2609 gives 0.136 > 0.04 → keep one token (mini-batch 1, token 2).
    cut, kept = _kept(0.04)
    assert kept == [False, True, False, False] and math.log(0.9) ** 2 <= cut < math.log(0.6) ** 2
    # τ = 0.3: {0.0111, 0.2609} mean 0.136 ≤ 0.3, adding 0.8396 gives 0.3705 > 0.3 → keep two tokens.
    cut, kept = _kept(0.3)
    assert kept == [False, True, True, False]
    p = CorrectionParams(m2po_threshold=0.3)
    # mini-batch 1: w = [0, 0.9], unclipped −w·r·A = [0, −0.9] → −0.45; gradient [0, −0.45]
    loss, g, st, w = _loss("m2po", MB1, p, cut)
    assert loss == pytest.approx(-0.45) and g == pytest.approx([0.0, -0.45])
    assert w.masked.tolist() == [[True, False]]
    # mini-batch 2: w = [0.6, 0], r = 1.2 is not clipped either way: −0.6·1.2·(−1) = 0.72 → 0.36
    loss, g, st, _ = _loss("m2po", MB2, p, cut)
    assert loss == pytest.approx(0.36) and g == pytest.approx([0.36, 0.0])
    assert st["clip_low_count"].item() == st["clip_high_count"].item() == 0
    with pytest.raises(ValueError, match="cutoff"):
        correction_weights("m2po", MB1["prox"] - MB1["behav"], MASK, p)


def test_m2po_cutoff_edges_and_ties():
    v = torch.tensor([0.01, 0.05, 0.05])
    # {0.01} mean 0.01 ≤ 0.03; {0.01, 0.05, 0.05} (ties kept or dropped together) mean 0.0367 > 0.03
    assert (v <= m2po_cutoff(v, 0.03)).tolist() == [True, False, False]
    assert m2po_cutoff(v, 0.04) == math.inf            # every token fits: nothing is masked
    big = torch.tensor([0.5, 0.6])
    assert not (big <= m2po_cutoff(big, 0.04)).any()   # even the smallest fails: all masked
    assert m2po_cutoff(torch.zeros(0), 0.04) == math.inf
    assert m2po_cutoff(torch.zeros(4), 0.04) == math.inf
    with pytest.raises(ValueError):
        m2po_cutoff(torch.tensor([-1.0]), 0.04)


def test_m2po_cutoff_is_the_same_split_over_ranks():
    """Two 'ranks' (threads) each hold part of the step's tokens; their sums meet in a reducer: the cut
    equals the one over all tokens in one place, whatever the split."""
    g = torch.Generator().manual_seed(0)
    v = (0.4 * torch.randn(1000, generator=g)) ** 2
    want = m2po_cutoff(v, 0.04)
    assert 0 < want < v.max()
    parts = [v[:137], v[137:]]
    barrier, box, got = threading.Barrier(2), {}, [None, None]

    def reducer(i):
        def reduce(t):
            box[i] = t.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()
            return total
        return reduce

    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, m2po_cutoff(parts[i], 0.04, reducer(i))))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == [want, want]
    # the kept set fits; adding the next value would not
    assert v[v <= want].double().mean() <= 0.04 < v[v <= v[v > want].min()].double().mean()


def test_sequence_weights_do_not_overflow_for_long_responses():
    # 400 tokens with ρ = 2 each: Πρ = 2^400 (inf in float32) → seq_is caps at 2, mis masks, no NaN
    log_rho = torch.full((1, 400), math.log(2.0))
    mask = torch.ones(1, 400)
    w = correction_weights("seq_is", log_rho, mask, CorrectionParams())
    assert torch.all(w.weight == 2.0) and bool(w.truncated.all())
    w = correction_weights("mis", log_rho, mask, CorrectionParams())
    assert torch.all(w.weight == 0.0) and bool(w.masked.all())
    # padding (mask 0) takes no part in the product
    log_rho = torch.tensor([[math.log(1.5), 30.0]])
    w = correction_weights("seq_is", log_rho, torch.tensor([[1.0, 0.0]]), CorrectionParams())
    assert w.weight[0, 0].item() == pytest.approx(1.5)


def test_behaviour_diagnostics_by_hand():
    # ρ over the step = [2.5, 0.9, 0.6, 3]: Σρ = 7, Σρ² = 16.42 → ESS = 49 / (4·16.42) = 0.746041
    # mean |log ρ| = (0.916291 + 0.105361 + 0.510826 + 1.098612)/4 = 0.657772, max 1.098612
    # k3 = mean(ρ − 1 − log ρ) = (0.583709 + 0.005361 + 0.110826 + 0.901388)/4 = 0.400321
    # tis: w = [2, 0.9, 0.6, 2] (two truncated) → Σw = 5.5, Σw² = 9.17 → ESS 30.25/(4·9.17) = 0.824700
    sums, mx = None, None
    for mb in (MB1, MB2):
        lr = mb["prox"] - mb["behav"]
        s, m = behaviour_sums(lr, MASK, correction_weights("tis", lr, MASK, CorrectionParams()))
        sums = s if sums is None else sums + s
        mx = m if mx is None else torch.maximum(mx, m)
    d = summarize_behaviour(sums, float(mx))
    assert d["is_ess"] == pytest.approx(49 / (4 * 16.42), rel=1e-6)
    assert d["abs_log_ratio_mean"] == pytest.approx(0.657772, rel=1e-5)
    assert d["abs_log_ratio_max"] == pytest.approx(math.log(3.0), rel=1e-9)
    assert d["kl_behav_learner"] == pytest.approx(0.400321, rel=1e-5)
    assert d["is_ess_applied"] == pytest.approx(0.824700, rel=1e-5)
    assert d["is_weight_mean"] == pytest.approx(5.5 / 4)
    assert d["is_truncated_frac"] == pytest.approx(0.5) and d["is_masked_frac"] == 0.0


def test_unknown_correction_is_refused():
    with pytest.raises(ValueError, match="decoupled"):
        correction_weights("decoupled", MB1["prox"], MASK, CorrectionParams())
