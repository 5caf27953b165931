"""Torch engine weight updates through a real gloo broadcast group, from a separate sender process
(the learner's side of async_or1.weights): bit-exact parameters, both layouts, dtype casts, tied
embeddings, and a bad announcement that is drained (the group stays in step) before it raises."""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback

import pytest
import torch

from async_or1.generation.engine import GenRequest, SamplingParams, WeightGroupSpec
from async_or1.generation.torch_engine import TorchEngine
from async_or1.weights import plan_update

GROUP = "test_engine_weights"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_qwen2_w")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(update) -> list[torch.Tensor]:
    """What the sender broadcasts for ``update``: deterministic in its version."""
    g = torch.Generator().manual_seed(1000 + update.version)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    return [(0.02 * torch.randn(sh, generator=g)).to(dt[d]) for sh, d in zip(update.shapes, update.dtypes)]


def _sender(port: int, updates: list, errors) -> None:
    try:
        torch.set_num_threads(1)
        from async_or1.weights import destroy_weight_group, init_weight_group, send_weights

        group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, group_name=GROUP, timeout_s=60)
        for up in updates:
            send_weights(group, up, _tensors(up))
        destroy_weight_group(group)  # an explicit teardown; gloo's exit-time destructor can abort
    except BaseException:
        errors.put(traceback.format_exc())


def test_updates_over_gloo_land_bit_exact(model_dir):
    torch.set_num_threads(1)
    engine = TorchEngine(model_dir, max_batch_size=2, weight_timeout_s=60)
    named = list(engine.model.named_parameters())  # tied output embedding appears once, as the learner sends it
    names, shapes = [n for n, _ in named], [list(p.shape) for _, p in named]

    def plan(version, layout, dtype="float32", extra=()):
        return plan_update(version, names + [n for n, _ in extra], [dtype] * (len(names) + len(extra)),
                           shapes + [s for _, s in extra], bucket_bytes=8192, layout=layout)

    updates = [plan(1, "flat"), plan(2, "per_tensor"), plan(3, "flat", dtype="bfloat16"),
               plan(4, "flat", extra=[("not.a.param", [3])]), plan(5, "flat")]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    proc = ctx.Process(target=_sender, args=(port, updates, errors), daemon=True)
    proc.start()
    try:
        engine.init_weight_group(WeightGroupSpec("127.0.0.1", port, rank_offset=1, world_size=2, group_name=GROUP))
        params = dict(engine.model.named_parameters())
        for up in updates:
            if up.version == 4:
                with pytest.raises(ValueError, match=r"v4.*unknown parameter names.*not\.a\.param"):
                    engine.update_weights(up)
                assert engine.version == 3  # untouched, and the group is still in step for v5
                continue
            engine.update_weights(up)
            assert engine.version == up.version
            for n, t in zip(up.names, _tensors(up)):
                assert torch.equal(params[n], t.float()), (up.version, n)  # bf16 -> fp32 is exact
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
        proc.join(timeout=60)
        assert errors.empty(), errors.get()
        assert proc.exitcode == 0
        # generation runs on the received weights and stamps their version
        r = engine.generate([GenRequest("g", [1, 2, 3], SamplingParams(max_new_tokens=4))])[0]
        assert r.versions == [5] * 4
    finally:
        engine.close()
        if proc.is_alive():
            proc.kill()
