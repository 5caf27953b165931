"""The GPU-scale simulator: the real rollout control code on a virtual clock.

The controller (``learner/controller.py``), the replay buffer with its admission control and
ledger (``buffer.py``) and the prompt source with its stages and online filter
(``data/source.py``) run unchanged over the in-process transport; engines, verifiers and the
learner are cost models. Nothing here sleeps or imports torch.

    presets.py   published hardware figures and model shapes
    costs.py     pure cost functions: decode step, prefill, KV capacity, train step, broadcast
    workload.py  synthetic problems, response lengths and rewards per stage
    clock.py     the virtual clock and the event queue
    engine.py    one continuous-batching engine on the virtual clock
    generator.py the generator worker's protocol (lease, stream, send groups) around an engine
    learner.py   the learner loop's phases (wait, train, broadcast, log) around the real buffer
    driver.py    builds one run and drives it; calibrate.py and report.py use it
"""
