"""The learner process: one loop of named, timed phases, run by every learner rank.

    set_up → (wait_for_batch → train_step → broadcast_step → checkpoint → log_step)* → finish

each a function below with its distributed hazards in its docstring; ``Learner`` carries the
state between them.

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
from dataclasses import dataclass, field
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


@dataclass
class Learner:
    """One learner rank's state between the phases of ``run``. ``side``, ``writer``, ``tokenizer``
    and ``channel`` exist on rank 0 only (None elsewhere)."""
    cfg: Any
    rank: int
    world: int
    run_dir: Path
    engine: Any
    entropy_ctl: Any
    entropy_coef: float
    version: int
    stage: int
    stop: dict
    phases: Any
    resumed: bool
    side: Any = None
    writer: Any = None
    tokenizer: Any = None
    channel: Any = None
    saved_version: int = 0
    groups: Any = None               # rank 0: the step's rollout groups, for its log row
    fill_s: Any = None               # the throughput bench's pool measurement (fill_buffer)
    wait_t0: float | None = None     # when the current step began waiting (kept across re-broadcasts)
    t_start: float = field(default_factory=time.time)
    last_step_end: float = field(default_factory=time.perf_counter)

    @property
    def total(self) -> int:
        return self.cfg.total_steps

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def evals_on(self) -> bool:
        return self.rank == 0 and self.side.evals is not None


def run(spec: dict, resume: bool, *, endpoint: Any = None, make_channel: Any = None,
        before_start: Any = None) -> int:
    """The learner rank's whole life. ``endpoint``/``make_channel`` default to ZeroMQ and the
    torch.distributed weight group; the in-process mode passes its own."""
    r = set_up(spec, resume, endpoint, make_channel, before_start)
    while r.version < r.total:
        with r.phases("wait"):
            payload = wait_for_batch(r)
        if payload["stop"]:
            break
        if payload.get("rebroadcast"):
            with r.phases("broadcast"):
                broadcast(r, r.version)
            continue
        with r.phases("train"):
            stats = train_step(r, payload)
        with r.phases("broadcast"):
            broadcast_step(r)
        every = r.cfg.learner.checkpoint_every_steps
        if every and r.version % every == 0 and r.version < r.total:
            with r.phases("checkpoint"):
                checkpoint(r)
        with r.phases("log"):
            log_step(r, payload, stats)
    finish(r)
    return 0


def set_up(spec: dict, resume: bool, endpoint: Any, make_channel: Any, before_start: Any) -> Learner:
    """The process group, the model (from the latest checkpoint on ``resume``), and on rank 0 the
    rollout side, the weight channel and the metrics; then the first broadcast, the "before"
    evaluation and leasing opened.

    Hazards: ``--resume`` with no complete checkpoint fails before the model loads. The first
    broadcast is a collective: every rank makes it, before any lease, so no generator samples from
    weights other than the learner's. Only SIGTERM's flag on rank 0 is read (see wait_for_batch)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from async_or1.algo import AdaptiveEntropy
    from async_or1.config import config_from_dict
    from async_or1.learner.engine import LearnerEngine
    from async_or1.learner.metrics import MetricsWriter
    from async_or1.timing import Phases

    cfg = config_from_dict(spec["config"])
    _init_learner_group(spec["learner_backend"])
    deepspeed.init_distributed(dist_backend=spec["learner_backend"])  # adopts the group made above
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    run_dir = Path(spec["run_dir"])
    latest = None
    if resume:  # before the model loads: a run with nothing to resume fails at once
        from async_or1.learner.checkpoint import list_checkpoints

        done = list_checkpoints(run_dir / "checkpoints")
        if not done:
            raise SystemExit(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        latest = done[-1]
    engine = LearnerEngine(cfg, spec["model_path"])
    if before_start is not None:  # in-process mode: generator threads start once the model is loaded
        before_start()

    client_state: dict = {}
    if latest is not None:
        client_state = engine.load_checkpoint(latest) or {}
        log.info("rank %d resumed from %s at version %s", rank, latest, client_state.get("version"))
    version = int(client_state.get("version", 0))
    e = cfg.algo.entropy
    entropy_ctl = AdaptiveEntropy(e.target, e.delta, coef_init=e.coef_init, coef_min=e.coef_min, coef_max=e.coef_max)
    if client_state.get("entropy"):
        entropy_ctl.load_state_dict(client_state["entropy"])
    r = Learner(cfg=cfg, rank=rank, world=world, run_dir=run_dir, engine=engine, entropy_ctl=entropy_ctl,
                entropy_coef=float(client_state.get("entropy_coef", e.coef_init)), version=version,
                stage=int(client_state.get("stage", cfg.stage_at(version)[0])), stop={"flag": False},
                phases=Phases(), resumed=resume, saved_version=version)
    signal.signal(signal.SIGTERM, lambda s, f: r.stop.update(flag=True))

    if rank == 0:
        from transformers import AutoTokenizer

        r.tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
        r.side = RolloutSide(cfg, spec, r.tokenizer, client_state or None,
                             endpoint if endpoint is not None else zmq_endpoint(cfg, spec))
        r.channel = (make_channel or _weight_group)(cfg, spec, r.side.controller)
        r.side.controller.set_version(version, broadcast_version=version)
        r.side.controller.start()
        # Always append: a resumed run continues the same metrics.jsonl (the launcher has emptied
        # the run dir, or refused a non-empty one, for a new run).
        r.writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard, append=True, total_steps=cfg.total_steps)
        r.side.controller.wait_for_generators(cfg.transport.generator_timeout_s * 4)

    broadcast(r, version)
    if r.evals_on and cfg.eval.at_start_and_end and not resume:
        # Before any training lease: every token of this evaluation comes from the initial weights.
        r.side.controller.request_eval("before", version, version)
        wait_for_evals(r.side, cfg, "before")
        write_finished_evals(r.side, r.writer, cfg, run_dir)
    if rank == 0:
        r.side.controller.leasing_open = True
        if spec.get("bench", {}).get("pools_alone"):
            r.fill_s = fill_buffer(r.side, cfg, r.stop)
    return r


