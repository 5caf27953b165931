"""The generator process: one loop of named, timed phases.

    lease prompts → generate G responses per prompt → score them → send one group per prompt

The phases stream (continuous leasing): while a batch decodes, the worker already asks for
the next lease, and its prompts join the running batch as slots free; each group is scored and
sent the moment its G-th response finishes. So a refill lease (for groups the learner rejected)
does not wait for the slowest response of the previous one, and the engine never drains
between leases while admission control has room.

Weights arrive while it works: between decode steps (``weight_update: in_flight``) or, with
``between_requests``, once the running batch has drained (no new prompts join while an update
waits). Every token carries the version of the weights that produced it, so the learner can
bound staleness honestly either way. A lease's prompts start only on weights at least its
``min_version``.

A group is sent whole or not at all: on shutdown (a Shutdown message or SIGTERM) the unsent
prompts of every open lease go back to the learner with a ReturnLease and are re-issued.

Faults: a restarted process is a new incarnation (sent with its first Heartbeat and every
LeaseRequest) and ignores leases answering its predecessor; an unanswered LeaseRequest is repeated
after ``lease_retry_s``; a failed weight-group join or receive is survived (torn weights: open
prompts returned, nothing sampled until a whole update arrives on the next epoch). The process
exits 0 only when the learner said Shutdown; any other end is a failure the launcher restarts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

log = logging.getLogger("async_or1.generator")

EXIT_STOPPED = 3  # the loop ended without a Shutdown from the learner (signal, lost learner)


def unsent_by_lease(open_prompts: dict, leases: list) -> dict[int, list[str]]:
    """{lease_id: prompt ids} of every prompt held and not sent: the open ones (``{prompt_id:
    {"lease": PromptLease, ...}}``) and those of granted leases not started yet."""
    unsent: dict[int, list[str]] = {}
    for pid, op in open_prompts.items():
        unsent.setdefault(op["lease"].lease_id, []).append(pid)
    for lease in leases:
        if not lease.done:
            unsent.setdefault(lease.lease_id, []).extend(p.prompt_id for p in lease.prompts)
    return unsent


class GeneratorWorker:
    """Composition of an engine, an endpoint and a reward pool; ``run()`` is the whole loop.

    ``receive_weights(update)`` loads the broadcast announced by a WeightUpdate; by default
    the engine's own (torch.distributed group), in-process runs pass a closure instead."""

    def __init__(self, *, generator_id: int, engine: Any, endpoint: Any, rewards: Any, tokenizer: Any,
                 temperature: float, top_p: float, top_k: int, prompts_per_lease: int,
                 weight_update: str = "in_flight", heartbeat_s: float = 5.0, seed: int = 0,
                 receive_weights: Callable[[Any], None] | None = None,
                 join_weight_group: Callable[[Any], None] | None = None, fingerprint: bool = False,
                 stop_token_ids: list[int] | None = None, lease_retry_s: float = 10.0) -> None:
        from async_or1.timing import Phases

        self.gid = generator_id
        self.engine, self.endpoint, self.rewards, self.tokenizer = engine, endpoint, rewards, tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.prompts_per_lease = prompts_per_lease
        self.in_flight = weight_update == "in_flight"
        self.heartbeat_s = heartbeat_s
        self.seed = seed
        self.receive_weights = receive_weights or engine.update_weights
        self.join_weight_group = join_weight_group
        self.phases = Phases()
        self.stopping = False
        self.incarnation = f"{os.getpid()}-{time.time():.6f}"
        self._pending_weights: list = []
        self._leases: list = []      # granted, not started yet (in arrival order)
        self._asked = False          # a LeaseRequest is out and unanswered
        self._open: dict[str, dict] = {}  # prompt_id -> {"lease", "prompt", "results", "aborted"}: started, unsent
        self._generating = False
        self._last_heartbeat = 0.0
        self._started = time.perf_counter()
        self.groups_sent = 0
        self.tokens_generated = 0
        self.weight_group_epoch = 0
        self.weight_failures = 0     # failed joins/receives survived
        self.torn = False            # a receive failed part-way: no sampling until the next whole update
        self.exit_reason = ""        # "shutdown" (told to stop: a clean exit) or why the loop ended
        self.lease_retry_s = lease_retry_s
        self._asked_at = 0.0
        self.fingerprint = fingerprint
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_ids = list(stop_token_ids) if stop_token_ids else ([eos] if eos is not None else [])
        self._fp: tuple[int, str] | None = None

    # ---- messages ------------------------------------------------------------------
    def _handle(self, msg: Any) -> None:
        from async_or1.transport import messages as m

        if isinstance(msg, m.WeightUpdate):
            if msg.group_epoch != self.weight_group_epoch:
                log.warning("gen %d: ignoring weight update v%d for group epoch %d (mine: %d)",
                            self.gid, msg.version, msg.group_epoch, self.weight_group_epoch)
            elif self._generating and not self.in_flight:
                self._pending_weights.append(msg)
            else:
                self._load_weights(msg)
        elif isinstance(msg, m.WeightGroupInit):
            self._join(msg)
        elif isinstance(msg, m.PromptLease):
            if msg.incarnation and msg.incarnation != self.incarnation:
                # Answers a request of the process this one replaced (same identity): the learner
                # re-issues those prompts when it sees this incarnation, so taking them would
                # sample them twice.
                log.warning("gen %d: ignoring lease %d addressed to incarnation %s", self.gid, msg.lease_id,
                            msg.incarnation)
                return
            self._leases.append(msg)
            self._asked = False
        elif isinstance(msg, m.Shutdown):
            log.info("gen %d: shutdown (%s)", self.gid, msg.reason)
            self.stopping = True
            self.exit_reason = "shutdown"
        else:
            log.warning("gen %d: unexpected message %s", self.gid, type(msg).__name__)

    def _join(self, msg: Any) -> None:
        """Join weight group epoch ``msg.epoch``. A failed join (a member died during the rendezvous)
        is survivable: the learner re-forms the group as a later epoch, which this process joins."""
        if self.join_weight_group is None:
            raise RuntimeError("WeightGroupInit received but this worker has no weight group")
        try:
            with self.phases("weights"):
                self.join_weight_group(msg)
        except Exception as e:
            log.error("gen %d: joining weight group epoch %d failed (%s); waiting for the next epoch",
                      self.gid, msg.epoch, e)
            self.weight_group_epoch = -1
            return
        self.weight_group_epoch = msg.epoch

    def _load_weights(self, update: Any) -> None:
        try:
            with self.phases("weights"):
                self.receive_weights(update)
        except Exception as e:
            # The collective failed (a peer died, or the learner gave up on this epoch). What landed
            # before the failure may mix two policies, so nothing more is sampled on these weights:
            # the running batch is aborted and returned, and leases wait for the next whole update,
            # which comes on a re-formed group (a later epoch).
            log.error("gen %d: weight update v%d failed (%s): weights torn until the next update; open "
                      "prompts are returned", self.gid, update.version, e)
            self.torn = True
            if self.join_weight_group is not None:
                self.weight_group_epoch = -1  # this epoch's group is broken: only a re-formed one counts
            self.weight_failures += 1
            if self._generating and hasattr(self.engine, "abort"):
                self.engine.abort()
            return
        self.torn = False
        log.debug("gen %d: now at version %d", self.gid, update.version)
        if self.fingerprint:
            from async_or1.weights.fingerprint import weights_fingerprint

            state = self.engine.model.state_dict()
            self._fp = (update.version, weights_fingerprint((n, state[n]) for n in update.names))
            self._last_heartbeat = 0.0  # report it now

    def poll(self, timeout_s: float = 0.0) -> None:
        """Handle every message waiting now (and wait up to ``timeout_s`` for the first)."""
        msg = self.endpoint.recv(timeout_s)
        while msg is not None:
            self._handle(msg)
            msg = self.endpoint.recv(0.0)
        self._maybe_heartbeat()

    def _maybe_heartbeat(self) -> None:
        from async_or1.transport import messages as m

        now = time.perf_counter()
        if now - self._last_heartbeat < self.heartbeat_s:
            return
        self._last_heartbeat = now
        life = self.phases.lifetime
        stats = {"incarnation": self.incarnation, "idle_s": life.get("idle", 0.0), "wall_s": now - self._started,
                 "groups_sent": self.groups_sent, "tokens_generated": self.tokens_generated}
        if self._fp is not None:
            stats["weights_version"], stats["weights_fp"] = self._fp
        self.endpoint.send(m.Heartbeat(generator_id=self.gid, version=int(self.engine.version), time=time.time(),
                                       stats=stats))

    # ---- phases --------------------------------------------------------------------
    def _ask(self, again: bool = False) -> None:
        """One LeaseRequest out at a time while streaming. ``again``: ask even if one is out (the
        learner keeps one pending request per generator, so a repeat replaces it; a lease granted
        twice just queues here)."""
        from async_or1.transport import messages as m

        # An unanswered request is repeated after lease_retry_s: a request can be lost (the learner
        # restarted, or our identity's route was replaced), and the learner keeps one per generator.
        overdue = self._asked and time.perf_counter() - self._asked_at > self.lease_retry_s
        if (again or overdue or not self._asked) and not self._leases:
            self.endpoint.send(m.LeaseRequest(generator_id=self.gid, max_prompts=self.prompts_per_lease,
                                              incarnation=self.incarnation))
            self._asked, self._asked_at = True, time.perf_counter()

    def lease(self) -> Any | None:
        """Ask for prompts and wait (idle) until they come and our weights are recent enough."""
        with self.phases("idle"):
            self._ask(again=True)
            while not self._leases and not self.stopping:
                self.poll(0.05)
                self._ask()
            lease = self._leases.pop(0) if self._leases else None
            if lease is None or lease.done:
                if lease is not None:
                    self.exit_reason = "shutdown"
                return None
            # The learner wants these prompts sampled by weights at least this new (on-policy: exactly
            # the version being trained next); the broadcast that brings them is already on its way.
            while (self.engine.version < lease.min_version or self.torn) and not self.stopping:
                self.poll(0.05)
        if self.stopping:
            self._leases.insert(0, lease)
            self._return_all()
            return None
        return lease

    def _start(self, lease: Any) -> list:
        """The engine requests of a lease's prompts; its prompts become open (started, unsent)."""
        from async_or1.generation.engine import GenRequest, SamplingParams

        requests = []
        for p in lease.prompts:
            ids = [int(t) for t in p.token_ids]
            for i in range(p.samples_per_prompt):
                # A seeded prompt (evaluations) draws each sample from its own stream: batch-mates and
                # the generator it lands on do not change it.
                params = SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                        max_new_tokens=int(p.max_response_tokens), stop_token_ids=self.stop_ids,
                                        seed=None if p.sample_seed < 0 else p.sample_seed + i)
                requests.append(GenRequest(f"{p.prompt_id}/{i}", ids, params))
            self._open[p.prompt_id] = {"lease": lease, "prompt": p, "results": [None] * p.samples_per_prompt,
                                       "aborted": False, "t0": time.perf_counter()}
        return requests

    def _more(self) -> list:
        """Continuous leasing: ask ahead while at most one lease's worth of prompts is open, and
        start a granted lease as soon as our weights reach its min_version."""
        if self.stopping or self.torn or (self._pending_weights and not self.in_flight):
            return []  # let the batch drain: shut down, torn weights, or load the waiting ones between requests
        if len(self._open) <= self.prompts_per_lease:
            self._ask()
        if (self._leases and not self._leases[0].done and self.engine.version >= self._leases[0].min_version
                and not self.torn):
            return self._start(self._leases.pop(0))
        return []

    def _on_result(self, r: Any) -> None:
        pid, i = r.request_id.rsplit("/", 1)
        op = self._open[pid]
        op["results"][int(i)] = r
        op["aborted"] |= r.finish_reason == "aborted"
        self.tokens_generated += len(r.tokens)
        if not op["aborted"] and all(x is not None for x in op["results"]):
            del self._open[pid]
            t1 = time.perf_counter()
            scores = self.score(op["prompt"], op["results"])
            timings = {"generate": round(t1 - op["t0"], 4), "score": round(time.perf_counter() - t1, 4)}
            self.send(op["lease"], op["prompt"], op["results"], scores, timings)

    def generate(self, lease: Any) -> bool:
        """Sample (and, as groups complete, score and send) this lease and every lease that
        arrives meanwhile. False when stopped: the unsent prompts have been returned."""
        requests = self._start(lease)

        def between_steps() -> None:
            self.poll(0.0)
            if self.stopping and hasattr(self.engine, "abort"):
                self.engine.abort()

        inner0 = self.phases.lifetime
        t0 = time.perf_counter()
        self._generating = True
        try:
            self.engine.generate(requests, between_steps=between_steps, on_result=self._on_result, more=self._more)
        finally:
            self._generating = False
            # score and send ran inside the engine call: generate is the rest of it
            inner = sum(self.phases.lifetime.get(k, 0.0) - inner0.get(k, 0.0) for k in ("score", "send", "weights"))
            self.phases.add("generate", time.perf_counter() - t0 - inner)
        for update in self._pending_weights:
            self._load_weights(update)
        self._pending_weights.clear()
        if self.stopping or self._open:
            # Stopped, or aborted because the weights tore: what is unsent goes back for re-issue.
            self._return_all()
        return not self.stopping

    def score(self, prompt: Any, results: list) -> list:
        from async_or1.generation.text import response_text

        with self.phases("score"):
            stop = set(self.stop_ids)
            return self.rewards.score([(prompt.ability, response_text(self.tokenizer, r.tokens, stop),
                                        prompt.ground_truth) for r in results])

    def send(self, lease: Any, prompt: Any, results: list, scores: list, timings: dict) -> None:
        """One group; ``timings``: seconds from the prompt's start to its last response, and scoring."""
        from async_or1.transport import messages as m
        from async_or1.transport.codec import arena

        with self.phases("send"):
            # Lists -> arrays straight into the frame-to-be: encoding then copies nothing.
            arrays = arena([prompt.token_ids] + [x for r in results for x in (r.tokens, r.logprobs, r.versions)],
                           ["<i4"] + ["<i4", "<f4", "<i4"] * len(results))
            samples = [m.Sample(tokens=arrays[1 + 3 * i], logprobs=arrays[2 + 3 * i], versions=arrays[3 + 3 * i],
                                finish_reason=r.finish_reason, reward=float(s.reward),
                                reward_details={"reason": s.reason, "seconds": round(s.seconds, 4),
                                                "correct": bool(s.correct)})
                       for i, (r, s) in enumerate(zip(results, scores))]
            self.endpoint.send(m.RolloutGroup(lease_id=lease.lease_id, prompt_id=prompt.prompt_id, stage=prompt.stage,
                                              generator_id=self.gid, prompt_tokens=arrays[0], samples=samples,
                                              timings=timings))
            self.groups_sent += 1

    def _return_all(self) -> None:
        """Every prompt leased to us and not sent goes back (open ones and unstarted leases)."""
        from async_or1.transport import messages as m

        for lease_id, pids in unsent_by_lease(self._open, self._leases).items():
            self.endpoint.send(m.ReturnLease(generator_id=self.gid, lease_id=lease_id, prompt_ids=pids))
        self._open.clear()
        self._leases = [lease for lease in self._leases if lease.done]

    # ---- the loop ------------------------------------------------------------------
    def run(self) -> str:
        """The loop; returns why it ended: "shutdown" (the learner said so: a clean exit) or
        "signal" (stopped from outside, e.g. SIGTERM: the launcher restarts such a generator)."""
        self._maybe_heartbeat()              # first: the learner learns our incarnation before any request
        while not self.stopping:
            lease = self.lease()             # idle until prompts (and recent enough weights) arrive
            if lease is None or not self.generate(lease):  # generate → score → send, group by group
                break
        self._last_heartbeat = 0.0
        self._maybe_heartbeat()
        self.exit_reason = self.exit_reason or "signal"
        log.info("gen %d: stopped (%s) after %d groups", self.gid, self.exit_reason, self.groups_sent)
        return self.exit_reason


