"""``async-or1 train``: one command starts and supervises everything from one config.

    check the data, tokenizer and model config → run the processes → plots

The held-out evaluations (before, periodic, after) run inside the run, on the generators (eval
leases, learner/loop.py): the supervisor never loads the model.

The processes run where ``launch.backend`` says: ``local`` spawns M learner ranks + N generators
on this machine's split device pools (``launch/local.py``); ``ray`` runs the same processes on a
Ray cluster, one per actor (``launch/ray.py``). ``launch/slurm.py`` writes the batch script that
brings a Ray cluster up inside a Slurm allocation. ``run_role`` is the manual multi-node path
(torchrun for the learner, ``--role generator`` on each generator node).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("async_or1.launch")


def resolve_inputs(cfg: Any) -> dict:
    """Model, tokenizer and data paths; the embedded default is built (once) here."""
    model = cfg.model.path
    train_files, eval_files = list(cfg.data.train_files), list(cfg.data.eval_files)
    from async_or1.embedded import BUILTIN_MODELS, ensure_builtin

    if model in BUILTIN_MODELS:
        paths = ensure_builtin(model)
        model = str(paths.model)
        train_files = train_files or [str(paths.train)]
        eval_files = eval_files or [str(paths.heldout)]
    from async_or1.data.prepare import DataError

    if not Path(model).is_dir():
        raise DataError(f"model.path: {model} is not a local directory (download the checkpoint first; "
                        "nothing is fetched at run time)")
    if not train_files:
        raise DataError("data.train_files is empty: give parquet or JSONL files in the Skywork-OR1-RL-Data layout")
    return {"model_path": model, "tokenizer_path": cfg.model.tokenizer_path or model,
            "train_files": train_files, "eval_files": eval_files}


def check_data(cfg: Any, inputs: dict) -> dict:
    """Everything the learner will load, checked here before any process starts: the tokenizer,
    the model's config, every training row (file, row and field named on error) and the eval rows.
    Raises data.prepare.DataError (the CLI prints its one line and exits 2). Returns the counts."""
    from async_or1.data.prepare import check_fits, check_model, load_tokenizer, prepare, prepare_eval

    d = cfg.data
    tok = load_tokenizer(inputs["tokenizer_path"])
    positions = check_model(inputs["model_path"], tok)["positions"]
    train = prepare(inputs["train_files"], tok, max_prompt_tokens=d.max_prompt_tokens, on_bad_row=d.on_bad_row,
                    abilities=d.abilities, difficulty_model=d.difficulty_model, difficulty_n=d.difficulty_n)
    check_fits(train, positions, max(s.max_response_tokens for s in cfg.stages), "training")
    counts = {"train": dict(train.counts)}
    if inputs["eval_files"] and cfg.eval.k > 0:
        held = prepare_eval(inputs["eval_files"], tok, max_prompt_tokens=d.max_prompt_tokens,
                            max_problems=cfg.eval.max_problems)
        check_fits(held, positions, cfg.eval_response_tokens, "eval")
        counts["eval"] = dict(held.counts)
    print(f"async-or1: data: {len(train.problems)} training problems ({counts['train']})"
          + (f"; eval {counts['eval']}" if "eval" in counts else ""), flush=True)
    return counts


def check_code_sandbox(cfg: Any, train_files: list) -> None:
    """Refuse to start when code rows would be scored with less sandbox isolation than configured
    (``rewards.code_isolation``); a run whose data holds no code row does not need the sandbox."""
    if "code" not in cfg.data.abilities:
        return
    from async_or1.rewards.sandbox import SandboxUnavailable, require

    try:
        report = require(cfg.rewards.code_isolation)
    except SandboxUnavailable as e:
        from async_or1.data.rows import iter_rows

        if not any(isinstance(row, dict) and row.get("ability") == "code"
                   for path in train_files for _, row in iter_rows(path)):
            return
        raise SystemExit(f"async-or1: refusing to start: the data holds code rows and {e}") from None
    print(f"async-or1: code sandbox: {report.summary()}", flush=True)


def build_spec(cfg: Any, inputs: dict, run_dir: Path, kind: str | None = None,
               learner_master_port: int | None = None) -> dict:
    """What every process of the run reads. Ports left 0 in the config are picked free on this
    machine; the Ray backend passes a config whose hosts and ports it took from the nodes Ray chose."""
    from async_or1.config import to_dict
    from async_or1.launch_spec import device_kind, free_port

    kind = kind or device_kind()
    if kind == "cpu" and cfg.transport.weights_backend == "nccl":
        raise SystemExit("transport.weights_backend: 'nccl' needs GPUs and this machine has none (use 'auto' or 'gloo')")
    host = cfg.transport.host
    zmq_port = cfg.transport.port or free_port(host)
    return {
        "config": to_dict(cfg), "run_dir": str(run_dir), **inputs,
        "zmq_port": zmq_port,
        "address": f"tcp://{cfg.transport.learner_address}:{zmq_port}",
        "weights_host": cfg.transport.learner_address,
        "weights_port": cfg.transport.weights_port or free_port(host),
        "weights_backend": (("nccl" if kind == "cuda" else "gloo") if cfg.transport.weights_backend == "auto"
                            else cfg.transport.weights_backend),
        "weights_layout": cfg.generation.sglang_weight_layout if cfg.generation.engine == "sglang" else "flat",
        "learner_backend": "nccl" if kind == "cuda" else "gloo",
        "learner_master_port": learner_master_port or free_port("127.0.0.1"),
        "keys_dir": cfg.transport.keys_dir or str(run_dir / "keys"),
        "device_kind": kind,
        "generator_devices": list(cfg.generation.devices),
        "learner_devices": list(cfg.learner.devices),
    }


def run_eval(cfg: Any, model_path: str, eval_files: list, label: str, step: int, run_dir: Path) -> dict:
    """avg@k / pass@k of a saved model on the held-out rows, sampled by generator processes on the
    generator pool (launch_pool.py); appended to run_dir/metrics.jsonl as an eval row."""
    from async_or1.eval import eval_row, summary_line
    from async_or1.launch_pool import evaluate_model

    res = evaluate_model(cfg, model_path, eval_files, label=label, step=step, out_dir=run_dir / f"eval_{label}")
    row = eval_row(label, step, cfg.eval.k, res)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(summary_line(label, step, cfg.eval.k, res), flush=True)
    return row


def eval_rows(run_dir: Path) -> dict[str, dict]:
    """The run's evaluation rows by label (the last one of each label)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return {r["label"]: r for r in rows if r.get("eval")}


