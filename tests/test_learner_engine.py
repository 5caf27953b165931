"""LearnerEngine on real DeepSpeed ranks (CPU, gloo): log-probs, loss scaling across ranks, ZeRO
stages, weight export + broadcast, checkpoints.

The test functions launch this file as a script, one process per rank (env RANK/WORLD_SIZE/...);
where a broadcast is checked, learner rank 1 also plays the generator. Workers write tensors to a
temp dir and the test compares them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
DIAG_INDEX = {"n": 0, "rho": 1, "rho_sq": 2, "w": 3, "w_sq": 4, "abs_log": 5, "k3": 6, "masked": 7, "truncated": 8}
ROOT = HERE.parents[1]
LR = 1e-4  # Adam moves every weight with a gradient by ~LR; 1e-5 agreement is then meaningful
ENTROPY_COEF = 0.01
TEMPERATURE = 0.7
BUDGET = 24  # tokens per micro-batch per rank: several micro-batches per step
TUPLE_LR = 1e-2  # one update moves the tiny model's log-probs enough for the second mini-batch's ratios to clip


# ---- fixtures shared by the test process and the workers ---------------------------------------

def make_model(path: Path, tie: bool = True) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    return path


def batch(seed: int) -> list[tuple[list, list, float, list]]:
    """(prompt, response, advantage, behaviour logprobs) rows; lengths 3..13."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(7):
        p = int(torch.randint(1, 5, (1,), generator=g))
        r = int(torch.randint(2, 9, (1,), generator=g))
        prompt = torch.randint(1, 64, (p,), generator=g).tolist()
        resp = torch.randint(1, 64, (r,), generator=g).tolist()
        behav = (-4.2 + 0.6 * torch.randn(r, generator=g)).tolist()  # around log(1/64): ratios clip both ways
        rows.append((prompt, resp, 1.0 if i % 2 == 0 else -0.5 - 0.1 * i, behav))
    return rows


def micro_batches(rows, world: int, rank: int):
    from async_or1.learner.packing import collate, shard_for_ranks

    lengths = [len(p) + len(r) for p, r, _, _ in rows]
    shard = shard_for_ranks(lengths, world, BUDGET)[rank]
    return [collate([rows[i][0] for i in mb], [rows[i][1] for i in mb], [rows[i][2] for i in mb],
                    [rows[i][3] for i in mb], indices=mb) for mb in shard]


def n_tokens(rows) -> int:
    return sum(len(r) for _, r, _, _ in rows)


# ---- worker side ---------------------------------------------------------------------------------

def _params(engine) -> dict:
    return {n: t.detach().clone() for n, t in engine.full_state_iter()}


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k])
                                        for k in a)


def _engine(job: dict, lr: float = LR, **algo):
    from async_or1.config import Config
    from async_or1.learner.engine import LearnerEngine

    cfg = Config()
    cfg.learner.zero_stage, cfg.learner.lr, cfg.algo.temperature = job["zero"], lr, TEMPERATURE
    cfg.algo.clip_high = 0.28
    for k, v in algo.items():
        setattr(cfg.algo, k, v)
    return LearnerEngine(cfg, job["model"])


