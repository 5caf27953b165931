"""One simulated run: the real control side on a virtual clock, simulated engines and learner.

    rollout_side_parts(cfg, ...)  the real PromptSource, ReplayBuffer and Controller (learner/loop.py)
    InprocHub(codec=False)        the real in-process transport; messages pass as objects
    SimGenerator × N              the worker protocol around a SimEngine each
    SimLearner                    the learner loop's phases

Everything happens in events on one queue; after each event that sent a message the controller
runs one ``poll`` (its thread's loop body), the generators it wrote to read their inboxes, and the
learner tries to take its batch. Nothing sleeps and no thread runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from async_or1.sim import costs, presets
from async_or1.sim.clock import Events, VirtualClock
from async_or1.sim.engine import SimEngine
from async_or1.sim.generator import SimGenerator
from async_or1.sim.learner import SimLearner
from async_or1.sim.workload import fit_solve_rate_beta, make_problems, sample_group
from async_or1.transport import messages as m
from async_or1.transport.base import peer_name

class SimError(RuntimeError):
    """The simulated run could not go on the way the real one would not (e.g. the learner's
    wait timeout): the message says why."""


@dataclass(frozen=True)
class Setup:
    """One point of the study: mode, staleness bound and GPU split."""

    mode: str                  # "on-policy" | "async"
    max_staleness: int         # η (0 for on-policy)
    gen_gpus: int              # GPUs of all generators together (a multiple of the TP size)
    learner_gpus: int
    steps: int                 # optimizer steps simulated (the schedule's first `steps`)
    prompts_per_lease: int = 0  # 0: ceil(prompts_per_step / generators), so one lease round spans every engine
    seed: int = 0

    @property
    def label(self) -> str:
        return "on-policy" if self.mode == "on-policy" else f"async η={self.max_staleness}"


@dataclass(frozen=True)
class Model:
    """The cost inputs resolved from cfg.sim."""

    shape: presets.ModelShape
    hw: presets.Hardware
    tp: int
    decode: costs.DecodeCost
    kv_capacity: int
    solve_beta: tuple
    medians: tuple             # per stage
    sigma: float
    wrong_length_ratio: float


def resolve_model(cfg: Any) -> Model:
    s = cfg.sim
    shape = presets.model_shape(s.model, cfg.model.path)
    hw = presets.hardware(s.hardware, s.hardware_overrides)
    tp = cfg.generation.sglang_tp_size if cfg.generation.engine == "sglang" else 1
    n_stages = len(cfg.stages)
    medians = list(s.length_median_tokens)
    if len(medians) == 1:
        medians = medians * n_stages
    if len(medians) != n_stages:
        raise ValueError(f"sim.length_median_tokens: {len(medians)} values for {n_stages} stages (give one, or "
                         f"one per stage)")
    if any(float(x) <= 0 for x in medians):
        raise ValueError(f"sim.length_median_tokens must be positive, got {medians}")
    none_all = list(s.solved_none_all) or list(presets.SOLVED_NONE_ALL[shape.name])
    if len(none_all) != 2:
        raise ValueError(f"sim.solved_none_all: expected [share solved 0/16, share solved 16/16], got {none_all}")
    for name, v in (("length_sigma", s.length_sigma), ("wrong_length_ratio", s.wrong_length_ratio),
                    ("hbm_efficiency", s.hbm_efficiency), ("kv_efficiency", s.kv_efficiency),
                    ("flops_efficiency", s.flops_efficiency),
                    ("learner_mfu", s.learner_mfu)):
        if v <= 0:
            raise ValueError(f"sim.{name} must be > 0, got {v}")
    decode = costs.decode_cost(shape, hw, tp, s.decode_overhead_s, s.hbm_efficiency, s.kv_efficiency,
                               s.flops_efficiency)
    kv = costs.kv_capacity_tokens(shape, hw, tp, cfg.generation.sglang_mem_fraction)
    return Model(shape=shape, hw=hw, tp=tp, decode=decode, kv_capacity=kv,
                 solve_beta=fit_solve_rate_beta(float(none_all[0]), float(none_all[1]), 16),
                 medians=tuple(float(x) for x in medians), sigma=float(s.length_sigma),
                 wrong_length_ratio=float(s.wrong_length_ratio))


def run_config(cfg: Any, setup: Setup, tp: int) -> Any:
    """The config of one simulated run: its mode, η, generator count, learner ranks and the
    schedule cut to ``setup.steps`` steps (so admission stops where the simulation does)."""
    if setup.gen_gpus % tp or setup.gen_gpus <= 0 or setup.learner_gpus <= 0:
        raise ValueError(f"split {setup.gen_gpus}:{setup.learner_gpus}: generator GPUs must be a positive multiple "
                         f"of the tensor-parallel size {tp}, learner GPUs positive")
    stages, left = [], setup.steps
    for st in cfg.stages:
        if left <= 0:
            break
        stages.append(dataclasses.replace(st, steps=min(st.steps, left)))
        left -= stages[-1].steps
    if left > 0:
        raise ValueError(f"--steps {setup.steps} is more than the schedule's {cfg.total_steps} steps")
    n_gen = setup.gen_gpus // tp
    pps_max = max(st.prompts_per_step for st in stages)
    ppl = setup.prompts_per_lease or max(1, math.ceil(pps_max / n_gen))
    return dataclasses.replace(
        cfg, mode=setup.mode, schedule=stages,
        buffer=dataclasses.replace(cfg.buffer, max_staleness=setup.max_staleness),
        generation=dataclasses.replace(cfg.generation, num_generators=n_gen, devices=[], prompts_per_lease=ppl),
        learner=dataclasses.replace(cfg.learner, devices=[str(i) for i in range(setup.learner_gpus)]))


class _Tap:
    """The controller's endpoint, noting which generators it wrote to (only they need to read)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.touched = inner, set()

    def recv(self, timeout_s: float | None = None) -> Any:
        return self.inner.recv(timeout_s)

    def send(self, peer: str, msg: Any) -> bool:
        self.touched.add(peer)
        return self.inner.send(peer, msg)

    def broadcast(self, msg: Any) -> None:
        self.touched.update(self.inner.peers)
        self.inner.broadcast(msg)

    @property
    def peers(self) -> list[str]:
        return self.inner.peers

    @property
    def stats(self) -> dict:
        return self.inner.stats

    def close(self) -> None:
        self.inner.close()