def run_role(cfg: Any, role: str, generator_id: int | None, resume: bool) -> int:
    """One part of a multi-node run, started by the user (or a cluster scheduler) on each node:
    ``learner`` under torchrun/deepspeed (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from it),
    ``generator`` with its id. Both sides derive the same addresses from the config alone, so the
    ports must be fixed there (transport.port, transport.weights_port) and transport.learner_address
    must be the learner rank 0 node's address."""
    from async_or1.launch_spec import apply_process_pinning, write_spec

    if not (cfg.transport.port and cfg.transport.weights_port):
        raise SystemExit("--role needs fixed ports: set transport.port and transport.weights_port (non-zero)")
    if cfg.transport.curve and not cfg.transport.keys_dir:
        raise SystemExit("--role needs transport.keys_dir: make the keys once with `async-or1 keys --dir D "
                         "--generators N`, copy D to every node, and set transport.keys_dir=D")
    logging.basicConfig(level=logging.INFO, format=f"[{role}] %(asctime)s %(message)s")
    inputs = resolve_inputs(cfg)
    if role == "generator":
        check_code_sandbox(cfg, inputs["train_files"])
    else:
        check_data(cfg, inputs)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = build_spec(cfg, inputs, run_dir)
    apply_process_pinning()
    if role == "learner":
        from async_or1.learner import loop

        return loop.run(spec, resume)
    if generator_id is None:
        raise SystemExit("--role generator needs --generator-id")
    spec_path = run_dir / f"launch_generator_{generator_id}.json"
    write_spec(spec_path, spec)
    from async_or1.generation import worker

    return worker.main(["--spec", str(spec_path), "--generator-id", str(generator_id)])