def wait_for_batch(r: Learner) -> dict:
    """Rank 0 waits for the step's batch and plans it; every rank receives the plan (the payload).

    Hazards: only rank 0's SIGTERM flag counts, and the decision to stop travels in the payload,
    so every rank leaves the loop at the same step (a lone rank leaving would hang the rest). A
    re-broadcast owed while waiting (a generator joined, restarted or died) is a collective, so it
    too goes through the payload; waiting for the next step instead would deadlock on-policy
    (η = 0: no batch comes until the generators have the current weights). Fails after
    ``buffer.wait_timeout_s`` without a batch, counted across re-broadcasts."""
    import torch.distributed as dist

    from async_or1.learner.update import plan_step

    r.wait_t0 = r.wait_t0 or time.perf_counter()
    payload = None
    if r.rank == 0:
        cfg, side = r.cfg, r.side
        new_stage = cfg.stage_at(r.version)[0]
        if new_stage != r.stage:
            # The source entered the stage when leasing reached it (its online filter ran then).
            log.info("stage %d → %d at step %d; online filter dropped %s", r.stage, new_stage, r.version,
                     side.controller.stage_starts.get(new_stage, 0))
            r.stage = new_stage
        groups, rebroadcast = None, False
        while groups is None and not r.stop["flag"]:
            side.controller.raise_if_failed()
            groups = side.buffer.take_batch(r.version, cfg.stage_at(r.version)[1].prompts_per_step, timeout_s=1.0)
            if groups is None and r.channel.due():
                rebroadcast = True
                break
            if groups is None and time.perf_counter() - r.wait_t0 > cfg.buffer.wait_timeout_s:
                raise SystemExit(f"no batch for step {r.version} within buffer.wait_timeout_s="
                                 f"{cfg.buffer.wait_timeout_s:.0f} s (generators alive: "
                                 f"{sorted(side.controller.alive_generators())}); see the generator logs")
        r.groups = groups
        if rebroadcast:
            payload = {"stop": False, "rebroadcast": True}
        elif groups is not None:
            payload = {**plan_step(groups, cfg, r.world, r.version), "entropy_coef": r.entropy_coef, "stop": False}
        else:
            payload = {"stop": True}
    obj = [payload]
    dist.broadcast_object_list(obj, src=0)
    payload = obj[0]
    if not payload["stop"] and not payload.get("rebroadcast"):
        r.wait_t0 = None
    return payload


def train_step(r: Learner, payload: dict) -> dict:
    """The policy update (learner/update.py: N_SGD × N_reuse optimizer steps), version += 1, and
    the adaptive entropy coefficient for the next step.

    Hazards: every rank runs the same number of micro-batches (ZeRO-3 gathers parameters
    collectively in every forward; the plan guarantees it). The coefficient used is rank 0's, from
    the payload, so the ranks never disagree; the controller updates once per training step from
    π_prox's entropy over the whole rollout batch, not per optimizer step."""
    from async_or1.learner.update import run_update

    stats = run_update(r.engine, payload, r.rank, r.cfg, payload["entropy_coef"], r.phases)
    r.version += 1
    if r.cfg.algo.entropy.enabled:
        r.entropy_coef = r.entropy_ctl.step(stats["entropy"])
    return stats


def broadcast(r: Learner, v: int) -> None:
    """Send the current weights as version ``v`` (a collective: every rank calls it; rank 0 sends).
    The controller learns the broadcast version only once the weights are out, so no lease waits
    on weights the generators cannot have yet."""
    from async_or1.learner.broadcast import broadcast_weights

    if broadcast_weights(r.engine, r.channel if r.rank == 0 else None, v):
        r.side.controller.set_version(r.side.controller.version, broadcast_version=v)


def broadcast_step(r: Learner) -> None:
    """After a step: the new version to the controller, and every ``learner.broadcast_every_steps``
    (and at the end) the weights, with an evaluation of what was broadcast every ``eval.every_steps``.

    Hazard: the version goes to the controller before the weights, so leases granted meanwhile are
    stamped with the version they will be sampled from once the broadcast lands."""
    cfg, v = r.cfg, r.version
    if v % cfg.learner.broadcast_every_steps == 0 or v == r.total:
        if r.rank == 0:
            r.side.controller.set_version(v)
        broadcast(r, v)
        every = cfg.eval.every_steps
        if r.evals_on and every and v % every == 0 and v < r.total:
            r.side.controller.request_eval(f"step_{v:06d}", v, v)
    elif r.rank == 0:
        r.side.controller.set_version(v)