class Simulation:
    def __init__(self, cfg: Any, setup: Setup, model: Model | None = None, sample: Any = None) -> None:
        """``sample(rng, prompt) -> (lengths, rewards)`` draws a prompt's group; by default the
        workload model (``workload.sample_group`` with the stage's length parameters)."""
        from async_or1.learner.loop import rollout_side_parts
        from async_or1.transport.inproc import InprocHub

        self.model = model or resolve_model(cfg)
        mdl = self.model
        self.setup = setup
        self.cfg = cfg = run_config(cfg, setup, mdl.tp)
        state = costs.learner_state_bytes_per_rank(mdl.shape, setup.learner_gpus, cfg.learner.zero_stage)
        if state > 0.8 * mdl.hw.hbm_GB * 1e9:
            raise SimError(f"learner: {state / 1e9:.0f} GB of model states per rank (ZeRO-{cfg.learner.zero_stage}, "
                           f"{setup.learner_gpus} ranks) do not fit {mdl.hw.name} ({mdl.hw.hbm_GB:.0f} GB): give the "
                           f"learner more GPUs")
        self.clock = VirtualClock()
        self.events = Events(self.clock)
        self.dirty = False
        self.done = False
        self.failure: str | None = None
        problems = make_problems(cfg.sim.num_problems, solve_beta=mdl.solve_beta,
                                 difficulty_model=cfg.data.difficulty_model, difficulty_n=cfg.data.difficulty_n,
                                 prompt_median_tokens=cfg.sim.prompt_median_tokens,
                                 max_prompt_tokens=cfg.data.max_prompt_tokens, seed=setup.seed)
        self.hub = InprocHub(codec=False)
        self.tap = _Tap(self.hub.learner())
        self.source, self.buffer, self.controller = rollout_side_parts(
            cfg, problems, lambda pr: np.zeros(pr.ground_truth["prompt_tokens"], np.int32), self.tap,
            clock=self.clock)
        same_node = setup.gen_gpus + setup.learner_gpus <= cfg.sim.gpus_per_node
        gather, self.send_s = costs.broadcast_s(
            mdl.shape, mdl.hw, learner_ranks=setup.learner_gpus, zero_stage=cfg.learner.zero_stage,
            same_node=same_node, bucket_bytes=cfg.learner.bucket_mb << 20, bucket_latency_s=cfg.sim.bucket_latency_s,
            gpus_per_node=cfg.sim.gpus_per_node)
        self.sample = sample or self._sample
        self.groups: dict[str, dict] = {}
        self.gens = [self._make_generator(g) for g in range(cfg.generation.num_generators)]
        self.by_peer = {peer_name(g.gid): g for g in self.gens}
        self.learner = SimLearner(cfg=cfg, buffer=self.buffer, controller=self.controller, events=self.events,
                                  train_s=self._train_s, gather_s=gather, broadcast=self._broadcast,
                                  on_dirty=self._mark, on_done=self._finish, on_fail=self._fail, on_log=self._log)
        self._barrier: dict | None = None
        self.weight_pauses = 0

    # ---- construction ----------------------------------------------------------------------
    def _make_generator(self, gid: int) -> SimGenerator:
        cfg, mdl = self.cfg, self.model

        def make_engine(**callbacks: Any) -> SimEngine:
            return SimEngine(cost=mdl.decode, kv_capacity=mdl.kv_capacity,
                             prefill_s=lambda n, n2: costs.prefill_s(mdl.shape, mdl.hw, mdl.tp, n, n2,
                                                                     cfg.sim.flops_efficiency),
                             max_running=cfg.sim.max_running_requests,
                             stamp="request" if cfg.generation.engine == "sglang" else "token",
                             events=self.events, **callbacks)

        return SimGenerator(generator_id=gid, endpoint=self.hub.generator(gid), make_engine=make_engine,
                            rng=np.random.default_rng([self.setup.seed, gid]),
                            sample=self.sample,
                            prompts_per_lease=cfg.generation.prompts_per_lease,
                            in_flight=cfg.generation.weight_update == "in_flight", clock=self.clock,
                            on_send=self._mark, on_weights_ready=self._weights_ready, record_group=self._record)

    def _sample(self, rng: Any, prompt: Any) -> tuple:
        mdl = self.model
        return sample_group(rng, prompt.ground_truth["solve_rate"], prompt.samples_per_prompt,
                            median=mdl.medians[prompt.stage], sigma=mdl.sigma,
                            wrong_length_ratio=mdl.wrong_length_ratio, max_tokens=prompt.max_response_tokens)

    # ---- hooks -------------------------------------------------------------------------------
    def _mark(self) -> None:
        self.dirty = True

    def _finish(self) -> None:
        self.done = True

    def _fail(self, why: str) -> None:
        self.failure = why

    def _log(self, row: dict) -> None:
        """Generator time split up to this step's end (busy decoding/prefilling, paused for weights, idle)."""
        for g in self.gens:
            g.engine.close_accounts()
        row["gen_s"] = {"busy": sum(g.engine.busy_s for g in self.gens),
                        "weights": sum(g.engine.paused_s for g in self.gens),
                        "idle": sum(g.engine.idle_s for g in self.gens)}

    def _record(self, group: Any, min_version: int) -> None:
        self.groups[group.prompt_id] = {"lengths": [len(s.tokens) for s in group.samples],
                                        "rewards": [s.reward for s in group.samples], "stage": group.stage,
                                        "oldest_version": min(int(s.versions.min()) for s in group.samples),
                                        "sent_s": self.clock.now}

    def _train_s(self, groups: list) -> float:
        mask = self.cfg.algo.truncated_mask == "mask_truncated"
        n = [len(g.prompt_tokens) + len(s.tokens) for g in groups for s in g.samples
             if not (mask and s.finish_reason == "length")]
        lc, mdl = self.cfg.learner, self.model
        return costs.train_step_s(mdl.shape, mdl.hw, self.setup.learner_gpus, float(sum(n)),
                                  float(sum(x * x for x in n)), zero_stage=lc.zero_stage, mfu=self.cfg.sim.learner_mfu,
                                  gradient_checkpointing=lc.gradient_checkpointing,
                                  micro_batch_tokens_per_rank=lc.micro_batch_tokens_per_rank,
                                  gpus_per_node=self.cfg.sim.gpus_per_node)

    # ---- weight broadcast: announce, every generator pauses, transfer, all resume ---------
    def _broadcast(self, version: int, done: Any) -> None:
        self.controller.post(m.WeightUpdate(version=version, names=[], dtypes=[], shapes=[],
                                            bucket_bytes=self.cfg.learner.bucket_mb << 20, layout="sim"))
        self._barrier = {"version": version, "waiting": {g.gid for g in self.gens}, "done": done}
        self._mark()

    def _weights_ready(self, gid: int) -> None:
        b = self._barrier
        b["waiting"].discard(gid)
        if not b["waiting"]:
            self.events.at(self.clock.now + self.send_s, self._broadcast_over)

    def _broadcast_over(self) -> None:
        b, self._barrier = self._barrier, None
        self.weight_pauses += 1
        for g in self.gens:
            g.load_weights(self.cfg.sim.weight_update_recompute_kv)
        b["done"]()

    # ---- the loop ---------------------------------------------------------------------------
    def _pump(self) -> None:
        while self.dirty:
            self.dirty = False
            self.controller.poll(0.0)
            touched = sorted(self.tap.touched)      # a fixed order: runs are reproducible
            self.tap.touched.clear()
            for peer in touched:
                self.by_peer[peer].deliver()
            self.learner.poke()

    @property
    def heartbeat_period_s(self) -> float:
        """Heartbeats carry liveness (the controller reaps a generator silent for generator_timeout_s)
        and idle time (the controller's gen_idle_frac); a third of the timeout keeps every generator
        alive with 20-60x fewer messages than heartbeat_s would, so the simulator uses the longer of
        the two. The report's generator idle fractions come from the engines themselves."""
        return max(self.cfg.transport.heartbeat_s, self.cfg.transport.generator_timeout_s / 3)

    def _heartbeats(self) -> None:
        if self.done:
            return
        for g in self.gens:
            g.heartbeat()
        self.events.at(self.clock.now + self.heartbeat_period_s, self._heartbeats)

    def run(self) -> dict:
        wall0 = time.perf_counter()
        for g in self.gens:
            g.start()
        self.learner.start()
        self._pump()
        self.events.at(self.heartbeat_period_s, self._heartbeats)
        while not self.done:
            if self.failure:
                raise SimError(f"{self.setup.label} on {self.setup.gen_gpus}:{self.setup.learner_gpus} GPUs: "
                               f"{self.failure}")
            if not self.events.run_one():
                raise SimError("the simulation ran out of events before the schedule finished (a deadlock)")
            if self.dirty:
                self._pump()
        self._pump()   # Shutdown reaches the generators; their ReturnLeases reach the controller
        self._mark()
        self._pump()
        for g in self.gens:
            g.engine.close_accounts()
        self.buffer.check_accounting()
        from async_or1.sim.report import summarize

        return summarize(self, wall_s=time.perf_counter() - wall0)
