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
ROOT = HERE.parents[1]
LR = 1e-4  # Adam moves every weight with a gradient by ~LR; 1e-5 agreement is then meaningful
ENTROPY_COEF = 0.01
TEMPERATURE = 0.7
BUDGET = 24  # tokens per micro-batch per rank: several micro-batches per step


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


def _engine(job: dict):
    from async_or1.config import Config
    from async_or1.learner.engine import LearnerEngine

    cfg = Config()
    cfg.learner.zero_stage, cfg.learner.lr, cfg.algo.temperature = job["zero"], LR, TEMPERATURE
    return LearnerEngine(cfg, job["model"])


def _check_logprobs(engine, mbs, model_path: str) -> None:
    """Engine log-probs (padded micro-batches, hidden states + chunked head) == a naive full-logit HF
    forward of each sequence alone, unpadded: checks the shift, the padding and the temperature."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    got = engine.compute_logprobs(mbs)
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


def _check_decoupled(job: dict, rows, mbs) -> None:
    """'decoupled' with proximal log-probs from compute_logprobs == 'decoupled' falling back to the
    step's own detached log-probs (the same pre-update weights): bit for bit, with every ratio 1."""
    from async_or1.learner.packing import with_old_logprobs

    results = []
    for given in (True, False):
        eng = _engine(job)
        batch_mbs = with_old_logprobs(mbs, eng.compute_logprobs(mbs)) if given else mbs
        st = eng.train_step(batch_mbs, num_tokens_global=n_tokens(rows), entropy_coef=ENTROPY_COEF,
                            correction="decoupled", tis_cap=2.0)
        results.append((_params(eng), st))
    (p_given, st_given), (p_fallback, st_fallback) = results
    assert _bits_equal(p_given, p_fallback) and st_given == st_fallback, "proximal log-probs differ from in-step ones"
    assert st_given["ratio_sum"] == pytest.approx(st_given["token_count"]), "ratios against π_prox must be 1"
    assert st_given["clip_low_count"] == st_given["clip_high_count"] == 0


def _worker(job: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
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
        if "decoupled" in job["tasks"]:
            _check_decoupled(job, rows, mbs)
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
    launch({"model": str(model), "zeros": [0], "out": str(out), "tasks": ["logprobs", "decoupled", "ckpt", "hf"]},
           world=1)
    return model, torch.load(out / "step1_z0.pt")


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
    job = {"model": str(model), "zeros": zeros, "out": str(tmp_path), "tasks": tasks, "weights_port": _free_port()}
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
    if "broadcast" in tasks:
        received = torch.load(tmp_path / "received.pt")
        last = torch.load(tmp_path / f"step1_z{zeros[-1]}.pt")
        assert _bits_equal(received, last["params"]), "the receiver's weights differ from the learner's"


def test_two_ranks_zero0_and_zero2_match_one_rank_broadcast_and_save_bit_exact(reference, tmp_path):
    _two_ranks_match_one_rank(reference, tmp_path, zeros=[0, 2], tasks=["broadcast", "hf"])


@pytest.mark.slow
def test_two_ranks_zero3_match_one_rank_broadcast_and_checkpoints(reference, tmp_path):
    _two_ranks_match_one_rank(reference, tmp_path, zeros=[3], tasks=["broadcast", "ckpt", "hf"])


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
