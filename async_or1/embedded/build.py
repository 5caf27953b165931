"""Build the embedded default: tokenizer, task rows, tiny Qwen2 model (SFT warm start), then one
sampling pass through the project's own torch engine for the held-out accuracy and the train
rows' difficulty counts.

Everything is a pure function of ``BuildParams`` (its ``threads`` included: the thread count
changes float summation order) and the library versions: same params, same files. Sampling is
seeded per request, so the pass does not depend on how the engine batches.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from async_or1.data.rows import write_rows
from async_or1.embedded import task
from async_or1.embedded.sft import SFTParams, train_sft
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
    # torch threads for the whole build (part of the result, see above). Two sleeping threads (the
    # CLI sets OMP_WAIT_POLICY=PASSIVE) were the fastest on the shared 2-core machine; spinning ones
    # collapse there (see async_or1/cli.py).
    threads: int = 2
    sft: SFTParams = field(default_factory=SFTParams)
    difficulty_n: int = 4              # rollouts per train problem for model_difficulty (0: skip)
    heldout_k: int = 8                 # samples per held-out problem for the reported accuracy (avg@k, T=1)
    engine_batch: int = 256            # the sampling pass's TorchEngine max_batch_size

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


def request_seed(seed: int, split: int, index: int, sample: int) -> int:
    """Per-request sampling seed: a pure function of the request, never of batching or order."""
    return (seed * 1_000_003 + split * 100_003 + index * 64 + sample) % (2**31)


def sampling_pass(model_dir: Path, encode: Callable[[task.ArithProblem], list[int]], eos_id: int,
                  jobs: list[tuple[list[task.ArithProblem], int]], p: BuildParams) -> tuple[list[list[int]], str]:
    """For each (problems, n) job: the correct count out of n samples at temperature 1 per problem,
    every job's requests in one engine run (one bar); and a SHA-256 of every sampled token.

    A sample is right when the last ``\\boxed{}`` after ``</think>`` is the gold integer as written
    (what the math verifier's exact-match path accepts; its parser, in worker processes, would cost
    more than the sampling here)."""
    import numpy as np

    from async_or1.embedded.tokenizer import END_THINK
    from async_or1.generation.engine import GenRequest, SamplingParams
    from async_or1.generation.torch_engine import TorchEngine
    from async_or1.progress import bar

    reqs, golds = [], []
    for split, (problems, n) in enumerate(jobs):
        for i, q in enumerate(problems):
            ids = encode(q)
            for j in range(n):
                reqs.append(GenRequest(f"{split}/{i}/{j}", ids, SamplingParams(
                    temperature=1.0, max_new_tokens=p.sft.max_new_tokens, stop_token_ids=[eos_id],
                    seed=request_seed(p.seed, split, i, j))))
                golds.append(str(q.answer()))
    engine = TorchEngine(str(model_dir), max_batch_size=p.engine_batch, seed=p.seed)
    tok = engine.tokenizer
    try:
        with bar(len(reqs), "[embedded] sampling (held-out" + (", difficulty)" if len(jobs) > 1 else ")"),
                 unit="sample") as pb:
            results = engine.generate(reqs, on_result=lambda r: pb.update(1))
    finally:
        engine.close()
    digest = hashlib.sha256()
    for r in results:                       # every sampled token, in request order: the pass's fingerprint
        digest.update(np.asarray(r.tokens, dtype="<i4").tobytes() + b"|")
    right = []
    for r, gold in zip(results, golds):
        text = tok.decode([t for t in r.tokens if t != eos_id], skip_special_tokens=False)
        right.append(END_THINK in text and boxed_answer(text.split(END_THINK)[-1]) == gold)
    out, at = [], 0
    for problems, n in jobs:
        out.append([sum(right[at + k * n:at + (k + 1) * n]) for k in range(len(problems))])
        at += n * len(problems)
    return out, digest.hexdigest()


def boxed_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` content of ``text`` (the answer part after ``</think>``)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def build(out: Path, p: BuildParams, log: Callable[[str], None] = print) -> dict:
    """Build everything into ``out`` (an empty directory). Returns the build report."""
    import torch

    from transformers.utils import logging as hf_logging

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()        # its save/load bars for a 4 MB model are noise beside ours
    try:
        train, heldout = make_splits(p)
        draw = sft_drawer(p, heldout)
        corpus_rng = random.Random(p.seed + 3)
        model_dir = out / "model"
        tok = build_tokenizer(tokenizer_corpus(p, [draw(corpus_rng) for _ in range(3000)]), model_dir, p.vocab_size)
        log(f"[embedded] tokenizer: {len(tok)} tokens ({time.time() - t0:.1f}s)")

        def encode(q: task.ArithProblem) -> list[int]:
            from async_or1.data.template import encode_prompt

            return encode_prompt(tok, [{"role": "user", "content": q.text()}])

        torch.manual_seed(p.seed)
        model = tiny_qwen2(p, tok)
        n_params = sum(x.numel() for x in model.parameters())
        log(f"[embedded] model: Qwen2 {p.num_layers}x{p.hidden_size}, {n_params / 1e6:.2f}M parameters; "
            f"SFT {p.sft.max_steps} steps of {p.sft.batch_size}")
        report = train_sft(model, tok, encode, draw, heldout, p.sft, p.seed, log)
        log(f"[embedded] SFT: loss {report['loss_curve'][-1][1]:.3f} after {report['steps']} steps "
            f"({report['seconds']:.0f}s)")
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(model_dir), safe_serialization=True)
        t_pass = time.time()
        jobs = [(heldout, p.heldout_k)] + ([(train, p.difficulty_n)] if p.difficulty_n > 0 else [])
        found, samples_sha256 = sampling_pass(model_dir, encode, tok.eos_token_id, jobs, p)
        final = sum(found[0]) / max(1, p.heldout_k * len(heldout))
        counts = found[1] if p.difficulty_n > 0 else []
        log(f"[embedded] held-out accuracy at temperature 1: {final:.3f} (avg@{p.heldout_k} over {len(heldout)}"
            f" problems)" + (f"; model_difficulty of {len(train)} train problems ({p.difficulty_n} samples each): "
                             f"{sum(c == 0 for c in counts)} at 0/{p.difficulty_n}, "
                             f"{sum(c == p.difficulty_n for c in counts)} at {p.difficulty_n}/{p.difficulty_n}"
                             if counts else "") + f" ({time.time() - t_pass:.0f}s)")
        write_rows(out / "train.jsonl", [
            task.to_row(q, i, "train", {MODEL_NAME: counts[i]} if counts else None) for i, q in enumerate(train)])
        write_rows(out / "heldout.jsonl", [task.to_row(q, i, "heldout") for i, q in enumerate(heldout)])
    finally:
        torch.set_num_threads(prev_threads)
        if hf_bars:
            hf_logging.enable_progress_bar()
    return {"parameters": n_params, "sft": report, "heldout_accuracy_t1": final, "heldout_k": p.heldout_k,
            "difficulty_n": p.difficulty_n, "difficulty_model": MODEL_NAME, "seconds": round(time.time() - t0, 1),
            "sampling_seconds": round(time.time() - t_pass, 1), "samples_sha256": samples_sha256,
            "n_train": len(train), "n_heldout": len(heldout)}
