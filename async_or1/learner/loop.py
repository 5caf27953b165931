"""The learner process: one loop of named, timed phases, run by every learner rank.

    wait for the step's batch → policy update (learner/update.py: N_SGD × N_reuse optimizer steps)
    → version += 1 → broadcast → log

A version is one training step (one rollout batch), whatever its number of optimizer steps.

Rank 0 also owns the rollout side of the learner: the replay buffer, the prompt source and the
controller thread that talks to the generators. It cuts each step's batch into per-rank shards
of micro-batches (never splitting a response; every rank runs the same number of micro-batches,
because ZeRO-3 gathers parameters collectively in every forward) and ships them to the ranks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("async_or1.learner")


class RolloutSide:
    """Rank 0's buffer + prompt source + eval book + controller thread, built from the launch spec.

    The data goes through the same ``data.prepare`` the launcher ran before spawning anything,
    so the problems, their prompt ids and the drop counts are the ones it checked."""

    def __init__(self, cfg: Any, spec: dict, tokenizer: Any, resume_state: dict | None, endpoint: Any) -> None:
        import numpy as np

        from async_or1.data.prepare import check_model, prepare

        d = cfg.data
        model = check_model(spec["model_path"], tokenizer)
        data = prepare(spec["train_files"], tokenizer, max_prompt_tokens=d.max_prompt_tokens,
                       on_bad_row=d.on_bad_row, abilities=d.abilities, difficulty_model=d.difficulty_model,
                       difficulty_n=d.difficulty_n)
        self.data_counts = dict(data.counts)
        self.evals = eval_book(cfg, spec, tokenizer, model["stop_ids"])
        self.endpoint = endpoint
        ids = {u: np.asarray(t, dtype=np.int32) for u, t in data.token_ids.items()}
        self.source, self.buffer, self.controller = rollout_side_parts(
            cfg, data.problems, lambda pr: ids[pr.uid], endpoint, resume_state, load_counts=self.data_counts,
            filter_difficulty=False, vocab_size=model["vocab_size"], evals=self.evals)


def rollout_side_parts(cfg: Any, problems: list, encode_prompt: Any, endpoint: Any, resume_state: dict | None = None,
                       clock: Any = time, load_counts: dict | None = None, *, filter_difficulty: bool = True,
                       vocab_size: int | None = None, evals: Any = None) -> tuple[Any, Any, Any]:
    """(prompt source, replay buffer, controller) of learner rank 0 over loaded problems, after the
    offline difficulty filter (``filter_difficulty=False``: data.prepare already applied it). The
    simulator builds its control side with this too."""
    from async_or1.buffer import ReplayBuffer
    from async_or1.data.source import PromptSource
    from async_or1.learner.controller import Controller

    total = cfg.total_steps

    def pps(step: int) -> int:
        return cfg.stage_at(step)[1].prompts_per_step if step < total else 0

    counts = dict(load_counts or {})
    if cfg.data.difficulty_model and filter_difficulty:
        from async_or1.data.filter import filter_by_difficulty

        problems, dcounts = filter_by_difficulty(problems, cfg.data.difficulty_model, cfg.data.difficulty_n)
        counts = {**counts, **{f"difficulty_{k}": v for k, v in dcounts.items()}}
    log.info("training problems: %d (%s)", len(problems), counts)
    source = PromptSource(problems, cfg.stages, seed=cfg.seed, shuffle=cfg.data.shuffle,
                          online_filter=cfg.data.online_filter)
    buffer = ReplayBuffer(cfg.max_staleness, pps, reject_zero_advantage=cfg.algo.reject_zero_advantage,
                          stage_at=lambda step: cfg.stage_at(step)[0], vocab_size=vocab_size,
                          max_prompt_tokens=cfg.data.max_prompt_tokens, clock=clock)
    if resume_state:
        source.load_state_dict(resume_state["source"])
        buffer.load_state_dict(resume_state["buffer"])
    controller = Controller(endpoint=endpoint, buffer=buffer, source=source, encode_prompt=encode_prompt,
                            stage_at=cfg.stage_at, num_generators=cfg.generation.num_generators,
                            evals=evals, generator_timeout_s=cfg.transport.generator_timeout_s,
                            clock=clock)
    return source, buffer, controller


def eval_book(cfg: Any, spec: dict, tokenizer: Any, stop_ids: list) -> Any:
    """The held-out evaluations of a run (before, every eval.every_steps, after), or None."""
    if not spec.get("eval_files") or cfg.eval.k <= 0:
        return None
    import numpy as np

    from async_or1.data.prepare import prepare_eval
    from async_or1.generation.text import response_text
    from async_or1.eval import EvalBook

    data = prepare_eval(spec["eval_files"], tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                        max_problems=cfg.eval.max_problems)
    stops = set(stop_ids)
    return EvalBook(data.problems, {u: np.asarray(t, dtype=np.int32) for u, t in data.token_ids.items()},
                    k=cfg.eval.k, max_response_tokens=cfg.eval_response_tokens, seed=cfg.seed,
                    decode=lambda toks: response_text(tokenizer, [int(t) for t in toks], stops))


def fill_buffer(side: Any, cfg: Any, stop: dict) -> dict | None:
    """The throughput bench's pool measurement (``bench throughput --modes alone``): wait until
    every group of the run is queued before the first step, so the generators work alone first
    (leasing never gated: the bench sets η to the run's length) and the learner then trains on
    ready batches alone. Returns the generators' seconds: in all, and after the first step's
    groups were queued (start-up left out, as the modes' rates leave out the first step); None
    when stopped (SIGTERM) before."""
    t0 = time.perf_counter()
    want = side.buffer.prompts_before(cfg.total_steps)
    first = side.buffer.prompts_before(1)
    t_first = None
    while not stop["flag"]:
        side.controller.raise_if_failed()
        a = side.buffer.accounting()
        now = time.perf_counter()
        if t_first is None and a["queued"] >= first:
            t_first = now
        if a["queued"] >= want and not a["in_flight"]:
            return {"fill_s": now - t0, "after_first_step_s": now - t_first}
        if time.perf_counter() - t0 > cfg.buffer.wait_timeout_s:
            raise SystemExit(f"bench: the generators did not fill the run's {want} groups within "
                             f"buffer.wait_timeout_s={cfg.buffer.wait_timeout_s:.0f} s ({a})")
        time.sleep(0.05)
    return None


def wait_for_evals(side: Any, cfg: Any, what: str) -> None:
    """Block until the requested evaluations are back, with a bar on stdout (the terminal for
    rank 0; its stderr is the log) counting scored samples."""
    from async_or1.progress import bar

    k = cfg.eval.k
    _, _, problems = side.controller.evals_unfinished()
    with bar(problems * k, f"eval ({what}): {problems} problems x {k}", unit="sample", file=sys.stdout) as pb:
        # progress() counts unfinished evaluations only: a finished one leaves it, hence max(0, …)
        side.controller.wait_for_evals(cfg.buffer.wait_timeout_s,
                                       on_progress=lambda done, _t: pb.update(max(0, done * k - pb.n)))
        pb.update(pb.total - pb.n)


def write_finished_evals(side: Any, writer: Any, cfg: Any, run_dir: Path) -> None:
    """Rows and samples of every evaluation that finished since the last call."""
    from async_or1.eval import eval_row, summary_line, write_outputs

    for label, step, res in side.controller.take_finished_evals():
        write_outputs(res, run_dir / f"eval_{label}", {"label": label, "step": step, "k": cfg.eval.k,
                                                         "temperature": cfg.algo.temperature,
                                                         "max_response_tokens": cfg.eval_response_tokens})
        writer.write_eval(eval_row(label, step, cfg.eval.k, res), summary_line(label, step, cfg.eval.k, res))


def zmq_endpoint(cfg: Any, spec: dict) -> Any:
    from async_or1.transport.zmq import ZmqLearnerEndpoint

    curve = None
    if cfg.transport.curve:
        from async_or1.transport.keys import server_keys

        curve = server_keys(spec["keys_dir"], cfg.generation.num_generators)
    return ZmqLearnerEndpoint(host=cfg.transport.host, port=spec["zmq_port"],
                              max_message_bytes=cfg.transport.max_message_mb << 20, hwm=cfg.transport.high_water_mark,
                              curve=curve, heartbeat_timeout_s=cfg.transport.generator_timeout_s)


def _weight_group(cfg: Any, spec: dict, controller: Any) -> Any:
    from async_or1.weights.group import WeightGroup

    return WeightGroup(controller, master_address=spec["weights_host"], bind_host=cfg.transport.host,
                       first_port=spec["weights_port"], backend=spec["weights_backend"],
                       layout=spec.get("weights_layout", "flat"), bucket_bytes=cfg.learner.bucket_mb << 20,
                       timeout_s=cfg.transport.weights_timeout_s, attempts=cfg.transport.weights_attempts,
                       fingerprint=cfg.log.weight_fingerprints,
                       engine_ranks=cfg.generation.sglang_tp_size if cfg.generation.engine == "sglang" else 1)


def _init_learner_group(backend: str) -> None:
    """The learner ranks' default group on a store that listens on MASTER_ADDR only (torch's own
    env:// store listens on every interface). Under torchrun, whose agent already serves the
    store, DeepSpeed's usual env:// init is left to do it."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized() or os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    from async_or1.weights.protocol import rendezvous_store

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    store = rendezvous_store(addr, port, rank, world, datetime.timedelta(minutes=30), bind_host=addr)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def run(spec: dict, resume: bool, *, endpoint: Any = None, make_channel: Any = None,
        before_start: Any = None) -> int:
    """The learner rank's whole life. ``endpoint``/``make_channel`` default to ZeroMQ and the
    torch.distributed weight group; the in-process mode passes its own."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from async_or1.algo import AdaptiveEntropy
    from async_or1.config import config_from_dict
    from async_or1.learner.batch import batch_stats
    from async_or1.learner.broadcast import broadcast_weights
    from async_or1.learner.engine import LearnerEngine
    from async_or1.learner.metrics import MetricsWriter
    from async_or1.learner.update import plan_step, run_update
    from async_or1.timing import Phases

    cfg = config_from_dict(spec["config"])
    _init_learner_group(spec["learner_backend"])
    deepspeed.init_distributed(dist_backend=spec["learner_backend"])  # adopts the group made above
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    run_dir = Path(spec["run_dir"])
    ckpt_root = run_dir / "checkpoints"
    latest = None
    if resume:  # before the model loads: a run with nothing to resume fails at once
        from async_or1.learner.checkpoint import list_checkpoints

        done = list_checkpoints(ckpt_root)
        if not done:
            raise SystemExit(f"--resume: no complete checkpoint under {ckpt_root}")
        latest = done[-1]
    engine = LearnerEngine(cfg, spec["model_path"])
    if before_start is not None:  # in-process mode: generator threads start once the model is loaded
        before_start()

    client_state: dict = {}
    if latest is not None:
        client_state = engine.load_checkpoint(latest) or {}
        log.info("rank %d resumed from %s at version %s", rank, latest, client_state.get("version"))
    version = int(client_state.get("version", 0))
    entropy_ctl = AdaptiveEntropy(cfg.algo.entropy.target, cfg.algo.entropy.delta, coef_init=cfg.algo.entropy.coef_init,
                                  coef_min=cfg.algo.entropy.coef_min, coef_max=cfg.algo.entropy.coef_max)
    if client_state.get("entropy"):
        entropy_ctl.load_state_dict(client_state["entropy"])
    entropy_coef = float(client_state.get("entropy_coef", cfg.algo.entropy.coef_init))
    stage = int(client_state.get("stage", cfg.stage_at(version)[0]))

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(flag=True))

    side = writer = tokenizer = None
    if rank == 0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
        side = RolloutSide(cfg, spec, tokenizer, client_state or None,
                           endpoint if endpoint is not None else zmq_endpoint(cfg, spec))
        channel = (make_channel or _weight_group)(cfg, spec, side.controller)
        side.controller.set_version(version, broadcast_version=version)
        side.controller.start()
        # Always append: a resumed run continues the same metrics.jsonl (the launcher has emptied
        # the run dir, or refused a non-empty one, for a new run).
        writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard, append=True, total_steps=cfg.total_steps)
        side.controller.wait_for_generators(cfg.transport.generator_timeout_s * 4)
    phases = Phases()

    def broadcast(v: int) -> None:
        if broadcast_weights(engine, channel if rank == 0 else None, v):
            side.controller.set_version(side.controller.version, broadcast_version=v)

    broadcast(version)
    evals_on = rank == 0 and side.evals is not None
    if evals_on and cfg.eval.at_start_and_end and not resume:
        # Before any training lease: every token of this evaluation comes from the initial weights.
        side.controller.request_eval("before", version, version)
        wait_for_evals(side, cfg, "before")
        write_finished_evals(side, writer, cfg, run_dir)
    if rank == 0:
        side.controller.leasing_open = True
    fill_s = None
    if rank == 0 and spec.get("bench", {}).get("pools_alone"):
        fill_s = fill_buffer(side, cfg, stop)

    total = cfg.total_steps
    saved_version = version
    t_start = time.time()
    last_step_end = time.perf_counter()
    wait_t0 = None                   # when the current step began waiting (kept across re-broadcasts)
    while version < total:
        step_t0 = time.perf_counter()
        wait_t0 = wait_t0 or step_t0
        new_stage = cfg.stage_at(version)[0]
        # ---- wait for the batch (rank 0), ship shards to every rank --------------------------
        with phases("wait"):
            payload = None
            if rank == 0:
                if new_stage != stage:
                    # The source entered the stage when leasing reached it (its online filter ran then).
                    log.info("stage %d → %d at step %d; online filter dropped %s", stage, new_stage, version,
                             side.controller.stage_starts.get(new_stage, 0))
                    stage = new_stage
                groups = None
                # Only rank 0's SIGTERM flag counts: the decision to stop travels in the payload, so
                # every rank leaves the loop at the same step (a lone rank leaving would hang the rest).
                rebroadcast = False
                while groups is None and not stop["flag"]:
                    side.controller.raise_if_failed()
                    groups = side.buffer.take_batch(version, cfg.stage_at(version)[1].prompts_per_step, timeout_s=1.0)
                    if groups is None and channel.due():
                        # A generator joined, restarted or died, or a broadcast is owed: the current
                        # weights go out again on a re-formed group (a collective for every rank, hence
                        # through the payload). Waiting for the next step would deadlock on-policy.
                        rebroadcast = True
                        break
                    if groups is None and time.perf_counter() - wait_t0 > cfg.buffer.wait_timeout_s:
                        raise SystemExit(f"no batch for step {version} within buffer.wait_timeout_s="
                                         f"{cfg.buffer.wait_timeout_s:.0f} s (generators alive: "
                                         f"{sorted(side.controller.alive_generators())}); see the generator logs")
                if rebroadcast:
                    payload = {"stop": False, "rebroadcast": True}
                elif groups is not None:
                    payload = {**plan_step(groups, cfg, world, version), "entropy_coef": entropy_coef, "stop": False}
                else:
                    payload = {"stop": True}
            obj = [payload]
            dist.broadcast_object_list(obj, src=0)
            payload = obj[0]
        if payload["stop"]:
            break
        if payload.get("rebroadcast"):
            with phases("broadcast"):
                broadcast(version)
            continue
        wait_t0 = None
        # ---- the policy update: N_SGD × N_reuse optimizer steps (learner/update.py) ------------
        with phases("train"):
            stats = run_update(engine, payload, rank, cfg, payload["entropy_coef"], phases)
        version += 1
        # ---- adaptive entropy, once per training step, from π_prox over the whole rollout batch --
        entropy = stats["entropy"]
        if cfg.algo.entropy.enabled:
            entropy_coef = entropy_ctl.step(entropy)
        # ---- broadcast (and, every eval.every_steps, an evaluation of what was broadcast) -------
        with phases("broadcast"):
            if version % cfg.learner.broadcast_every_steps == 0 or version == total:
                if rank == 0:
                    side.controller.set_version(version)
                broadcast(version)
                every = cfg.eval.every_steps
                if evals_on and every and version % every == 0 and version < total:
                    side.controller.request_eval(f"step_{version:06d}", version, version)
            elif rank == 0:
                side.controller.set_version(version)
        # ---- checkpoint ------------------------------------------------------------------
        every = cfg.learner.checkpoint_every_steps
        if every and version % every == 0 and version < total:
            with phases("checkpoint"):
                _save(engine, ckpt_root, version, rank, side, entropy_ctl, entropy_coef, stage,
                      cfg.learner.keep_checkpoints)
                saved_version = version
        # ---- log -------------------------------------------------------------------------
        with phases("log"):
            if evals_on:
                write_finished_evals(side, writer, cfg, run_dir)
            if rank == 0:
                now = time.perf_counter()
                ph = phases.take()
                wall = now - last_step_end
                last_step_end = now
                leases = side.controller.take_lease_sizes()
                trained = sum(m["num_tokens"] for m in payload["mini_batches"])
                row = {"step": version - 1, "version": version, "stage": stage, "time_s": round(time.time() - t_start, 3),
                       **batch_stats(groups, version - 1),
                       **stats, "entropy_coef": payload["entropy_coef"], "next_entropy_coef": entropy_coef,
                       "trained_tokens": trained, "tokens_per_s": trained / max(wall, 1e-9),
                       "step_s": wall, "gen_idle_frac": side.controller.gen_idle_frac(),
                       "leases": len(leases), "lease_prompts_mean": sum(leases) / len(leases) if leases else 0.0,
                       "learner_idle_frac": ph.get("wait", 0.0) / max(wall, 1e-9),
                       "phase_s": {k: round(v, 4) for k, v in ph.items()},
                       **side.buffer.step_metrics(version)}
                writer.write(row, print_line=(version - 1) % cfg.log.print_every_steps == 0)

    # ---- end of run: the final evaluation runs on the generators while the learner saves ----
    if evals_on and cfg.eval.at_start_and_end and version == total:
        side.controller.request_eval("after", version, version)
    if version != saved_version:
        _save(engine, ckpt_root, version, rank, side, entropy_ctl, entropy_coef, stage, cfg.learner.keep_checkpoints)
    engine.save_hf(run_dir / "final", tokenizer=tokenizer)
    if evals_on:
        if version == total:
            wait_for_evals(side, cfg, "after")
        write_finished_evals(side, writer, cfg, run_dir)
        n, _, _ = side.controller.evals_unfinished()
        if n:
            log.warning("%d evaluation(s) unfinished at the stop: not recorded", n)
    if rank == 0:
        side.controller.finish()
        side.controller.flush()
        # Generators answer the Shutdown by returning unsampled leases or delivering finished groups;
        # wait for them so the accounting closes with nothing in flight.
        deadline = time.monotonic() + 30
        while side.buffer.accounting()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # last heartbeats (weight fingerprints) on their way
        writer.write_summary({"final_version": version, "accounting": side.buffer.accounting(),
                              "lost_generators": side.controller.lost_generators,
                              "faults": {"generator_restarts": side.controller.restarts,
                                         "prompts_reissued_lost": side.controller.reissued_lost,
                                         "recoveries": side.controller.recoveries,
                                         "weight_group": dict(getattr(channel, "stats", {}))},
                              "data": side.data_counts, "source": dict(side.source.counts),
                              **({"pools_alone": fill_s} if fill_s is not None else {}),
                              "transport": dict(side.endpoint.stats),
                              "weight_fingerprints": {"sent": channel.sent_fingerprints,
                                                      "received": side.controller.received_fingerprints}})
        side.controller.stop()
        side.endpoint.close()
        writer.close()
        side.buffer.check_accounting()
    dist.barrier()
    return 0


def _save(engine: Any, root: Path, version: int, rank: int, side: Any, entropy_ctl: Any, entropy_coef: float,
          stage: int, keep: int) -> None:
    state = {"version": version, "entropy": entropy_ctl.state_dict(), "entropy_coef": entropy_coef, "stage": stage}
    if rank == 0:
        with side.controller.lock:
            state["source"] = side.source.state_dict()
            state["source"]["reissue"] = side.controller.outstanding_uids() + state["source"]["reissue"]
        state["buffer"] = side.buffer.state_dict()
    engine.save_checkpoint(root / f"step_{version:06d}", client_state=state)
    if rank == 0:
        from async_or1.learner.checkpoint import prune_checkpoints

        prune_checkpoints(root, keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="async_or1.learner.loop")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[learner {rank}] %(asctime)s %(message)s")
    from async_or1.launch_spec import apply_process_pinning, read_spec

    apply_process_pinning()
    return run(read_spec(args.spec), resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
