"""The whole loop in one process (``transport.kind: inproc``): the learner on the main thread,
each generator on its own thread, queues for the wire and shared memory for the weights.

Same GeneratorWorker, Controller, ReplayBuffer and learner loop as a real run; only the
transport and the weight channel differ. Use it to step through a run under a debugger.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("async_or1.inprocess")


def run_inprocess(cfg: Any, spec: dict, resume: bool = False) -> int:
    from transformers import AutoTokenizer

    from async_or1.generation.torch_engine import TorchEngine
    from async_or1.generation.worker import GeneratorWorker
    from async_or1.learner import loop
    from async_or1.learner.broadcast import InprocChannel, WeightStore
    from async_or1.rewards.pool import RewardPool
    from async_or1.transport.inproc import InprocHub

    if len(cfg.learner.devices) > 1:
        raise SystemExit("transport.kind=inproc runs one learner rank; set learner.devices to at most one entry")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(spec["learner_master_port"])})
    hub = InprocHub()
    store = WeightStore()
    learner_end = hub.learner()  # created before any generator speaks
    errors: list[BaseException] = []

    # Models are loaded here, one after another: from_pretrained builds on the meta device through
    # process-global patches, so two threads loading at once corrupt each other's models.
    engines = [TorchEngine(spec["model_path"], dtype=cfg.model.dtype, max_batch_size=cfg.generation.max_batch_size,
                           seed=cfg.generation.seed + g) for g in range(cfg.generation.num_generators)]

    def generator(gid: int) -> None:
        try:
            engine = engines[gid]
            tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
            from async_or1.generation.text import stop_token_ids
            rc = cfg.rewards
            with RewardPool(workers=rc.workers, math_timeout_s=rc.math_timeout_s, code_timeout_s=rc.code_timeout_s,
                            code_memory_mb=rc.code_memory_mb, require_think=rc.require_think,
                            code_isolation=rc.code_isolation) as rewards:
                GeneratorWorker(generator_id=gid, engine=engine, endpoint=hub.generator(gid), rewards=rewards,
                                tokenizer=tokenizer, temperature=cfg.algo.temperature, top_p=cfg.algo.top_p,
                                top_k=cfg.algo.top_k, prompts_per_lease=cfg.generation.prompts_per_lease,
                                weight_update=cfg.generation.weight_update, heartbeat_s=cfg.transport.heartbeat_s,
                                seed=cfg.generation.seed, fingerprint=cfg.log.weight_fingerprints,
                                lease_retry_s=cfg.transport.lease_retry_s,
                                stop_token_ids=stop_token_ids(tokenizer, spec["model_path"]),
                                receive_weights=lambda u: engine.load_state(store.get(u.version), u.version)).run()
        except BaseException as e:  # reported after the learner returns
            log.exception("generator thread %d failed", gid)
            errors.append(e)

    threads = [threading.Thread(target=generator, args=(g,), name=f"generator-{g}", daemon=True)
               for g in range(cfg.generation.num_generators)]
    rc = loop.run(spec, resume, endpoint=learner_end, before_start=lambda: [t.start() for t in threads],
                  make_channel=lambda cfg_, spec_, controller: InprocChannel(
                      controller, store, fingerprint=cfg.log.weight_fingerprints))
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise RuntimeError(f"a generator thread failed: {errors[0]!r}") from errors[0]
    return rc
