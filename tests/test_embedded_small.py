"""embedded-small (configs/cpu-small.yaml): the long-tailed count-up task, the function-preserving
growth of the SFT'd base model, and the cached build."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch

from async_or1.embedded import countup


def test_countup_problem_by_hand():
    p = countup.CountUpProblem(start=7, step=4, target=60)
    assert p.totals() == [11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63] and p.adds == 14
    assert p.answer() == 63
    sol = countup.worked_solution(p)
    assert sol.startswith("7+4=11\n11+4=15\n") and sol.endswith("55+4=59\n59+4=63\n</think>\n\\boxed{63}")
    assert p.text() == ("Start at 7 and keep adding 4 until the total is more than 60. What is the final total? "
                        "Answer in \\boxed{}.")
    # the boundary: a total equal to the target is not "more than" it
    assert countup.CountUpProblem(start=2, step=3, target=8).totals() == [5, 8, 11]
    row = countup.to_row(p, 3, "train")
    assert json.loads(row["reward_model"]["ground_truth"]) == ["63"] and row["extra_info"]["adds"] == 14


def test_countup_solution_is_graded_right_by_the_math_verifier():
    from async_or1.rewards.math import verify_math

    p = countup.CountUpProblem(start=12, step=9, target=100)
    assert p.answer() == 102
    assert verify_math(countup.worked_solution(p), ["102"])[0]
    slipped = countup.worked_solution(p, random.Random(0), noise=1.0)  # every line slips by one
    assert not verify_math(slipped, ["102"])[0]


def test_countup_additions_are_long_tailed_as_specified():
    # P(k) = ln((k+1)/k) / ln((hi+1)/lo): floor of a log-uniform draw on [lo, hi+1)
    rng = random.Random(0)
    lo, hi, n = 2, 40, 20000
    ks = [countup.sample_problem(rng, lo, hi).adds for _ in range(n)]  # the problem really needs k additions
    norm = math.log((hi + 1) / lo)
    for k in (2, 3, 10, 40):
        want = math.log((k + 1) / k) / norm
        got = ks.count(k) / n
        assert abs(got - want) < 4 * math.sqrt(want / n) + 1e-3, (k, got, want)
    assert min(ks) == lo and max(ks) == hi
    assert statistics.median(ks) == 9 and 11.5 < statistics.mean(ks) < 13.5  # mean >> median: the long tail


def _random_qwen2(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases (they start at 1 and 0)
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_grown_model_computes_the_small_models_function_and_can_learn():
    from async_or1.embedded.grow import grow_qwen2

    small = _random_qwen2(1)
    big = grow_qwen2(small, hidden_size=256, num_heads=16, intermediate_size=384, num_layers=5).eval()
    assert sum(p.numel() for p in big.parameters()) > 30 * sum(p.numel() for p in small.parameters())
    ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = small(input_ids=ids).logits, big(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-5
    # new units are trainable: the zero write-backs of a new layer get gradients
    big(input_ids=ids, labels=ids).loss.backward()
    assert big.model.layers[4].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert big.model.layers[4].mlp.down_proj.weight.grad.abs().sum() > 0
    # and the check can fail: one nonzero write into the residual stream changes the function
    with torch.no_grad():
        big.model.layers[4].mlp.down_proj.weight[0, 200] = 0.5
        assert (small(input_ids=ids).logits - big(input_ids=ids).logits).abs().max() > 1e-3


def test_default_small_model_is_20_to_50m_parameters():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from async_or1.embedded.small import SmallParams

    p = SmallParams()
    with torch.device("meta"):
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=p.vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
                                         num_hidden_layers=p.layers, num_attention_heads=p.heads,
                                         num_key_value_heads=p.heads, tie_word_embeddings=True))
    assert 20e6 <= sum(x.numel() for x in m.parameters()) <= 50e6


@pytest.mark.slow
def test_small_build_is_cached_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from async_or1.data.rows import load_problems
    from async_or1.embedded.sft import SFTParams
    from async_or1.embedded.small import SmallParams, ensure_small

    p = SmallParams(n_train=40, n_heldout=8, hidden=256, heads=8, intermediate=768, layers=5, final_eval_problems=2,
                    sft=SFTParams(max_steps=3, batch_size=4, warmup_steps=1, eval_every=3, eval_problems=2,
                                  max_new_tokens=16))
    lines: list[str] = []
    paths = ensure_small(tmp_path, params=p, log=lines.append)
    assert any("building" in ln for ln in lines) and any("grown to 5x256" in ln for ln in lines)
    report = json.loads((paths.root / "STAMP.json").read_text())["report"]
    assert report["grow_logit_drift"] < 1e-3 and report["solution_tokens"]["max"] > 3 * report["solution_tokens"]["median"]
    model = AutoModelForCausalLM.from_pretrained(str(paths.model))
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 5
    problems, _ = load_problems([str(paths.train)], on_bad_row="error", abilities=("math",))
    assert len(problems) == 40
    again: list[str] = []
    assert ensure_small(tmp_path, params=p, log=again.append) == paths and not again  # cached: no rebuild
