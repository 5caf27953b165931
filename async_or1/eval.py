"""``async-or1 eval``: avg@k (the paper's primary metric) and the unbiased pass@k estimator.

k samples per problem from the engine, scored by the same verifiers as training. avg@k is the
mean correctness over all k samples, averaged over problems. pass@k uses the unbiased
estimator 1 − C(n−c, k)/C(n, k) (n samples, c correct), computed as a stable product — not the
"any of n correct" fraction the reference code called pass@n.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORE_CHUNK = 256          # responses per reward_pool.score call (the scoring bar's step)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − Π_{i=n−c+1}^{n} (1 − k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, … ≤ n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def aggregate(correct_counts: list[int], n: int) -> tuple[float, dict[int, float]]:
    """(avg@n, {k: mean pass@k}) over problems with ``correct_counts`` out of n each."""
    if not correct_counts:
        return 0.0, {}
    avg = sum(correct_counts) / (n * len(correct_counts))
    return avg, {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks_up_to(n)}


@dataclass
class EvalResult:
    avg_at_k: float
    pass_at_k: dict[int, float]
    per_problem: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(engine: Any, tokenizer: Any, problems: list, *, k: int, temperature: float, max_response_tokens: int,
             reward_pool: Any, seed: int = 0, stop_ids: list[int] | None = None) -> EvalResult:
    """Sample k responses per problem with an already-built engine and score them."""
    from async_or1.data.filter_cli import _request_seed, response_text
    from async_or1.data.template import encode_prompt
    from async_or1.generation.engine import GenRequest, SamplingParams
    from async_or1.progress import bar

    t0 = time.perf_counter()
    stop = list(stop_ids if stop_ids is not None else [tokenizer.eos_token_id])
    reqs = []
    for p in problems:
        ids = encode_prompt(tokenizer, p.prompt)
        for j in range(k):
            reqs.append(GenRequest(f"{p.uid}/{j}", ids, SamplingParams(
                temperature=temperature, max_new_tokens=max_response_tokens, stop_token_ids=stop,
                seed=_request_seed(seed, p.uid, j))))
    with bar(len(reqs), f"eval: {len(problems)} problems x {k}", unit="sample") as pb:
        results = engine.generate(reqs, on_result=lambda r: pb.update(1))
    texts = [response_text(tokenizer, r.tokens, set(stop)) for r in results]
    items = [(p.ability, texts[i * k + j], p.ground_truth) for i, p in enumerate(problems) for j in range(k)]
    scores = []
    with bar(len(items), "eval: scoring", unit="sample") as pb:
        for at in range(0, len(items), SCORE_CHUNK):   # chunks only to show progress (code tests are slow)
            scores += reward_pool.score(items[at:at + SCORE_CHUNK])
            pb.update(len(items[at:at + SCORE_CHUNK]))
    samples, per_problem, counts = [], [], []
    for i, p in enumerate(problems):
        c = 0
        for j in range(k):
            r, s = results[i * k + j], scores[i * k + j]
            c += bool(s.correct)
            samples.append({"uid": p.uid, "sample": j, "response": texts[i * k + j], "tokens": len(r.tokens),
                            "finish_reason": r.finish_reason, "correct": bool(s.correct), "reason": s.reason})
        counts.append(c)
        per_problem.append({"uid": p.uid, "correct": c, "n": k})
    avg, pk = aggregate(counts, k)
    return EvalResult(avg, pk, per_problem, samples, time.perf_counter() - t0)


def load_any_problems(paths: list) -> list:
    from async_or1.data.rows import load_eval_problems

    return load_eval_problems(paths)


def write_outputs(res: EvalResult, out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "samples.jsonl").open("w") as f:
        for s in res.samples:
            f.write(json.dumps(s) + "\n")
    summary = {**meta, "avg_at_k": res.avg_at_k, "pass_at_k": {str(k): v for k, v in res.pass_at_k.items()},
               "problems": len(res.per_problem), "seconds": round(res.seconds, 2), "per_problem": res.per_problem}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def evaluate_path(model_path: str, eval_files: list, *, k: int, temperature: float, max_response_tokens: int,
                  max_problems: int = 0, workers: int = 2, seed: int = 0, require_think: bool = True,
                  out_dir: Path | None = None, max_batch_size: int = 256) -> EvalResult:
    """Build the engine and reward pool for ``model_path``, evaluate, write outputs."""
    from transformers import AutoTokenizer

    from async_or1.data.filter_cli import stop_token_ids
    from async_or1.generation.torch_engine import TorchEngine
    from async_or1.rewards.pool import RewardPool

    problems = load_any_problems(eval_files)
    if max_problems:
        problems = problems[:max_problems]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = TorchEngine(model_path, max_batch_size=max_batch_size, seed=seed)
    try:
        with RewardPool(workers=workers, require_think=require_think) as pool:
            res = evaluate(engine, tokenizer, problems, k=k, temperature=temperature,
                           max_response_tokens=max_response_tokens, reward_pool=pool, seed=seed,
                           stop_ids=stop_token_ids(tokenizer, model_path))
    finally:
        engine.close()
    if out_dir is not None:
        write_outputs(res, Path(out_dir), {"model": str(model_path), "data": [str(p) for p in eval_files], "k": k,
                                           "temperature": temperature, "max_response_tokens": max_response_tokens})
    return res


def main(model: str, data: str | None, k: int, temperature: float, max_response_tokens: int, out: str | None,
         workers: int, max_problems: int, seed: int) -> int:
    files = [data] if data else []
    from async_or1.embedded import BUILTIN_MODELS, ensure_builtin

    if model in BUILTIN_MODELS:
        paths = ensure_builtin(model)
        model = str(paths.model)
        files = files or [str(paths.heldout)]
    if not files:
        raise SystemExit(f"eval: --data is required unless --model is one of {', '.join(BUILTIN_MODELS)}")
    out_dir = Path(out) if out else Path("runs") / "eval" / Path(model).name
    res = evaluate_path(model, files, k=k, temperature=temperature, max_response_tokens=max_response_tokens,
                        max_problems=max_problems, workers=workers, seed=seed, out_dir=out_dir)
    print(f"{len(res.per_problem)} problems × {k} samples in {res.seconds:.1f} s")
    print(f"avg@{k}: {res.avg_at_k:.4f}")
    for kk, v in res.pass_at_k.items():
        print(f"pass@{kk}: {v:.4f}")
    print(f"samples: {out_dir / 'samples.jsonl'}  summary: {out_dir / 'summary.json'}")
    return 0
