"""Build the embedded default: tokenizer, task rows, tiny Qwen2 model (SFT warm start).

Everything is a pure function of ``BuildParams`` (and the torch thread count, which
changes float summation order): same params, same files.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from async_or1.data.rows import write_rows
from async_or1.embedded import task
from async_or1.embedded.sft import SFTParams, accuracy, train_sft
from async_or1.embedded.tokenizer import build_tokenizer

MODEL_NAME = "embedded-tiny"          # key of the build's own model_difficulty counts


@dataclass(frozen=True)
class BuildParams:
    seed: int = 0
    n_train: int = 4000
    n_heldout: int = 200
    min_steps: int = 1                 # operations per problem: difficulty
    max_steps: int = 5
    max_value: int = 20                # every intermediate value stays in [0, max_value]
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    threads: int = 2
    sft: SFTParams = field(default_factory=SFTParams)
    difficulty_n: int = 8              # rollouts per train problem for model_difficulty (0: skip)
    final_eval_problems: int = 200

    def to_json(self) -> dict:
        return asdict(self)


def _problem_kw(p: BuildParams) -> dict:
    return {"max_value": p.max_value}


def make_splits(p: BuildParams) -> tuple[list[task.ArithProblem], list[task.ArithProblem]]:
    """Held-out first (its own seed), then train problems that never share a text with it."""
    heldout = task.make_problems(p.seed * 1000 + 101, p.n_heldout, p.min_steps, p.max_steps, **_problem_kw(p))
    train = task.make_problems(p.seed * 1000 + 202, p.n_train, p.min_steps, p.max_steps,
                               exclude={q.text() for q in heldout}, **_problem_kw(p))
    return train, heldout


def sft_drawer(p: BuildParams, heldout: list[task.ArithProblem]) -> Callable[[random.Random], task.ArithProblem]:
    """SFT problems: uniform in steps, with replacement (a distinct-only draw would starve the
    one-step problems, of which there are few), never a held-out text."""
    banned = {q.text() for q in heldout}

    def draw(rng: random.Random) -> task.ArithProblem:
        while True:
            q = task.sample_problem(rng, rng.randint(p.min_steps, p.max_steps), **_problem_kw(p))
            if q.text() not in banned:
                return q

    return draw


def tokenizer_corpus(p: BuildParams, problems: list[task.ArithProblem]) -> list[str]:
    """Rendered conversations (prompt, worked solution) to train the BPE merges on."""
    from async_or1.embedded.tokenizer import IM_END, IM_START

    rng = random.Random(p.seed)
    out = []
    for q in problems:
        out.append(f"{IM_START}user\n{q.text()}{IM_END}\n{IM_START}assistant\n<think>\n"
                   f"{task.worked_solution(q, rng, p.sft.noise)}{IM_END}\n")
    return out


def tiny_qwen2(p: BuildParams, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                      num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                      num_key_value_heads=p.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg)


def model_difficulty(model, tok, encode, problems: list[task.ArithProblem], n: int, seed: int,
                     max_new_tokens: int, chunk: int = 512) -> list[int]:
    """Correct count out of ``n`` samples at temperature 1 per problem (the offline filter's input)."""
    import torch

    from async_or1.embedded.sampling import correct_flags

    prompts = [encode(q) for q in problems for _ in range(n)]
    golds = [str(q.answer()) for q in problems for _ in range(n)]
    right = correct_flags(model, tok, prompts, golds, generator=torch.Generator().manual_seed(seed + 17),
                          max_new_tokens=max_new_tokens, chunk=chunk)
    return [sum(right[k * n:(k + 1) * n]) for k in range(len(problems))]


def build(out: Path, p: BuildParams, log: Callable[[str], None] = print) -> dict:
    """Build everything into ``out`` (an empty directory). Returns the build report."""
    import torch

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        train, heldout = make_splits(p)
        draw = sft_drawer(p, heldout)
        corpus_rng = random.Random(p.seed + 3)
        tok_dir = out / "model"
        tok = build_tokenizer(tokenizer_corpus(p, [draw(corpus_rng) for _ in range(3000)]), tok_dir, p.vocab_size)
        log(f"[embedded] tokenizer: {len(tok)} tokens ({time.time() - t0:.1f}s)")

        def encode(q: task.ArithProblem) -> list[int]:
            from async_or1.data.template import encode_prompt

            return encode_prompt(tok, [{"role": "user", "content": q.text()}])

        torch.manual_seed(p.seed)
        model = tiny_qwen2(p, tok)
        n_params = sum(x.numel() for x in model.parameters())
        log(f"[embedded] model: Qwen2 {p.num_layers}x{p.hidden_size}, {n_params / 1e6:.2f}M parameters; "
            f"SFT up to {p.sft.max_steps} steps")
        report = train_sft(model, tok, encode, draw, heldout, p.sft, p.seed, log)
        final = accuracy(model, tok, [encode(q) for q in heldout[:p.final_eval_problems]],
                         [str(q.answer()) for q in heldout[:p.final_eval_problems]], seed=p.seed + 1,
                         max_new_tokens=p.sft.max_new_tokens)
        log(f"[embedded] held-out accuracy at temperature 1: {final:.3f} ({time.time() - t0:.0f}s)")
        counts: list[int] = []
        if p.difficulty_n > 0:
            counts = model_difficulty(model, tok, encode, train, p.difficulty_n, p.seed, p.sft.max_new_tokens)
            log(f"[embedded] model_difficulty of {len(train)} train problems ({p.difficulty_n} samples each): "
                f"{sum(c == 0 for c in counts)} at 0/{p.difficulty_n}, "
                f"{sum(c == p.difficulty_n for c in counts)} at {p.difficulty_n}/{p.difficulty_n} "
                f"({time.time() - t0:.0f}s)")
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tok_dir), safe_serialization=True)
        write_rows(out / "train.jsonl", [
            task.to_row(q, i, "train", {MODEL_NAME: counts[i]} if counts else None) for i, q in enumerate(train)])
        write_rows(out / "heldout.jsonl", [task.to_row(q, i, "heldout") for i, q in enumerate(heldout)])
    finally:
        torch.set_num_threads(prev_threads)
    return {"parameters": n_params, "sft": report, "heldout_accuracy_t1": final, "difficulty_n": p.difficulty_n,
            "difficulty_model": MODEL_NAME, "seconds": round(time.time() - t0, 1), "n_train": len(train),
            "n_heldout": len(heldout)}