def prepare_keys(cfg: Any, run_dir: Path) -> None:
    """Fresh CURVE keys in <run_dir>/keys, or the given keys_dir checked, before anything starts."""
    if cfg.transport.kind != "zmq" or not cfg.transport.curve:
        return
    from async_or1.transport.keys import CurveKeyError, generator_keys, make_keys, server_keys

    keys_dir = cfg.transport.keys_dir or str(run_dir / "keys")
    if not cfg.transport.keys_dir:
        make_keys(keys_dir, cfg.generation.num_generators)
    try:
        server_keys(keys_dir, cfg.generation.num_generators)
        for g in range(cfg.generation.num_generators):
            generator_keys(keys_dir, g)
    except CurveKeyError as e:
        raise SystemExit(f"transport.keys_dir: {e}") from None


def train(cfg: Any, resume: bool = False, overwrite: bool = False, bench: dict | None = None) -> int:
    """``bench``: what the throughput benchmark asks of the learner (launch spec, not config)."""
    from async_or1.config import dump_yaml

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cluster = None
    if bench and cfg.launch.backend != "local":
        raise SystemExit("the throughput benchmark runs on the local backend (launch.backend=local)")
    if cfg.launch.backend == "ray":  # before anything expensive: no Ray, no cluster or too small a one fails here
        from async_or1.launch import ray as ray_backend

        cluster = ray_backend.connect(cfg)
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite):
        raise SystemExit(f"{run_dir} already holds a run: continue it with --resume, replace it with --overwrite, "
                         f"or pick another name= ")
    t0 = time.time()
    inputs = resolve_inputs(cfg)
    check_data(cfg, inputs)                     # before the run dir is touched or a process starts
    check_code_sandbox(cfg, inputs["train_files"])
    if overwrite and not resume and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_keys(cfg, run_dir)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    from async_or1.launch_spec import write_spec

    t_train = time.time()
    if cluster is not None:
        rc = ray_backend.run(cluster, cfg, inputs, run_dir, resume)
    else:
        spec = build_spec(cfg, inputs, run_dir)
        if bench:
            spec["bench"] = dict(bench)
        spec_path = run_dir / "launch.json"
        write_spec(spec_path, spec)
        if cfg.transport.kind == "inproc":
            from async_or1.inprocess import run_inprocess

            print(f"async-or1: run {run_dir} in one process (transport.kind=inproc), mode {cfg.mode}", flush=True)
            rc = run_inprocess(cfg, spec, resume)
        else:
            from async_or1.launch import local

            rc = local.run(cfg, spec, spec_path, run_dir, resume)
    train_s = time.time() - t_train
    if rc != 0:
        return rc
    evals = eval_rows(run_dir)
    before, after = evals.get("before"), evals.get("after")
    summary = {"run_dir": str(run_dir), "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
               "eval_before": before, "eval_after": after}
    if before and after:
        summary["heldout_gain_points"] = round(100 * (after["avg_at_k"] - before["avg_at_k"]), 2)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.log.plots:
        from async_or1.plots import plot_run

        pngs = plot_run(run_dir)
        print(f"plots: {', '.join(str(p) for p in pngs)}")
    if before and after:
        print(f"held-out avg@{cfg.eval.k}: {before['avg_at_k']:.3f} → {after['avg_at_k']:.3f} "
              f"({summary['heldout_gain_points']:+.1f} points) in {summary['total_seconds']:.0f} s "
              f"({train_s:.0f} s training, evaluations included)")
    return 0
