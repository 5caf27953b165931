"""Work on the generator pool without a learner: ``async-or1 eval``, ``async-or1 data filter``
and ``launch.run_eval``.

The same generator processes as a training run — same engine (SGLang on GPU, the torch engine
here), devices, dtype and reward pool, from the same config — with a controller in this process
that serves evaluation leases only (learner/controller.py, eval.EvalBook). The model is loaded by
the generators and never here; the supervisor holds the tokenizer (to decode samples.jsonl).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("async_or1.launch_pool")


def run_on_pool(cfg: Any, model_path: str, book: Any, evals: list, work_dir: Path, what: str = "eval") -> list:
    """Run the evaluations ``[(label, step)]`` of ``book`` on generator processes serving
    ``model_path``; returns [(label, step, EvalResult)]. Generator logs in work_dir/logs; a generator
    that dies is restarted (generation.max_restarts) and its prompts are sampled again."""
    from async_or1.launch import build_spec, prepare_keys
    from async_or1.launch.local import generator_children
    from async_or1.launch_spec import write_spec
    from async_or1.learner.controller import Controller
    from async_or1.learner.loop import zmq_endpoint

    import dataclasses

    # The pool is generator processes over ZeroMQ whatever the run's transport (an inproc run's too).
    cfg = dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, kind="zmq"))
    work_dir.mkdir(parents=True, exist_ok=True)
    prepare_keys(cfg, work_dir)   # the pool's generators authenticate as in a run (fresh keys per pool)
    spec = build_spec(cfg, {"model_path": model_path, "tokenizer_path": cfg.model.tokenizer_path or model_path,
                            "train_files": [], "eval_files": []}, work_dir)
    spec_path = work_dir / "pool.json"
    write_spec(spec_path, spec)
    endpoint = zmq_endpoint(cfg, spec)
    ctl = Controller(endpoint=endpoint, num_generators=cfg.generation.num_generators, evals=book,
                     generator_timeout_s=cfg.transport.generator_timeout_s)
    gens = generator_children(cfg, spec, spec_path, work_dir)
    print(f"async-or1 {what}: {len(gens)} generator(s) on {cfg.generation.devices or 'any'} "
          f"({cfg.generation.engine}, {cfg.model.dtype}); logs in {work_dir / 'logs'}", flush=True)
    ctl.start()
    try:
        for ch in gens:
            ch.start()
        for label, step in evals:
            ctl.request_eval(label, step, 0)
        _supervise(ctl, gens, cfg, what, len(book.order), book.k, len(evals))
        return ctl.take_finished_evals()
    finally:
        ctl.finish()
        try:
            ctl.flush()
        except RuntimeError:
            pass
        for ch in gens:
            if ch.wait(30) is None:
                ch.signal(signal.SIGTERM)
                if ch.wait(10) is None:
                    ch.signal(signal.SIGKILL)
                    ch.wait(10)
        ctl.stop()
        endpoint.close()


def _supervise(ctl: Any, gens: list, cfg: Any, what: str, problems: int, k: int, evals: int) -> None:
    """Until every evaluation is back: restart dead generators, show progress (a bar in samples),
    fail when nothing comes back for buffer.wait_timeout_s."""
    from async_or1.progress import bar

    last_done, since = -1, time.monotonic()
    with bar(problems * k * evals, f"{what}: {problems} problems x {k}", unit="sample") as pb:
        while True:
            ctl.raise_if_failed()
            n, done, total = ctl.evals_unfinished()
            back = (evals - n) * problems + done          # problems back, finished evaluations included
            pb.update((back - pb.n // k) * k)
            if n == 0:
                return
            now = time.monotonic()
            if done != last_done:
                last_done, since = done, now
            elif now - since > cfg.buffer.wait_timeout_s:
                raise SystemExit(f"async-or1 {what}: no result for {cfg.buffer.wait_timeout_s:.0f} s ({done}/{total} "
                                 f"problems back); see {gens[0].log_path.parent}")
            for ch in gens:
                rc = ch.poll()
                if rc is None:
                    continue
                if ch.restarts >= cfg.generation.max_restarts:
                    raise SystemExit(f"async-or1 {what}: {ch.name} died (exit {rc}) {ch.restarts + 1} times. Last "
                                     f"log lines ({ch.log_path}):\n{ch.tail()}")
                ch.restarts += 1
                print(f"async-or1 {what}: {ch.name} died (exit {rc}); restarting it", file=sys.stderr, flush=True)
                ch.start()
            time.sleep(0.2)


def _pool_config(cfg: Any, model_path: str, temperature: float | None, seed: int | None) -> Any:
    import dataclasses

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    if temperature is not None:
        cfg.algo = dataclasses.replace(cfg.algo, temperature=temperature)
    if seed is not None:
        cfg.seed = seed
    return cfg


def evaluate_model(cfg: Any, model_path: str, eval_files: list, *, label: str = "eval", step: int = 0,
                   k: int | None = None, max_response_tokens: int | None = None, max_problems: int | None = None,
                   out_dir: Path | None = None) -> Any:
    """avg@k / pass@k of ``model_path`` on ``eval_files`` on the generator pool of ``cfg``; writes
    samples.jsonl and summary.json to ``out_dir``. Defaults from cfg.eval."""
    import numpy as np

    from async_or1.data.prepare import check_fits, check_model, load_tokenizer, prepare_eval
    from async_or1.generation.text import response_text
    from async_or1.eval import EvalBook, write_outputs

    k = k or cfg.eval.k
    max_tokens = max_response_tokens or cfg.eval_response_tokens
    max_problems = cfg.eval.max_problems if max_problems is None else max_problems
    tok = load_tokenizer(cfg.model.tokenizer_path or model_path)
    model = check_model(model_path, tok)
    stops = set(model["stop_ids"])
    data = prepare_eval(eval_files, tok, max_prompt_tokens=cfg.data.max_prompt_tokens, max_problems=max_problems)
    check_fits(data, model["positions"], max_tokens, "eval")
    book = EvalBook(data.problems, {u: np.asarray(t, dtype=np.int32) for u, t in data.token_ids.items()}, k=k,
                    max_response_tokens=max_tokens, seed=cfg.seed,
                    decode=lambda toks: response_text(tok, [int(t) for t in toks], stops))
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "eval" / Path(model_path).name
    [(_, _, res)] = run_on_pool(cfg, model_path, book, [(label, step)], out_dir, "eval")
    write_outputs(res, out_dir, {"model": str(model_path), "data": [str(p) for p in eval_files], "k": k,
                                 "temperature": cfg.algo.temperature, "max_response_tokens": max_tokens,
                                 "seed": cfg.seed, "data_counts": dict(data.counts)})
    return res


def eval_main(cfg: Any, model: str, data: str | None, k: int, temperature: float, max_response_tokens: int | None,
              out: str | None, max_problems: int, seed: int) -> int:
    """``async-or1 eval``."""
    from async_or1.embedded import BUILTIN_MODELS, ensure_builtin

    files = [data] if data else []
    if model in BUILTIN_MODELS:
        paths = ensure_builtin(model)
        model = str(paths.model)
        files = files or [str(paths.heldout)]
    if not files:
        raise SystemExit(f"eval: --data is required unless --model is one of {', '.join(BUILTIN_MODELS)}")
    cfg = _pool_config(cfg, model, temperature, seed)
    out_dir = Path(out) if out else Path("runs") / "eval" / Path(model).name
    res = evaluate_model(cfg, model, files, k=k, max_response_tokens=max_response_tokens, max_problems=max_problems,
                         out_dir=out_dir)
    print(f"{len(res.per_problem)} problems × {k} samples in {res.seconds:.1f} s")
    print(f"avg@{k}: {res.avg_at_k:.4f}")
    for kk, v in res.pass_at_k.items():
        print(f"pass@{kk}: {v:.4f}")
    print(f"samples: {out_dir / 'samples.jsonl'}  summary: {out_dir / 'summary.json'}")
    return 0


def filter_main(cfg: Any, model: str, data: str, n: int, out: str, model_name: str | None = None,
                max_response_tokens: int | None = None, temperature: float = 1.0) -> int:
    """``async-or1 data filter``: N rollouts per problem on the generator pool, the correct count
    written into extra_info.model_difficulty[model_name], 0/N and N/N rows dropped (counted)."""
    from collections import Counter

    import numpy as np

    from async_or1.data.filter_cli import filtered_rows
    from async_or1.data.prepare import DataError, check_fits, check_model, encode_all, load_tokenizer
    from async_or1.data.rows import RowError, iter_rows, parse_row, write_rows
    from async_or1.eval import EvalBook

    if n < 1:
        raise DataError(f"async-or1 data filter: --n must be >= 1, got {n}")
    name = model_name or Path(model.rstrip("/")).name
    max_response_tokens = max_response_tokens or cfg.stages[-1].max_response_tokens
    rows, problems = [], []
    try:
        for i, row in iter_rows(data):
            rows.append(row)
            problems.append(parse_row(row, f"{data}:{i}", f"{Path(data).name}:{i}"))
    except (RowError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    cfg = _pool_config(cfg, model, temperature, None)
    tok = load_tokenizer(cfg.model.tokenizer_path or model)
    positions = check_model(model, tok)["positions"]
    prepared = encode_all(tok, problems, cfg.data.max_prompt_tokens, Counter())
    check_fits(prepared, positions, max_response_tokens, "filter")
    book = EvalBook(prepared.problems, {u: np.asarray(t, dtype=np.int32) for u, t in prepared.token_ids.items()},
                    k=n, max_response_tokens=max_response_tokens, seed=cfg.seed, keep_samples=False)
    print(f"filter: {len(problems)} problems x {n} rollouts with {model} (model_difficulty key {name!r})", flush=True)
    work = Path(out).with_name(Path(out).name + ".pool")
    [(_, _, res)] = run_on_pool(cfg, model, book, [("filter", 0)], work, "data filter")
    correct = {p["uid"]: p["correct"] for p in res.per_problem}
    kept, counts = filtered_rows(rows, [correct.get(p.uid) for p in problems], n, name)
    counts["prompt_too_long"] = prepared.counts.get("prompt_too_long", 0)
    write_rows(out, kept)
    print(f"filter: kept {counts['kept']}/{len(rows)}; dropped {counts['all_wrong']} at 0/{n}, "
          f"{counts['all_correct']} at {n}/{n} and {counts['prompt_too_long']} over data.max_prompt_tokens; "
          f"wrote {out} ({res.seconds:.0f} s)")
    return 0
