"""Real processes, real sockets: two generator processes and a consumer with a ReplayBuffer.

The generators (this file run as a script) lease prompts, "generate" tokens one at a time while
polling for WeightUpdates, stamp each token with the version they hold, send whole groups, and
each sends one malformed frame. The consumer plays the learner: admission control, take_batch,
version += 1, broadcast. At the end the ledger must balance and every stamp must be honest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOKENS, SAMPLES, STEPS, BATCH, ETA = 12, 2, 5, 4, 1


def generator_main(address: str, gid: int) -> int:
    from async_or1.transport import messages as m
    from async_or1.transport.zmq import ZmqGeneratorEndpoint

    ep = ZmqGeneratorEndpoint(address, gid)
    state = {"version": 0, "applied": [], "stop": False}

    def handle(msg) -> object:
        if isinstance(msg, m.WeightUpdate):
            state["version"] = msg.version
            state["applied"].append(msg.version)
        elif isinstance(msg, m.Shutdown):
            state["stop"] = True
        else:
            return msg
        return None

    def poll(timeout_s: float) -> object:
        msg = ep.recv(timeout_s)
        while msg is not None:
            other = handle(msg)
            if other is not None:
                return other
            msg = ep.recv(0.0)
        return None

    ep.send_raw(b"\x93\x01\x02")  # 3 bytes, shorter than a header length: counted, never a crash
    sent = 0
    while not state["stop"]:
        ep.send(m.LeaseRequest(generator_id=gid, max_prompts=2))
        lease = None
        while lease is None and not state["stop"]:
            lease = poll(0.05)
        if lease is None or lease.done:
            break
        while state["version"] < lease.min_version and not state["stop"]:
            poll(0.05)
        groups, unsent = [], [p.prompt_id for p in lease.prompts]
        for p in lease.prompts:
            samples = []
            for i in range(p.samples_per_prompt):
                toks, versions = [], []
                for t in range(TOKENS):  # weights may change between any two tokens
                    poll(0.0)
                    if state["stop"]:
                        break
                    toks.append(t)
                    versions.append(state["version"])
                    time.sleep(0.001)
                # every 3rd prompt scores all-equal (zero advantage); the rest are mixed
                reward = 1.0 if (hash(p.prompt_id) % 3 == 0 or i % 2) else 0.0
                samples.append(m.Sample(tokens=np.array(toks, np.int32), logprobs=np.full(len(toks), -0.5, np.float32),
                                        versions=np.array(versions, np.int32), finish_reason="stop", reward=reward))
            if state["stop"]:
                break
            groups.append(m.RolloutGroup(lease_id=lease.lease_id, prompt_id=p.prompt_id, stage=p.stage,
                                         generator_id=gid, prompt_tokens=p.token_ids, samples=samples))
        for g in groups:
            ep.send(g)
            unsent.remove(g.prompt_id)
            sent += 1
        if unsent:  # a group is sent whole or not at all: the rest go back
            ep.send(m.ReturnLease(generator_id=gid, lease_id=lease.lease_id, prompt_ids=unsent))
    ep.send(m.Heartbeat(generator_id=gid, version=state["version"], time=time.time(),
                        stats={"applied": state["applied"], "sent": sent, "rejected": ep.stats["rejected_malformed"]}))
    ep.close()  # lingers until the frames above are on their way
    return 0


def test_two_generator_processes_and_a_buffer():
    from async_or1.buffer import ReplayBuffer
    from async_or1.transport import messages as m
    from async_or1.transport.zmq import ZmqLearnerEndpoint

    learner = ZmqLearnerEndpoint()
    buf = ReplayBuffer(ETA, lambda s: BATCH)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, __file__, learner.address, str(gid)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for gid in (0, 1)]
    version, pending, lease_version, next_id = 0, {}, {}, 0
    received, final = [], {}
    try:
        deadline = time.monotonic() + 60

        def pump() -> None:
            nonlocal next_id
            got = learner.recv(0.01)
            while got is not None:
                peer, msg = got
                if isinstance(msg, m.LeaseRequest):
                    pending[peer] = msg
                elif isinstance(msg, m.RolloutGroup):
                    received.append((version, msg))
                    buf.add_group(msg)
                elif isinstance(msg, m.ReturnLease):
                    buf.on_returned(msg.prompt_ids)
                elif isinstance(msg, m.Heartbeat):
                    final[msg.generator_id] = msg.stats
                got = learner.recv(0.0)
            for peer, req in list(pending.items()):
                if version >= STEPS:  # the Shutdown broadcast answers them (their sender may be gone already)
                    del pending[peer]
                    continue
                n = min(buf.admission_room(version), req.max_prompts)
                if n <= 0:
                    continue
                ids = [f"q{next_id + i}" for i in range(n)]
                next_id += n
                buf.on_leased(ids, version, samples_per_prompt=SAMPLES)
                lease_version.update({p: version for p in ids})
                prompts = [m.Prompt(prompt_id=p, token_ids=np.arange(3, dtype=np.int32), ability="math",
                                    ground_truth=["1"], stage=0, samples_per_prompt=SAMPLES, max_response_tokens=TOKENS)
                           for p in ids]
                assert learner.send(peer, m.PromptLease(lease_id=next_id, prompts=prompts, min_version=version))
                del pending[peer]

        while version < STEPS:
            assert time.monotonic() < deadline, f"stuck at version {version}: {buf.accounting()}"
            pump()
            # A broadcast reaches the peers the endpoint has heard from; a generator still importing
            # (a loaded machine) would miss version 1 and the version-stamp check below would blame
            # the transport. A real generator that joins late takes the newest weights instead.
            if len(learner.peers) < 2:
                continue
            batch = buf.take_batch(version, BATCH, timeout_s=0)
            if batch is not None:
                assert len(batch) == BATCH
                version += 1
                learner.broadcast(m.WeightUpdate(version=version, names=[], dtypes=[], shapes=[], bucket_bytes=1))
        learner.broadcast(m.Shutdown(reason="done"))
        while (len(final) < 2 or buf.accounting()["in_flight"]) and time.monotonic() < deadline:
            pump()
        for p in procs:
            assert p.wait(timeout=20) == 0, p.stdout.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        learner.close()

    # ---- the ledger -------------------------------------------------------------------------
    acc = buf.accounting()
    buf.check_accounting()
    assert acc["in_flight"] == 0 and acc["trained"] == STEPS * BATCH, acc
    assert acc["received"] == len(received) == sum(f["sent"] for f in final.values())
    assert acc["unleased_groups"] == 0 and acc["dropped"].get("malformed", 0) == 0
    st = learner.stats
    assert st["rejected_malformed"] == 2 and st["rejected_oversized"] == 0 and st["send_unroutable"] == 0, st
    assert all(f["rejected"] == 0 for f in final.values())
    # ---- the version stamps -----------------------------------------------------------------
    for gid, f in final.items():  # every broadcast reached every generator, in order
        assert f["applied"] == list(range(1, STEPS + 1)), (gid, f)
    stamps = {0: [], 1: []}
    for v_at_receipt, g in received:
        for s in g.samples:
            vs = s.versions.tolist()
            assert vs == sorted(vs), f"versions go back in time within {g.prompt_id}: {vs}"
            assert vs[0] >= lease_version[g.prompt_id], (g.prompt_id, vs, lease_version[g.prompt_id])
            assert vs[-1] <= v_at_receipt, "a token claims weights the learner had not produced yet"
            stamps[g.generator_id] += vs
    for gid, vs in stamps.items():
        assert vs and vs == sorted(vs), f"generator {gid} stamps are not monotone in send order"
    assert max(max(v) for v in stamps.values()) >= STEPS - ETA, "generators never stamped a new version"


if __name__ == "__main__":
    sys.exit(generator_main(sys.argv[1], int(sys.argv[2])))