def checkpoint(r: Learner) -> None:
    """Save model, optimizer and the run's state at ``r.version`` (a collective: every rank saves
    its shard). Hazard: rank 0 reads the prompt source and the outstanding leases under the
    controller lock, so a prompt out on a lease is re-issued on resume, neither lost nor doubled."""
    _save(r.engine, r.ckpt_root, r.version, r.rank, r.side, r.entropy_ctl, r.entropy_coef, r.stage,
          r.cfg.learner.keep_checkpoints)
    r.saved_version = r.version


def log_step(r: Learner, payload: dict, stats: dict) -> None:
    """Rank 0: the finished evaluations, and the step's metrics row (``phases.take()`` resets the
    phase timers, so each row's ``phase_s`` covers exactly one step, waiting included)."""
    if r.evals_on:
        write_finished_evals(r.side, r.writer, r.cfg, r.run_dir)
    if r.rank != 0:
        return
    from async_or1.learner.batch import batch_stats

    side, v = r.side, r.version
    now = time.perf_counter()
    ph = r.phases.take()
    wall = now - r.last_step_end
    r.last_step_end = now
    leases = side.controller.take_lease_sizes()
    trained = sum(m["num_tokens"] for m in payload["mini_batches"])
    row = {"step": v - 1, "version": v, "stage": r.stage, "time_s": round(time.time() - r.t_start, 3),
           **batch_stats(r.groups, v - 1),
           **stats, "entropy_coef": payload["entropy_coef"], "next_entropy_coef": r.entropy_coef,
           "trained_tokens": trained, "tokens_per_s": trained / max(wall, 1e-9),
           "step_s": wall, "gen_idle_frac": side.controller.gen_idle_frac(),
           "leases": len(leases), "lease_prompts_mean": sum(leases) / len(leases) if leases else 0.0,
           "learner_idle_frac": ph.get("wait", 0.0) / max(wall, 1e-9),
           "phase_s": {k: round(x, 4) for k, x in ph.items()},
           **side.buffer.step_metrics(v)}
    r.writer.write(row, print_line=(v - 1) % r.cfg.log.print_every_steps == 0)


def finish(r: Learner) -> None:
    """The end of the run (or of a SIGTERM): final checkpoint, the HF export, the "after"
    evaluation, and on rank 0 the run summary with its accounting checked.

    Hazards: the final evaluation is requested before saving, so the generators sample it while
    the learner saves. The generators answer the Shutdown by returning unsampled leases or
    delivering finished groups; rank 0 waits for them (30 s at most) so the accounting closes with
    nothing in flight, and ``check_accounting`` fails the run if a group is unaccounted for. The
    final barrier keeps every rank alive until rank 0 has written the summary."""
    import torch.distributed as dist

    cfg, v, side = r.cfg, r.version, r.side
    if r.evals_on and cfg.eval.at_start_and_end and v == r.total:
        side.controller.request_eval("after", v, v)
    if v != r.saved_version:
        checkpoint(r)
    r.engine.save_hf(r.run_dir / "final", tokenizer=r.tokenizer)
    if r.evals_on:
        if v == r.total:
            wait_for_evals(side, cfg, "after")
        write_finished_evals(side, r.writer, cfg, r.run_dir)
        n, _, _ = side.controller.evals_unfinished()
        if n:
            log.warning("%d evaluation(s) unfinished at the stop: not recorded", n)
    if r.rank == 0:
        side.controller.finish()
        side.controller.flush()
        deadline = time.monotonic() + 30
        while side.buffer.accounting()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # last heartbeats (weight fingerprints) on their way
        r.writer.write_summary({"final_version": v, "accounting": side.buffer.accounting(),
                                "lost_generators": side.controller.lost_generators,
                                "faults": {"generator_restarts": side.controller.restarts,
                                           "prompts_reissued_lost": side.controller.reissued_lost,
                                           "recoveries": side.controller.recoveries,
                                           "weight_group": dict(getattr(r.channel, "stats", {}))},
                                "data": side.data_counts, "source": dict(side.source.counts),
                                **({"pools_alone": r.fill_s} if r.fill_s is not None else {}),
                                "transport": dict(side.endpoint.stats),
                                "weight_fingerprints": {"sent": r.channel.sent_fingerprints,
                                                        "received": side.controller.received_fingerprints}})
        side.controller.stop()
        side.endpoint.close()
        r.writer.close()
        side.buffer.check_accounting()
    dist.barrier()


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
    code = main()
    # Leave without running C++ static destructors: after a clean run (final barrier passed,
    # checkpoint and summary written and closed), a rank sometimes died at interpreter teardown
    # with SIGABRT ("terminate called without an active exception", no Python frame: a library
    # thread destroyed while joinable), and the launcher then failed the finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