def _check_logprobs(engine, mbs, model_path: str) -> None:
    """Engine log-probs (padded micro-batches, hidden states + chunked head) == a naive full-logit HF
    forward of each sequence alone, unpadded: checks the shift, the padding and the temperature."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    got = [t for mb, sc in zip(mbs, engine.score(mbs)) if sc is not None for t in mb.per_sample(sc[0])]
    want = []
    for mb in mbs:
        for b, (p, r) in enumerate(zip(mb.prompt_lengths, mb.response_lengths)):
            seq = mb.input_ids[b, :p + r][None]  # [1, P+R]
            with torch.no_grad():
                logits = hf(input_ids=seq).logits[0] / TEMPERATURE  # [P+R, V]
            lsm = torch.log_softmax(logits[p - 1:p + r - 1], -1)  # positions predicting the response
            want.append(lsm.gather(-1, seq[0, p:p + r, None]).squeeze(-1))
    assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)), \
        "engine log-probs differ from the naive HF forward"


def _todays_train_step(eng, mbs, num_tokens: int, entropy_coef: float, correction: str, cap: float = 2.0) -> None:
    """The optimizer step as LearnerEngine.train_step computed it before the update tuple existed
    (correction 'none', or 'tis'/'decoupled' with π_prox = the forward's own detached log-probs),
    written out op for op: the reference that (N_SGD, N_reuse) = (1, 1) must reproduce bit for bit."""
    dev = eng.device
    for k, mb in enumerate(mbs):
        eng.engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
        logp, ent, _ = eng._forward(mb)
        if mb.size == 0:
            loss = (logp.sum() + ent.sum()) * 0.0
        else:
            sel = mb.loss_mask.to(dev) > 0
            behav = mb.behavior_logprobs.to(dev)[sel].float()[None]
            adv = mb.advantages.to(dev)[sel].float()[None]
            lp = logp.float()[None]
            old = behav if correction == "none" else lp.detach()
            ratio = torch.exp(lp - old)
            pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.28) * adv)
            if correction != "none":
                pg = pg * torch.clamp(torch.exp(old - behav), max=cap).detach()
            per_tok = pg - entropy_coef * ent.float()[None]
            mask = torch.ones_like(lp)
            loss = (per_tok * mask).sum() / torch.as_tensor(float(num_tokens), dtype=lp.dtype).clamp(min=1)
        eng.engine.backward(loss * eng.world_size)
    eng.engine.step()


def _payload(rows, world: int, minis: list[list[int]]) -> dict:
    """run_update's payload from test rows: each mini-batch a list of row indices."""
    import numpy as np

    from async_or1.learner.batch import TrainSequence
    from async_or1.learner.packing import shard_for_ranks

    seqs = [TrainSequence(prompt=np.asarray(p, dtype=np.int32), response=np.asarray(r, dtype=np.int32),
                          behavior_logprobs=np.asarray(b, dtype=np.float32), versions=np.zeros(len(r), np.int32),
                          advantage=a, truncated=False) for p, r, a, b in rows]
    out = []
    for idx in minis:
        sh = shard_for_ranks([seqs[i].length for i in idx], world, BUDGET)
        out.append({"shards": [[[idx[j] for j in mb] for mb in rank] for rank in sh],
                    "num_tokens": sum(len(rows[i][1]) for i in idx)})
    return {"seqs": seqs, "mini_batches": out}


def _check_todays_path(job: dict, rows, world: int, rank: int) -> None:
    """(N_SGD, D_R, D_T, N_reuse) = (1, D, D, 1) through run_update == the pre-tuple step, bit for bit,
    for 'none' and for 'tis' (which was 'decoupled' with the in-step proximal log-probs)."""
    from async_or1.learner.update import run_update

    payload = _payload(rows, world, [list(range(len(rows)))])
    for correction in ("none", "tis"):
        new, old = _engine(job, correction=correction), _engine(job, correction=correction)
        st = run_update(new, payload, rank, new.cfg, ENTROPY_COEF)
        _todays_train_step(old, micro_batches(rows, world, rank), n_tokens(rows), ENTROPY_COEF, correction)
        p_new, p_old = _params(new), _params(old)
        if rank == 0:
            assert _bits_equal(p_new, p_old), f"(1, D, D, 1) with {correction} differs from the pre-tuple step"
            assert st["optimizer_steps"] == 1


def _tuple_run(job: dict, rows, world: int, rank: int, correction: str, passes: int = 1, lr: float = TUPLE_LR,
               **algo) -> tuple:
    """Two mini-batches (rows 0-3, 4-6) × ``passes``: the lower-level steps of run_update, so every
    optimizer step's stats and the weights after each can be checked."""
    from async_or1.learner.shards import to_micro_batches
    from async_or1.learner.update import proximal_pass, reference_pass

    eng = _engine(job, lr=lr, correction=correction, **algo)
    payload = _payload(rows, world, [[0, 1, 2, 3], [4, 5, 6]])
    seqs = payload["seqs"]
    micro = [to_micro_batches([[seqs[i] for i in mb] for mb in m["shards"][rank]]) for m in payload["mini_batches"]]
    weights = [_params(eng)]
    micro, pre = proximal_pass(eng, micro, eng.cfg)
    if eng.cfg.algo.kl_coef:
        micro = reference_pass(eng, micro)
    steps = []
    for _ in range(passes):
        for m, mbs in enumerate(micro):
            steps.append(eng.train_step(mbs, num_tokens_global=payload["mini_batches"][m]["num_tokens"],
                                        entropy_coef=0.0))
            weights.append(_params(eng))
    return eng, pre, steps, weights


def _check_tuple_by_hand(job: dict, rows) -> None:
    """Every correction, two mini-batches: the engine's loss of the SECOND optimizer step (weights one
    update past π_prox, so r ≠ 1) equals the formula evaluated in float64 on log-probs from a naive
    full-logit HF forward of the weights before and after the first update."""
    torch.save({c: _tuple_run(job, rows, 1, 0, c)[1:] for c in ("none", "tis", "seq_is", "mis", "icepop", "m2po")},
               Path(job["out"]) / "tuple_by_hand.pt")


def _check_kl(job: dict, rows, world: int, rank: int) -> None:
    """kl_coef > 0: the reference is the initial policy, so the first update's KL is 0 exactly; the
    second's (k3 and k1) is checked against naive log-probs by the test. Under ZeRO-3 the reference's
    parameters are partitioned over the ranks like the policy's."""
    out = {}
    for est in ("k3", "k1"):
        eng, pre, steps, weights = _tuple_run(job, rows, world, rank, "tis", kl_coef=0.05, kl_estimator=est)
        out[est] = (steps, weights[0], weights[1])
        if job["zero"] == 3:
            pol = dict(eng.engine.module.named_parameters())
            ref = dict(eng.reference.module.named_parameters())
            assert pol.keys() == ref.keys()
            for n, p in ref.items():  # split exactly as the policy's parameter of the same name
                assert hasattr(p, "ds_numel") and p.numel() == 0, f"reference {n} is not partitioned"
                assert p.ds_tensor.numel() == pol[n].ds_tensor.numel() < p.ds_numel, n
    if rank == 0:
        torch.save(out, Path(job["out"]) / f"kl_w{world}_z{job['zero']}.pt")


def _worker(job: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    if job.get("partition_all"):
        # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every
        # rank; this model's are all smaller, so without this nothing would be split at all.
        from async_or1.learner import engine as engine_mod

        base = engine_mod.deepspeed_config

        def split_everything(cfg, world_size):
            ds = base(cfg, world_size)
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return ds

        engine_mod.deepspeed_config = split_everything
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(job["out"])
    rows = batch(1)
    mbs = micro_batches(rows, world, rank)
    if world > 1:
        # One padding micro-batch per rank (rank 0 ends its step with it, rank 1 starts with it): the
        # dummy pass must keep the collectives in step and add nothing to the gradient.
        from async_or1.learner.packing import empty_micro_batch

        mbs = mbs + [empty_micro_batch()] if rank == 0 else [empty_micro_batch()] + mbs
    for zero in job["zeros"]:  # one engine per stage in the same ranks: process start-up paid once
        job["zero"] = zero
        engine = _engine(job)
        if "logprobs" in job["tasks"]:
            _check_logprobs(engine, mbs, job["model"])
        if "todays_path" in job["tasks"]:
            _check_todays_path(job, rows, world, rank)
        if "tuple_by_hand" in job["tasks"]:
            _check_tuple_by_hand(job, rows)
        if "tuple" in job["tasks"]:
            # The base LR: with Adam, float noise between rank splits grows with the step size.
            _, pre, steps, weights = _tuple_run(job, rows, world, rank, "m2po", passes=2, lr=LR)
            if rank == 0:
                torch.save({"pre": pre, "steps": steps, "final": weights[-1]},
                           Path(job["out"]) / f"tuple_w{world}_z{zero}.pt")
        if "kl" in job["tasks"]:
            _check_kl(job, rows, world, rank)
        stats = engine.train_step(mbs, num_tokens_global=n_tokens(rows), entropy_coef=ENTROPY_COEF)
        after = _params(engine)
        if rank == 0:
            torch.save({"params": after, "stats": stats, "empty_mbs": sum(mb.size == 0 for mb in mbs),
                        "n_mbs": len(mbs)}, out / f"step1_z{zero}.pt")
    if "broadcast" in job["tasks"]:
        # Learner rank 1 doubles as the generator: a separate HF model receiving on the weight
        # group, which both processes hold beside their default (DeepSpeed) group.
        from async_or1.weights import init_weight_group, plan_update, send_weights

        names, tensors = [], []
        for n, t in engine.full_state_iter():  # collective: every rank walks it
            names.append(n)
            tensors.append(t)
        up = [plan_update(1, names, [str(t.dtype)[6:] for t in tensors], [list(t.shape) for t in tensors], 4096)
              if rank == 0 else None]
        dist.broadcast_object_list(up, src=0)  # the announcement (the wire's job in the real loop)
        grp = init_weight_group("127.0.0.1", job["weights_port"], rank, 2, timeout_s=120)
        if rank == 0:
            send_weights(grp, up[0], tensors)
        else:
            _receive(job, grp, up[0])
    if "ckpt" in job["tasks"]:
        engine.save_checkpoint(out / "ckpt", {"version": 1, "note": "resume me"})
        opt_state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                     for k, s in enumerate(engine.optimizer.state_dict()["state"].values())} if job["zero"] == 0 else None
        rows2 = batch(2)
        stats2 = engine.train_step(micro_batches(rows2, world, rank), num_tokens_global=n_tokens(rows2),
                                   entropy_coef=ENTROPY_COEF)
        after2 = _params(engine)
        fresh = _engine(job)
        client = fresh.load_checkpoint(out / "ckpt")
        assert client == {"version": 1, "note": "resume me"}, client
        loaded_params = _params(fresh)  # collective under ZeRO-3: every rank gathers
        if rank == 0:
            assert _bits_equal(loaded_params, after), "weights after load differ from the saved ones"
        if opt_state is not None:
            loaded = {k: s for k, s in enumerate(fresh.optimizer.state_dict()["state"].values())}
            assert opt_state.keys() == loaded.keys() and all(
                torch.equal(torch.as_tensor(opt_state[k][n]), torch.as_tensor(loaded[k][n]))
                for k in opt_state for n in opt_state[k]), "optimizer state after load differs"
        stats2b = fresh.train_step(micro_batches(rows2, world, rank), num_tokens_global=n_tokens(rows2),
                                   entropy_coef=ENTROPY_COEF)
        after2b = _params(fresh)
        if rank == 0:
            assert _bits_equal(after2, after2b), "the step after resuming differs from the uninterrupted one"
            assert stats2 == stats2b, (stats2, stats2b)
        engine = fresh
    if "hf" in job["tasks"]:
        from transformers import AutoModelForCausalLM

        engine.save_hf(out / "hf")
        mine = _params(engine)
        if rank == 0:
            loaded = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32)
            theirs = {n: p.detach() for n, p in loaded.named_parameters()}
            assert _bits_equal(mine, theirs), "save_hf → from_pretrained changed the weights"
    dist.barrier()


