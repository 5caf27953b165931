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
    """Rank 0's buffer + prompt source + controller thread, built from the launch spec."""

    def __init__(self, cfg: Any, spec: dict, tokenizer: Any, resume_state: dict | None, endpoint: Any) -> None:
        from async_or1.data.rows import load_problems
        from async_or1.data.template import encode_prompt

        problems, counts = load_problems(spec["train_files"], on_bad_row=cfg.data.on_bad_row,
                                         abilities=tuple(cfg.data.abilities))
        self.endpoint = endpoint
        self.source, self.buffer, self.controller = rollout_side_parts(
            cfg, problems, lambda pr: encode_prompt(tokenizer, pr.prompt), endpoint, resume_state, load_counts=counts)


def rollout_side_parts(cfg: Any, problems: list, encode_prompt: Any, endpoint: Any, resume_state: dict | None = None,
                       clock: Any = time, load_counts: dict | None = None) -> tuple[Any, Any, Any]:
    """(prompt source, replay buffer, controller) of learner rank 0 over loaded problems, after the
    offline difficulty filter. The simulator builds its control side with this too."""
    from async_or1.buffer import ReplayBuffer
    from async_or1.data.source import PromptSource
    from async_or1.learner.controller import Controller

    total = cfg.total_steps

    def pps(step: int) -> int:
        return cfg.stage_at(step)[1].prompts_per_step if step < total else 0

    counts = dict(load_counts or {})
    if cfg.data.difficulty_model:
        from async_or1.data.filter import filter_by_difficulty

        problems, dcounts = filter_by_difficulty(problems, cfg.data.difficulty_model, cfg.data.difficulty_n)
        counts = {**counts, **{f"difficulty_{k}": v for k, v in dcounts.items()}}
    log.info("training problems: %d (%s)", len(problems), counts)
    source = PromptSource(problems, cfg.stages, seed=cfg.seed, shuffle=cfg.data.shuffle,
                          online_filter=cfg.data.online_filter)
    buffer = ReplayBuffer(cfg.max_staleness, pps, reject_zero_advantage=cfg.algo.reject_zero_advantage, clock=clock)
    if resume_state:
        source.load_state_dict(resume_state["source"])
        buffer.load_state_dict(resume_state["buffer"])
    controller = Controller(endpoint=endpoint, buffer=buffer, source=source, encode_prompt=encode_prompt,
                            stage_at=cfg.stage_at, num_generators=cfg.generation.num_generators,
                            prompts_per_step_at=pps, generator_timeout_s=cfg.transport.generator_timeout_s, clock=clock)
    return source, buffer, controller


def _zmq_endpoint(cfg: Any, spec: dict) -> Any:
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
                           endpoint if endpoint is not None else _zmq_endpoint(cfg, spec))
        channel = (make_channel or _weight_group)(cfg, spec, side.controller)
        side.controller.set_version(version, broadcast_version=version)
        side.controller.start()
        # Always append: the launcher has already emptied the run dir (or refused a non-empty one)
        # and may have written the before-training eval row into metrics.jsonl.
        writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard, append=True, total_steps=cfg.total_steps)
        side.controller.wait_for_generators(cfg.transport.generator_timeout_s * 4)
    phases = Phases()

    def broadcast(v: int) -> None:
        if broadcast_weights(engine, channel if rank == 0 else None, v):
            side.controller.set_version(side.controller.version, broadcast_version=v)

    broadcast(version)
    if rank == 0:
        side.controller.leasing_open = True

    if rank == 0 and version == 0:
        side.controller.on_stage_start(stage)
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
                    dropped = side.controller.on_stage_start(new_stage)
                    log.info("stage %d → %d at step %d; online filter: %s", stage, new_stage, version, dropped)
                    stage = new_stage
                groups = None
                # Only rank 0's SIGTERM flag counts: the decision to stop travels in the payload, so
                # every rank leaves the loop at the same step (a lone rank leaving would hang the rest).
                rebroadcast = False
                while groups is None and not stop["flag"]:
                    side.controller._check()
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
        # ---- broadcast --------------------------------------------------------------------
        with phases("broadcast"):
            if version % cfg.learner.broadcast_every_steps == 0 or version == total:
                if rank == 0:
                    side.controller.set_version(version)
                broadcast(version)
            elif rank == 0:
                side.controller.set_version(version)
        # ---- checkpoint ------------------------------------------------------------------
        every = cfg.learner.checkpoint_every_steps
        if every and version % every == 0 and version < total:
            with phases("checkpoint"):
                _save(engine, ckpt_root, version, rank, side, entropy_ctl, entropy_coef, stage,
                      cfg.learner.keep_checkpoints)
                saved_version = version
        snap = cfg.eval.every_steps
        if snap and version % snap == 0 and version < total:
            with phases("snapshot"):        # collective under ZeRO-3: every rank gathers
                engine.save_hf(run_dir / "snapshots" / f"step_{version:06d}", tokenizer=tokenizer)
        # ---- log -------------------------------------------------------------------------
        with phases("log"):
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

    # ---- end of run ----------------------------------------------------------------------
    if rank == 0:
        side.controller.finish()
        side.controller.flush()
    if version != saved_version:
        _save(engine, ckpt_root, version, rank, side, entropy_ctl, entropy_coef, stage, cfg.learner.keep_checkpoints)
    engine.save_hf(run_dir / "final", tokenizer=tokenizer)
    if rank == 0:
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
                              "source": dict(side.source.counts),
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
