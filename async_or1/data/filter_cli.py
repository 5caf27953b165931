"""``async-or1 data filter``: offline model-aware difficulty estimation (paper section 6.2).

N rollouts per problem with the torch engine, scored by the real verifiers; each row gets
its correct count as ``extra_info.model_difficulty[model_name]``; rows at 0/N and N/N are
dropped (counted). Rows keep every other field as they were.
"""

from __future__ import annotations

import copy
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from async_or1.data.filter import difficulty_verdict
from async_or1.data.rows import iter_rows, parse_row, write_rows
from async_or1.data.template import encode_prompt


def response_text(tokenizer: Any, tokens: list[int], stop_ids: set[int]) -> str:
    """Decode a response for the verifier: special tokens kept (``</think>`` may be one), the
    trailing stop token dropped."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    except OSError:
        pass
    if not ids:
        raise ValueError(f"{model_path}: no eos token in the tokenizer or generation_config; cannot stop sampling")
    return sorted(ids)


def _request_seed(seed: int, uid: str, k: int) -> int:
    """Stable across processes (str hash() is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(uid.encode()) * 64 + k) % (2**31)


def count_correct(engine: Any, pool: Any, tokenizer: Any, problems: list[Any], *, n: int, max_response_tokens: int,
                  temperature: float, stop_ids: list[int], seed: int = 0, progress: Any = None) -> list[int]:
    """Correct answers out of ``n`` samples for each problem."""
    from async_or1.generation.engine import GenRequest, SamplingParams

    reqs = []
    for p in problems:
        ids = encode_prompt(tokenizer, p.prompt)
        for k in range(n):
            params = SamplingParams(temperature=temperature, max_new_tokens=max_response_tokens,
                                    stop_token_ids=list(stop_ids), seed=_request_seed(seed, p.uid, k))
            reqs.append(GenRequest(f"{p.uid}#{k}", ids, params))
    results = engine.generate(reqs, on_result=(lambda r: progress.update(1)) if progress is not None else None)
    stop = set(stop_ids)
    items = [(p.ability, response_text(tokenizer, r.tokens, stop), p.ground_truth)
             for p, r in zip([p for p in problems for _ in range(n)], results)]
    scores = pool.score(items)
    return [sum(int(s.correct) for s in scores[i * n:(i + 1) * n]) for i in range(len(problems))]


def main(model: str, data: str, n: int, out: str, model_name: str | None = None, max_response_tokens: int = 1024,
         temperature: float = 1.0, workers: int = 2, max_batch_size: int = 64) -> int:
    from async_or1.generation.torch_engine import TorchEngine
    from async_or1.progress import bar
    from async_or1.rewards.pool import RewardPool

    if n < 1:
        print(f"async-or1 data filter: --n must be >= 1, got {n}", file=sys.stderr)
        return 2
    name = model_name or Path(model.rstrip("/")).name
    rows = []
    for i, row in iter_rows(data):
        rows.append((row, parse_row(row, f"{data}:{i}", f"{Path(data).name}:{i}")))
    engine = TorchEngine(model, max_batch_size=max_batch_size, seed=0)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        print(f"async-or1 data filter: {model} has no tokenizer files", file=sys.stderr)
        return 2
    stops = stop_token_ids(tokenizer, model)
    chunk = max(1, max_batch_size // n) * 4          # problems per generate() call: a few batches' worth
    counts: Counter = Counter()
    kept_rows = []
    print(f"filter: {len(rows)} problems x {n} rollouts with {model} (model_difficulty key {name!r})", flush=True)
    with RewardPool(workers=workers) as pool, bar(len(rows) * n, "filter", unit="sample") as pb:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            correct = count_correct(engine, pool, tokenizer, [p for _, p in part], n=n,
                                    max_response_tokens=max_response_tokens, temperature=temperature,
                                    stop_ids=stops, progress=pb)
            for (row, _), c in zip(part, correct):
                verdict = difficulty_verdict(c, n)
                counts[verdict] += 1
                if verdict == "kept":
                    new = copy.deepcopy(row)
                    extra = new.get("extra_info") or {}
                    md = dict(extra.get("model_difficulty") or {})
                    md[name] = c
                    extra["model_difficulty"] = md
                    new["extra_info"] = extra
                    kept_rows.append(new)
            pb.set_postfix_str(f"kept {counts['kept']}, 0/{n} {counts['all_wrong']}, {n}/{n} {counts['all_correct']}")
    engine.close()
    write_rows(out, kept_rows)
    total = len(rows)
    print(f"filter: kept {counts['kept']}/{total}; dropped {counts['all_wrong']} at 0/{n} and "
          f"{counts['all_correct']} at {n}/{n}; wrote {out}")
    return 0
