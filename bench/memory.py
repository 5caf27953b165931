"""Learner memory under ZeRO-3: each rank's peak while it loads, broadcasts and saves the model.

    python bench/memory.py [--layers 12 --hidden 768 --intermediate 2048 --vocab 32768]
                           [--bucket-mb 128] [--ranks 2] [--out PATH]

Model: a Qwen2-shaped causal LM built here from a config (random init, no download, fp32, tied
embeddings), saved as one safetensors file; the defaults give 101M parameters (403 MB). ``--ranks``
learner ranks (LearnerEngine, DeepSpeed ZeRO-3, gloo on 127.0.0.1) go through the learner's phases
in order: load, one optimizer step, two weight broadcasts (the loop's ``broadcast_weights`` through
a real WeightGroup, flat layout, to one receiver process that checks every byte by fingerprint),
``save_hf`` (then read back and compared on rank 0, untimed and unmeasured).

Memory, per rank and phase, in MiB over the rank's resident set at the start of the phase:
- ``peak_extra``: the kernel's own high-water mark of the resident set (VmHWM, reset through
  /proc/self/clear_refs as the phase starts), so no spike between samples is missed;
- ``peak_anon_extra``: anonymous memory alone (RssAnon, sampled every ms in a thread). A file the
  process maps counts in RSS while mapped (rank 0 reads the checkpoint through mmap at load) but is
  page cache, shared and reclaimable; anonymous memory is what the process itself holds.
glibc keeps freed heap memory for reuse, which would hide a phase's allocations inside the RSS it
starts with; the ranks run with MALLOC_MMAP_THRESHOLD_=65536, so every block of 64 KiB or more is
its own mapping, returned when freed, and RSS follows the live tensors.

Phase ``load_model`` is the start of ``load`` up to the call of ``deepspeed.initialize``: the model
as loaded, before DeepSpeed adds its buffers (its ``end_anon_extra_mib`` is what a rank holds of the
model). ``--checkpoint-dtype bfloat16`` saves the checkpoint in bf16 (trained in fp32), the case in
which a plain ``from_pretrained`` converts, and so holds, the whole model on every rank.

Targets (issue #14): rank 0's peak extra during a broadcast and during save_hf <= 2 x bucket + 10%;
each rank holds its partition after loading; each rank's anonymous peak at load <= its model states
+ one bucket (+10%), where "model states" is what the rank holds after the first optimizer step
(partitioned weights, fp32 copy, gradients, Adam moments). Writes bench/results/memory.json (or
--out) and prints one line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
MIB = 1 << 20


# ---- measuring -------------------------------------------------------------------------------

class Probe:
    """Per-phase memory of this process: VmHWM (exact peak RSS) and a 1 ms RssAnon sampler."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.results: dict[str, dict] = {}
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._peak_anon = self._anon()
        self._stop = False
        threading.Thread(target=self._sample, args=(period_s,), daemon=True, name="memory-probe").start()

    def _statm(self) -> tuple[int, int]:
        fields = os.pread(self._fd, 256, 0).split()
        return int(fields[1]) * self.page, int(fields[2]) * self.page  # resident, shared (file + shmem)

    def _anon(self) -> int:
        rss, shared = self._statm()
        return rss - shared

    def _sample(self, period_s: float) -> None:
        while not self._stop:
            self._peak_anon = max(self._peak_anon, self._anon())
            time.sleep(period_s)

    def close(self) -> None:
        self._stop = True

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    @contextlib.contextmanager
    def phase(self, name: str):
        gc.collect()
        self._start = (self._status("VmRSS"), self._anon(), time.perf_counter())
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
        self._peak_anon = self._start[1]
        yield
        self.mark(name)

    def mark(self, name: str) -> None:
        """Record ``name``: the current phase from its start until now."""
        rss0, anon0, t0 = self._start
        self._peak_anon = max(self._peak_anon, self._anon())
        self.results[name] = {
            "seconds": round(time.perf_counter() - t0, 3), "rss_start_mib": round(rss0 / MIB, 1),
            "peak_extra_mib": round((self._status("VmHWM") - rss0) / MIB, 1),
            "peak_anon_extra_mib": round((self._peak_anon - anon0) / MIB, 1),
            "end_extra_mib": round((self._status("VmRSS") - rss0) / MIB, 1),
            "end_anon_extra_mib": round((self._anon() - anon0) / MIB, 1)}


