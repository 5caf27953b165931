"""A simulated generator: the worker's wire protocol (``generation/worker.py``) around a SimEngine.

It speaks to the real controller with the real messages over the in-process transport and
follows the worker's streaming policy: one LeaseRequest out at a time, asked while no more than
``prompts_per_lease`` prompts are open; a granted lease starts once the loaded weights reach its
``min_version``; each group is sent when its G-th response ends; on Shutdown every unsent prompt
goes back in a ReturnLease. Scoring is the workload's draw (``workload.sample_group``), made when
the prompt starts (``sample``); verifier time is not modelled (math-verify takes milliseconds a
response).
"""

from __future__ import annotations

from typing import Any, Callable

from async_or1.generation.worker import unsent_by_lease
from async_or1.sim.engine import Seq, SimEngine
from async_or1.sim.workload import Runs
from async_or1.transport import messages as m


class SimGenerator:
    def __init__(self, *, generator_id: int, endpoint: Any, make_engine: Callable[..., SimEngine], rng: Any,
                 sample: Callable[[Any, Any], tuple], prompts_per_lease: int, in_flight: bool,
                 clock: Any, on_send: Callable[[], None], on_weights_ready: Callable[[int], None],
                 record_group: Callable[[Any, int], None]) -> None:
        self.gid = generator_id
        self.endpoint = endpoint
        self.rng = rng
        self.sample = sample                  # (rng, Prompt) -> (response lengths, rewards) of its group
        self.prompts_per_lease = prompts_per_lease
        self.in_flight = in_flight
        self.clock = clock
        self.on_send, self.on_weights_ready, self.record_group = on_send, on_weights_ready, record_group
        self.engine = make_engine(on_finish=self._on_finish, on_paused=self._on_paused, on_idle=self._on_idle)
        self.incarnation = f"sim-{generator_id}"
        self._leases: list = []               # granted, not started yet
        self._asked = False
        self._open: dict[str, dict] = {}      # prompt_id -> {"lease", "prompt", "seqs", "left", "rewards"}
        self._update: Any = None              # WeightUpdate announced, not loaded yet
        self.stopping = False
        self.groups_sent = 0

    # ---- messages ------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        self.endpoint.send(msg)
        self.on_send()

    def deliver(self) -> None:
        """Handle everything the controller sent us."""
        msg = self.endpoint.recv(0.0)
        while msg is not None:
            self._handle(msg)
            msg = self.endpoint.recv(0.0)

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, m.WeightUpdate):
            self._update = msg
            if self.in_flight or self.engine.empty:
                self.engine.request_pause()   # between decode steps (in flight) or now (nothing runs)
        elif isinstance(msg, m.PromptLease):
            self._leases.append(msg)
            self._asked = False
            self._stream()
        elif isinstance(msg, m.Shutdown):
            self.stopping = True
            self._return_all()
        else:
            raise RuntimeError(f"sim generator {self.gid}: unexpected {type(msg).__name__}")

    def heartbeat(self) -> None:
        e = self.engine
        e.close_accounts()
        self._send(m.Heartbeat(generator_id=self.gid, version=int(e.version), time=self.clock.monotonic(),
                               stats={"incarnation": self.incarnation, "idle_s": e.idle_s,
                                      "wall_s": self.clock.monotonic(), "groups_sent": self.groups_sent,
                                      "tokens_generated": e.tokens}))

    # ---- the worker's streaming policy ----------------------------------------------------
    def start(self) -> None:
        self.heartbeat()       # the learner learns our incarnation with the first request
        self._stream()

    def _stream(self) -> None:
        """Start every granted lease our weights allow; ask for more while few prompts are open."""
        if self.stopping or (self._update is not None and not self.in_flight):
            return             # between_requests: let the batch drain so the update can load
        while self._leases and not self._leases[0].done and self.engine.version >= self._leases[0].min_version:
            self._start(self._leases.pop(0))
        if self._leases and self._leases[0].done:
            self.stopping = True
            return
        if not self._asked and not self._leases and len(self._open) <= self.prompts_per_lease:
            self._send(m.LeaseRequest(generator_id=self.gid, max_prompts=self.prompts_per_lease))
            self._asked = True

    def _start(self, lease: Any) -> None:
        seqs = []
        for p in lease.prompts:
            lengths, rewards = self.sample(self.rng, p)
            group = [Seq(key=(p.prompt_id, i), prompt_key=p.prompt_id, prompt_len=len(p.token_ids),
                         length=int(n), submit_version=self.engine.version) for i, n in enumerate(lengths)]
            self._open[p.prompt_id] = {"lease": lease, "prompt": p, "seqs": group, "left": len(group),
                                       "rewards": rewards}
            seqs += group
        self.engine.submit(seqs)

    def _on_finish(self, seq: Seq) -> None:
        op = self._open.get(seq.key[0])
        if op is None:     # returned at shutdown while it ran
            return
        op["left"] -= 1
        if op["left"] == 0:
            del self._open[seq.key[0]]
            self._send_group(op)
            self._stream()

    def _send_group(self, op: dict) -> None:
        p = op["prompt"]
        samples = []
        for seq, r in zip(op["seqs"], op["rewards"]):
            n = seq.length
            tokens = Runs((0,), (n,))   # ids and log-probs are not modelled: only their count matters
            values, counts = zip(*seq.runs)
            samples.append(m.Sample(tokens=tokens, logprobs=tokens, versions=Runs(values, counts),
                                    finish_reason="length" if n >= p.max_response_tokens else "stop",
                                    reward=float(r)))
        group = m.RolloutGroup(lease_id=op["lease"].lease_id, prompt_id=p.prompt_id, stage=p.stage,
                               generator_id=self.gid, prompt_tokens=p.token_ids, samples=samples,
                               timings={"generate": self.clock.monotonic()})
        self.record_group(group, op["lease"].min_version)
        self._send(group)
        self.groups_sent += 1

    def _return_all(self) -> None:
        for lease_id, pids in unsent_by_lease(self._open, self._leases).items():
            self._send(m.ReturnLease(generator_id=self.gid, lease_id=lease_id, prompt_ids=pids))
        self._open.clear()
        self._leases = []
        self.engine.abort()

    # ---- weights -------------------------------------------------------------------------
    def _on_paused(self) -> None:
        self.on_weights_ready(self.gid)

    def load_weights(self, recompute_kv: bool) -> None:
        """The broadcast is over: continue on the new version."""
        update, self._update = self._update, None
        self.engine.resume(update.version, recompute_kv)
        self._stream()

    def _on_idle(self) -> None:
        if self._update is not None and not self.in_flight and not self.engine.paused:
            self.engine.request_pause()        # drained: now the waiting update can load
        elif not self.stopping:
            self._stream()