def _receive(job: dict, grp, update) -> None:
    """The generator's side: HF model from the original path, the broadcast received into it."""
    from transformers import AutoModelForCausalLM

    from async_or1.weights import recv_weights

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    into = dict(model.named_parameters())
    with torch.no_grad():
        got = [n for n, _ in recv_weights(grp, update, into=into)]
    assert got == list(into), "the learner's names are not the generator model's named_parameters()"
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(job["out"]) / "received.pt")


# ---- test side -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, world: int, timeout: float = 240.0) -> None:
    port = _free_port()
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(HERE), json.dumps(job)], env={**base, "RANK": str(r),
                                                                                   "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(i, o) for i, (p, o) in enumerate(zip(procs, outs)) if p.returncode != 0]
    assert not failed, "\n".join(f"--- rank {i}\n{o[-4000:]}" for i, o in failed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, ZeRO-0: log-probs vs naive HF, a step, checkpoint round trip, save_hf round trip."""
    d = tmp_path_factory.mktemp("learner")
    model = make_model(d / "model")
    out = d / "ref"
    out.mkdir()
    launch({"model": str(model), "zeros": [0], "out": str(out),
            "tasks": ["logprobs", "todays_path", "tuple_by_hand", "tuple", "kl", "ckpt", "hf"]}, world=1)
    return model, torch.load(out / "step1_z0.pt")


def _naive_logprobs(model_path: Path, weights: dict, rows) -> list[torch.Tensor]:
    """float64 log-probs of each row's response tokens under ``weights``: a plain HF forward of each
    sequence alone with full logits (nothing of the engine's path: no padding, chunks or DeepSpeed)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    out = []
    for p, r, _, _ in rows:
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = hf(input_ids=seq).logits[0].double() / TEMPERATURE
        out.append(torch.log_softmax(logits[len(p) - 1:len(p) + len(r) - 1], -1).gather(-1, seq[0, len(p):, None])[:, 0])
    return out


def _expected_loss(correction: str, theta, prox, rows, all_prox, all_rows, cap=2.0, clip=(0.2, 0.28)) -> float:
    """The correction's loss of one mini-batch, from the formulas (algo/corrections.py docstring), in
    float64, token mean over the mini-batch. ``all_*``: the whole step, for M2PO's mask."""
    lo, hi = clip
    cut = float("inf")
    if correction == "m2po":  # the paper's loop: drop the largest (log ρ)² until their mean is <= τ
        sq = sorted(x for lp, r in zip(all_prox, all_rows)
                    for x in ((lp - torch.tensor(r[3], dtype=torch.float64)) ** 2).tolist())
        while sq and sum(sq) / len(sq) > 0.04:
            sq.pop()
        cut = sq[-1] if sq else -1.0
    total, n = 0.0, 0
    for th, px, (_, resp, adv, behav) in zip(theta, prox, rows):
        mu = torch.tensor(behav, dtype=torch.float64)
        log_rho = px - mu
        anchor = mu if correction == "none" else px
        r = torch.exp(th - anchor)
        pg = torch.maximum(-r * adv, -torch.clamp(r, 1 - lo, 1 + hi) * adv)
        seq = float(log_rho.sum().exp())
        w = {"none": torch.ones_like(r), "tis": torch.clamp(log_rho.exp(), max=cap),
             "seq_is": torch.full_like(r, min(seq, cap)),
             "mis": torch.full_like(r, seq if 0.5 <= seq <= 2.0 else 0.0),
             "icepop": torch.where((log_rho.exp() >= 0.5) & (log_rho.exp() <= 5.0), log_rho.exp(), 0.0),
             "m2po": torch.where(log_rho ** 2 <= cut, log_rho.exp(), 0.0)}[correction]
        if correction == "m2po":
            pg = -r * adv  # no clip
        total += float((w * pg).sum())
        n += len(resp)
    return total / n


def test_two_mini_batches_every_correction_by_hand(reference):
    """The second optimizer step of a two-mini-batch step (r = π_θ/π_prox ≠ 1) against the formulas on
    naive log-probs: the corrections are no longer degenerate and no longer agree with each other."""
    model, _ = reference
    got = torch.load(model.parent / "ref" / "tuple_by_hand.pt")
    rows = batch(1)
    mb2 = rows[4:]
    w0 = got["none"][2][0]
    prox_all = _naive_logprobs(model, w0, rows)
    losses = {}
    for correction, (pre, steps, weights) in got.items():
        assert len(steps) == 2
        theta = _naive_logprobs(model, weights[1], mb2)
        want = _expected_loss(correction, theta, prox_all[4:], mb2, prox_all, rows)
        assert steps[1]["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6), correction
        losses[correction] = steps[1]["loss"]
        if correction != "none":
            # π_prox anchors the ratio: exactly 1 at the first update, not at the second
            assert steps[0]["ratio_sum"] == pytest.approx(steps[0]["token_count"], rel=1e-6), correction
            assert abs(steps[1]["ratio_sum"] / steps[1]["token_count"] - 1) > 1e-4, correction
    assert len({round(v, 6) for v in losses.values()}) == len(losses), f"corrections coincide: {losses}"
    pre = got["tis"][0]
    assert 0 < pre["behaviour"][0][DIAG_INDEX["truncated"]] < pre["token_count"]  # some ρ > 2, not all
    assert got["m2po"][0]["m2po_cut"] is not None


def test_kl_to_the_frozen_reference_by_hand(reference):
    """kl_coef > 0: the reference is the initial policy: KL 0 at the first update (θ = π_ref exactly),
    and at the second the mean k3 / k1 of mini-batch 2 under the weights after update 1."""
    model, _ = reference
    got = torch.load(model.parent / "ref" / "kl_w1_z0.pt")
    mb2 = batch(1)[4:]
    for est, (steps, w0, w1) in got.items():
        assert steps[0]["kl_sum"] == 0.0, est
        ref = _naive_logprobs(model, w0, mb2)
        theta = _naive_logprobs(model, w1, mb2)
        d = torch.cat([r - t for r, t in zip(ref, theta)])
        want = float((torch.exp(d) - d - 1).mean()) if est == "k3" else float((-d).mean())
        assert steps[1]["kl_sum"] / steps[1]["token_count"] == pytest.approx(want, rel=1e-3, abs=1e-7), est
        assert abs(want) > 1e-6


def test_one_rank_logprobs_checkpoint_and_hf_round_trip(reference):
    _, ref = reference
    st = ref["stats"]
    assert ref["n_mbs"] >= 3  # the step really accumulated over several micro-batches
    assert st["token_count"] == n_tokens(batch(1)) and st["clip_low_count"] > 0 and st["clip_high_count"] > 0
    assert st["grad_norm"] > 0 and 0 < st["entropy_sum"] / st["token_count"] < 4.2  # ≤ log 64


def _two_ranks_match_one_rank(reference, tmp_path, zeros: list, tasks: list) -> None:
    """2 ranks, each ZeRO stage in ``zeros`` in turn (the last one broadcasts, if asked): the step
    equals the 1-rank step; stats come back summed over ranks; the receiver gets the weights."""
    from transformers import AutoModelForCausalLM

    model, ref = reference
    job = {"model": str(model), "zeros": zeros, "out": str(tmp_path), "tasks": tasks, "weights_port": _free_port(),
           "partition_all": 3 in zeros}
    launch(job, world=2)
    init = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(str(model)).named_parameters()}
    moved = max((ref["params"][n] - init[n]).abs().max().item() for n in init)
    assert moved > 5e-5, "the optimizer step did not move the weights"
    for zero in zeros:
        got = torch.load(tmp_path / f"step1_z{zero}.pt")
        assert got["empty_mbs"] == 1
        worst = max((ref["params"][n] - got["params"][n]).abs().max().item() for n in init)
        assert worst < 1e-5, f"2-rank ZeRO-{zero} step differs from the 1-rank step by {worst}"
        for k in ("token_count", "clip_low_count", "clip_high_count"):
            assert got["stats"][k] == ref["stats"][k], (zero, k)  # stats come back summed over ranks
        # grad_norm is the sharp check of the loss scale (×world_size against DeepSpeed's averaging):
        # Adam's first step is invariant to a uniform gradient scale, the pre-clip norm is not.
        for k in ("entropy_sum", "ratio_sum", "loss", "grad_norm"):
            assert got["stats"][k] == pytest.approx(ref["stats"][k], rel=1e-4, abs=1e-6), (zero, k)
    if "tuple" in tasks:
        # two mini-batches × two passes under m2po: the cut is chosen over both ranks' tokens and must
        # be the 1-rank one exactly; the weights after four optimizer steps agree to float tolerance.
        one = torch.load(model.parent / "ref" / "tuple_w1_z0.pt")
        for zero in zeros:
            two = torch.load(tmp_path / f"tuple_w2_z{zero}.pt")
            assert two["pre"]["m2po_cut"] == one["pre"]["m2po_cut"], zero
            assert [s["token_count"] for s in two["steps"]] == [s["token_count"] for s in one["steps"]]
            worst = max((one["final"][n] - two["final"][n]).abs().max().item() for n in init)
            assert worst < 4e-5, f"2-rank ZeRO-{zero} tuple differs from 1 rank by {worst}"
            assert two["pre"]["behaviour"][0] == pytest.approx(one["pre"]["behaviour"][0], rel=1e-5)
    if "kl" in tasks:
        one = torch.load(model.parent / "ref" / "kl_w1_z0.pt")
        for zero in zeros:
            two = torch.load(tmp_path / f"kl_w2_z{zero}.pt")
            for est in ("k3", "k1"):
                a, b = one[est][0][1]["kl_sum"], two[est][0][1]["kl_sum"]
                assert b == pytest.approx(a, rel=1e-4), (zero, est)
    if "broadcast" in tasks:
        received = torch.load(tmp_path / "received.pt")
        last = torch.load(tmp_path / f"step1_z{zeros[-1]}.pt")
        assert _bits_equal(received, last["params"]), "the receiver's weights differ from the learner's"


def test_two_ranks_zero0_and_zero2_match_one_rank_broadcast_and_save_bit_exact(reference, tmp_path):
    _two_ranks_match_one_rank(reference, tmp_path, zeros=[0, 2], tasks=["broadcast", "hf", "tuple"])


@pytest.mark.slow
def test_two_ranks_zero3_match_one_rank_broadcast_and_checkpoints(reference, tmp_path):
    _two_ranks_match_one_rank(reference, tmp_path, zeros=[3], tasks=["broadcast", "ckpt", "hf", "tuple", "kl"])


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