# ---- the model --------------------------------------------------------------------------------

def make_model(path: Path, a: dict) -> int:
    """A random Qwen2 from ``a``'s shape, saved to ``path``; returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
                      max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, a["checkpoint_dtype"]))
    model.save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())


# ---- the receiver (the generator's side of the weight group) ----------------------------------

class _Wire:
    """Stands in for the learner's Controller, which posts these messages to the generators over
    ZeroMQ: here they go, encoded and decoded by the real codec, over a queue to the one receiver."""

    def __init__(self, q) -> None:
        self.q = q

    def post(self, msg, peer=None) -> None:
        from async_or1.transport.codec import encode

        self.q.put(bytes(encode(msg)))

    def flush(self) -> None:
        pass

    def members(self) -> tuple:
        return 0, [0]  # (membership counter, live generator ids): one receiver, never changing


def _receiver(q_in, q_out) -> None:
    import torch

    from async_or1.transport import messages as m
    from async_or1.transport.codec import decode
    from async_or1.weights import init_weight_group, recv_weights
    from async_or1.weights.fingerprint import weights_fingerprint

    torch.set_num_threads(1)
    group = None
    while (data := q_in.get()) is not None:
        msg = decode(data)
        if isinstance(msg, m.WeightGroupInit):
            group = init_weight_group(msg.master_address, msg.master_port, msg.ranks["0"], msg.world_size,
                                      group_name=msg.group_name, backend=msg.backend, timeout_s=600)
        elif isinstance(msg, m.WeightUpdate):
            q_out.put((msg.version, weights_fingerprint(recv_weights(group, msg))))


# ---- one learner rank -------------------------------------------------------------------------

def _rank(job: dict) -> None:
    probe = Probe()
    import deepspeed
    import torch
    import torch.distributed as dist

    from async_or1.config import Config
    from async_or1.learner.broadcast import broadcast_weights
    from async_or1.weights.group import WeightGroup
    from async_or1.learner.engine import LearnerEngine
    from async_or1.learner.packing import collate

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = Config()
    cfg.learner.zero_stage, cfg.learner.bucket_mb, cfg.model.dtype = 3, job["bucket_mb"], "float32"
    out = Path(job["out"])
    # Every module the load imports, imported before its baseline: the phase measures the model.
    import accelerate  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(job["model"]))]
    # The model as loaded, before DeepSpeed adds its own buffers: a sub-phase that ends where the
    # engine hands the model to deepspeed.initialize.
    real_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        probe.mark("load_model")
        return real_initialize(*args, **kwargs)

    deepspeed.initialize = initialize
    dist.barrier()
    with probe.phase("load"):
        engine = LearnerEngine(cfg, job["model"])
    deepspeed.initialize = real_initialize
    dist.barrier()
    g = torch.Generator().manual_seed(rank)
    prompt, resp = torch.randint(1, 100, (8,), generator=g).tolist(), torch.randint(1, 100, (24,), generator=g).tolist()
    mb = collate([prompt], [resp], [1.0], [[-4.0] * len(resp)])
    with probe.phase("step"):
        engine.train_step([mb], num_tokens_global=len(resp) * dist.get_world_size())
    channel = receiver = None
    if rank == 0:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        q_in, q_out = ctx.Queue(), ctx.Queue()
        receiver = ctx.Process(target=_receiver, args=(q_in, q_out), daemon=True)
        receiver.start()
        channel = WeightGroup(_Wire(q_in), master_address="127.0.0.1", bind_host="127.0.0.1",
                              first_port=job["weights_port"], backend="gloo", layout="flat",
                              bucket_bytes=job["bucket_mb"] * MIB, timeout_s=600, fingerprint=True)
    checks = {}
    for version in (1, 2):
        dist.barrier()
        with probe.phase(f"broadcast_{version}"):
            sent = broadcast_weights(engine, channel, version)
        if rank == 0:
            got = q_out.get(timeout=600)
            checks[f"broadcast_{version}"] = bool(sent and got == (version, channel.sent_fingerprints[version]))
    dist.barrier()
    with probe.phase("save_hf"):
        engine.save_hf(out / "hf")
    if rank == 0:
        q_in.put(None)
        receiver.join(timeout=60)
        checks["save_hf"] = _same_weights(engine, out / "hf", job["model"])
    probe.close()
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "phases": probe.results, "checks": checks}))
    dist.barrier()


def _same_weights(engine, saved: Path, original: str) -> bool:
    """The saved directory loads with from_pretrained and holds the learner's weights after its
    step (which moved them away from the original checkpoint's)."""
    import torch
    from transformers import AutoModelForCausalLM

    files = sorted(p.name for p in saved.glob("*.safetensors"))
    mine = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    before = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    a, b = dict(mine.named_parameters()), dict(before.named_parameters())
    moved = any(not torch.equal(a[n], b[n]) for n in a)
    return len(files) > 1 and moved and a.keys() == b.keys()


# ---- driver -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a: dict, workdir: Path) -> dict:
    """Build the model, run the ranks, return the result (also what the test asserts on)."""
    model = workdir / "model"
    n_params = make_model(model, a)
    job = {"model": str(model), "bucket_mb": a["bucket_mb"], "out": str(workdir), "weights_port": _free_port()}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(a["ranks"]), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(HERE), "--rank-job", json.dumps(job)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(a["ranks"])]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=a["timeout_s"])[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(r, o) for r, (p, o) in enumerate(zip(procs, outs)) if p.returncode != 0]
    if failed:
        raise RuntimeError("\n".join(f"--- rank {r}\n{o[-4000:]}" for r, o in failed))
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(a["ranks"])]
    bucket = a["bucket_mb"]
    model_mib = n_params * 4 / MIB
    r0 = ranks[0]["phases"]
    loads = [r["phases"]["load"] for r in ranks]
    states = [r["phases"]["load"]["end_anon_extra_mib"] + r["phases"]["step"]["end_anon_extra_mib"] for r in ranks]
    return {
        "model": {"parameters": n_params, "mib_fp32": round(model_mib, 1), **{k: a[k] for k in (
            "layers", "hidden", "intermediate", "vocab", "heads", "kv_heads", "checkpoint_dtype")}},
        "ranks": a["ranks"], "bucket_mb": bucket, "zero_stage": 3, "backend": "gloo, 127.0.0.1",
        "per_rank": ranks,
        "rank0_broadcast_peak_extra_mib": max(r0["broadcast_1"]["peak_extra_mib"], r0["broadcast_2"]["peak_extra_mib"]),
        "rank0_save_hf_peak_extra_mib": r0["save_hf"]["peak_extra_mib"],
        "target_mib": round(2 * bucket * 1.1, 1),
        "load_model_peak_anon_extra_mib": [r["phases"]["load_model"]["peak_anon_extra_mib"] for r in ranks],
        "load_peak_anon_extra_mib": [lo["peak_anon_extra_mib"] for lo in loads],
        "load_peak_extra_mib": [lo["peak_extra_mib"] for lo in loads],
        "model_states_mib": [round(s, 1) for s in states],
        "load_target_mib": [round((s + bucket) * 1.1, 1) for s in states],
        "checks": ranks[0]["checks"],
        "wall_s": round(time.time() - t0, 1), "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-job", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--bucket-mb", type=int, default=128)
    ap.add_argument("--checkpoint-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the saved checkpoint (the learner trains in float32 either way)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    if args.rank_job:
        _rank(json.loads(args.rank_job))
        return 0
    a = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab", "heads", "kv_heads", "bucket_mb",
                                         "ranks", "timeout_s", "checkpoint_dtype")}
    with tempfile.TemporaryDirectory(prefix="async-or1-memory-") as d:
        res = run(a, Path(d))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"memory: {res['model']['parameters'] / 1e6:.0f}M params ({res['model']['mib_fp32']:.0f} MiB fp32), "
          f"{res['ranks']} ranks ZeRO-3, bucket {res['bucket_mb']} MiB: rank 0 peak extra broadcast "
          f"{res['rank0_broadcast_peak_extra_mib']:.0f} MiB, save_hf {res['rank0_save_hf_peak_extra_mib']:.0f} MiB "
          f"(target {res['target_mib']:.0f}); per rank: model load {res['load_model_peak_anon_extra_mib']} MiB, "
          f"load with DeepSpeed {res['load_peak_anon_extra_mib']} MiB vs states "
          f"{res['model_states_mib']} MiB; checks {res['checks']}; load {res['loadavg_1min']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