# ---------------------------------------------------------------------------
# process entry point (spawned by launch.py)
# ---------------------------------------------------------------------------

def build_engine(cfg: Any, model_path: str, generator_id: int, device: str = "cpu") -> Any:
    if cfg.generation.engine == "sglang":
        from async_or1.generation.sglang_engine import SGLangEngine

        g = cfg.generation
        return SGLangEngine(model_path, mem_fraction_static=g.sglang_mem_fraction, tp_size=g.sglang_tp_size,
                            seed=g.seed + generator_id, pause_mode=g.sglang_pause_mode,
                            weight_layout=g.sglang_weight_layout)
    from async_or1.generation.torch_engine import TorchEngine

    return TorchEngine(model_path, dtype=cfg.model.dtype, device=device, max_batch_size=cfg.generation.max_batch_size,
                       seed=cfg.generation.seed + generator_id, weight_timeout_s=cfg.transport.weights_timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="async_or1.generation.worker")
    ap.add_argument("--spec", required=True, help="launch spec JSON written by async-or1 train")
    ap.add_argument("--generator-id", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[gen {args.generator_id}] %(asctime)s %(message)s")
    with open(args.spec) as f:
        spec = json.load(f)

    from async_or1.config import config_from_dict
    from async_or1.launch_spec import apply_process_pinning

    cfg = config_from_dict(spec["config"])
    apply_process_pinning(spec["generator_devices"][args.generator_id] if spec["generator_devices"] else None)

    from transformers import AutoTokenizer

    from async_or1.generation.engine import WeightGroupSpec
    from async_or1.rewards.pool import RewardPool
    from async_or1.transport.zmq import ZmqGeneratorEndpoint

    from async_or1.generation.text import stop_token_ids

    curve = None  # keys first: a missing key fails before the model loads
    if cfg.transport.curve:
        from async_or1.transport.keys import generator_keys

        curve = generator_keys(spec["keys_dir"], args.generator_id)
    engine = build_engine(cfg, spec["model_path"], args.generator_id,
                          device="cuda" if spec.get("device_kind") == "cuda" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
    stop_ids = stop_token_ids(tokenizer, spec["model_path"])
    endpoint = ZmqGeneratorEndpoint(spec["address"], args.generator_id,
                                    max_message_bytes=cfg.transport.max_message_mb << 20,
                                    hwm=cfg.transport.high_water_mark, curve=curve)

    def join(msg: Any) -> None:
        engine.init_weight_group(WeightGroupSpec(master_address=msg.master_address, master_port=msg.master_port,
                                                 rank_offset=int(msg.ranks[str(args.generator_id)]),
                                                 world_size=msg.world_size, group_name=msg.group_name,
                                                 backend=msg.backend))

    rc = cfg.rewards
    with RewardPool(workers=rc.workers, math_timeout_s=rc.math_timeout_s, code_timeout_s=rc.code_timeout_s,
                    code_memory_mb=rc.code_memory_mb, require_think=rc.require_think,
                    code_isolation=rc.code_isolation) as rewards:
        worker = GeneratorWorker(generator_id=args.generator_id, engine=engine, endpoint=endpoint, rewards=rewards,
                                 tokenizer=tokenizer, temperature=cfg.algo.temperature, top_p=cfg.algo.top_p,
                                 top_k=cfg.algo.top_k, prompts_per_lease=cfg.generation.prompts_per_lease,
                                 weight_update=cfg.generation.weight_update, heartbeat_s=cfg.transport.heartbeat_s,
                                 seed=cfg.generation.seed, join_weight_group=join,
                                 fingerprint=cfg.log.weight_fingerprints and cfg.generation.engine == "torch",
                                 stop_token_ids=stop_ids, lease_retry_s=cfg.transport.lease_retry_s)

        def on_sigterm(signum: int, frame: Any) -> None:
            worker.stopping = True

        signal.signal(signal.SIGTERM, on_sigterm)
        # The first weight group is announced by the learner like any later one (epoch ≥ 1), so a
        # restarted generator joins exactly the way the first one did.
        reason = worker.run()
    endpoint.close()
    engine.close()
    # Only a Shutdown from the learner is a clean end; anything else is a failure the launcher restarts.
    return 0 if reason == "shutdown" else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
