"""``model.path: embedded-small``: a 27M-parameter model on a long-tailed task, built on first use.

What ``configs/cpu-small.yaml`` trains: the count-up task (``countup.py``: responses from ~20 to
~400 tokens, P(k additions) proportional to 1/k) and a Qwen2 of 8 layers x 512 (27.5M parameters),
large enough that the learner's memory paths, the broadcast and long responses cost what they
cost at scale, on this machine. Built like the embedded default (cached under
``<cache>/embedded-small-v1``, under a file lock, stamped with every file's hash, no download):

1. a byte-level BPE tokenizer trained on rendered count-up conversations;
2. a small Qwen2 (4 x 128, as the embedded default) warm-started by SFT on worked solutions, with
   same-length batches (every batch draws one addition count), which takes minutes;
3. grown (``grow.py``) into the 8 x 512 model, which computes the same function: the build checks
   the two models' logits on held-out prompts and records the difference.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from async_or1.embedded import EmbeddedPaths, ensure_built
from async_or1.embedded import countup
from async_or1.embedded.sft import SFTParams

VERSION = "embedded-small-v1"


@dataclass(frozen=True)
class SmallParams:
    seed: int = 0
    n_train: int = 4000
    n_heldout: int = 200
    min_adds: int = 2
    max_adds: int = 40
    vocab_size: int = 512
    base_hidden: int = 128             # the model SFT trains
    base_layers: int = 4
    base_heads: int = 4
    base_intermediate: int = 384
    hidden: int = 512                  # the model it is grown into (head_dim kept: 32)
    layers: int = 8
    heads: int = 16
    intermediate: int = 1536
    threads: int = 2
    sft: SFTParams = field(default_factory=lambda: SFTParams(
        max_steps=400, batch_size=16, lr=3e-3, warmup_steps=40, noise=0.03, eval_every=200, eval_problems=64,
        stop_accuracy=0.6, max_new_tokens=448))
    final_eval_problems: int = 64

    def to_json(self) -> dict:
        return asdict(self)


def ensure_small(cache_dir: str | Path | None = None, force: bool = False, params: SmallParams | None = None,
                 log: Callable[[str], None] = print) -> EmbeddedPaths:
    """The embedded-small model and task, built (once) if needed."""
    return ensure_built(VERSION, params or SmallParams(), build_small, cache_dir, force, log)


def same_length_drawer(p: SmallParams, heldout: list[countup.CountUpProblem]) -> Callable:
    """SFT problems, ``batch_size`` at a time with one addition count (long-tailed across batches),
    so a batch pads to its own length instead of the longest of a mixed batch; never a held-out text."""
    banned = {q.text() for q in heldout}
    state = {"left": 0, "k": 0}

    def draw(rng: random.Random) -> countup.CountUpProblem:
        if state["left"] == 0:
            state["left"], state["k"] = p.sft.batch_size, countup.sample_adds(rng, p.min_adds, p.max_adds)
        state["left"] -= 1
        while True:
            q = countup.sample_problem(rng, state["k"], state["k"])
            if q.text() not in banned:
                return q

    return draw


def build_small(out: Path, p: SmallParams, log: Callable[[str], None] = print) -> dict:
    """Build everything into ``out`` (an empty directory). Returns the build report."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from async_or1.data.rows import write_rows
    from async_or1.data.template import encode_prompt
    from async_or1.embedded.grow import grow_qwen2
    from async_or1.embedded.sft import accuracy, train_sft
    from async_or1.embedded.tokenizer import IM_END, IM_START, build_tokenizer

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        heldout = countup.make_problems(p.seed * 1000 + 101, p.n_heldout, p.min_adds, p.max_adds)
        train = countup.make_problems(p.seed * 1000 + 202, p.n_train, p.min_adds, p.max_adds,
                                      exclude={q.text() for q in heldout})
        rng = random.Random(p.seed + 3)
        corpus = [f"{IM_START}user\n{q.text()}{IM_END}\n{IM_START}assistant\n<think>\n"
                  f"{countup.worked_solution(q, rng, p.sft.noise)}{IM_END}\n"
                  for q in countup.make_problems(p.seed + 4, 2000, p.min_adds, p.max_adds)]
        model_dir = out / "model"
        tok = build_tokenizer(corpus, model_dir, p.vocab_size)
        lengths = sorted(len(tok.encode(countup.worked_solution(q), add_special_tokens=False)) + 1 for q in heldout)
        log(f"[{VERSION}] tokenizer: {len(tok)} tokens; held-out solution lengths: median "
            f"{statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, max {lengths[-1]} tokens "
            f"({time.time() - t0:.1f}s)")

        def encode(q: countup.CountUpProblem) -> list[int]:
            return encode_prompt(tok, [{"role": "user", "content": q.text()}])

        torch.manual_seed(p.seed)
        base = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=p.base_hidden, intermediate_size=p.base_intermediate,
            num_hidden_layers=p.base_layers, num_attention_heads=p.base_heads, num_key_value_heads=p.base_heads,
            max_position_embeddings=1024, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        log(f"[{VERSION}] SFT of the base model ({sum(x.numel() for x in base.parameters()) / 1e6:.2f}M parameters), "
            f"up to {p.sft.max_steps} steps")
        sft = train_sft(base, tok, encode, same_length_drawer(p, heldout), heldout, p.sft, p.seed, log,
                        solution=countup.worked_solution)
        ev = heldout[:p.final_eval_problems]
        acc = accuracy(base, tok, [encode(q) for q in ev], [str(q.answer()) for q in ev], seed=p.seed + 1,
                       max_new_tokens=p.sft.max_new_tokens)
        big = grow_qwen2(base, hidden_size=p.hidden, num_heads=p.heads, intermediate_size=p.intermediate,
                         num_layers=p.layers, seed=p.seed).eval()
        n_params = sum(x.numel() for x in big.parameters())
        q = heldout[0]
        ids = torch.tensor(encode(q) + tok.encode(countup.worked_solution(q), add_special_tokens=False))[None]  # [1, T]
        with torch.no_grad():
            drift = float((base(input_ids=ids).logits - big(input_ids=ids).logits).abs().max())
        if drift > 1e-3:
            raise RuntimeError(f"{VERSION}: the grown model's logits differ from the base model's by {drift}")
        log(f"[{VERSION}] grown to {p.layers}x{p.hidden} ({n_params / 1e6:.1f}M parameters), logits within "
            f"{drift:.1e} of the base; held-out accuracy at temperature 1: {acc:.2f} ({time.time() - t0:.0f}s)")
        big.generation_config.eos_token_id = tok.eos_token_id
        big.generation_config.pad_token_id = tok.pad_token_id
        big.save_pretrained(str(model_dir), safe_serialization=True)
        write_rows(out / "train.jsonl", [countup.to_row(q, i, "train") for i, q in enumerate(train)])
        write_rows(out / "heldout.jsonl", [countup.to_row(q, i, "heldout") for i, q in enumerate(heldout)])
    finally:
        torch.set_num_threads(prev_threads)
    return {"parameters": n_params, "base_parameters": sum(x.numel() for x in base.parameters()), "sft": sft,
            "heldout_accuracy_t1": acc, "grow_logit_drift": drift, "seconds": round(time.time() - t0, 1),
            "solution_tokens": {"median": statistics.median(lengths), "mean": round(statistics.mean(lengths), 1),
                                "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1]},
            "n_train": len(train), "n_heldout": len(heldout)}
