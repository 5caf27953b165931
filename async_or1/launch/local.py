"""The local backend: every process of the run on this machine, supervised from here.

    spawn M learner ranks + N generators on split device pools → supervise (restart dead
    generators; a dead learner stops the run)

Children run in their own sessions, so Ctrl-C reaches only this supervisor, which stops them
in order: learners first (they checkpoint and tell the generators to stop; ``learner.stop_grace_s``
before SIGKILL), then generators. SIGTERM to the supervisor does the same. Children die with the
supervisor whatever kills it, SIGKILL included: each asks the kernel for SIGKILL when its parent
dies (PR_SET_PDEATHSIG, Linux), and their own children (reward workers, sandboxes) do the same.
The Ray backend (``launch/ray.py``) runs these same children, one per actor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Child:
    name: str
    argv: list
    env: dict
    log_path: Path
    stdout_to_terminal: bool = False
    proc: Any = None
    restarts: int = 0
    _files: list = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        err = self.log_path.open("a")
        out = None if self.stdout_to_terminal else err
        self._files = [err]
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=err, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _die_with_parent(parent_pid: int) -> Any:
    """For Popen's preexec_fn (runs in the child between fork and exec): SIGKILL this child when
    the supervisor dies. The death signal follows the thread that forked, hence children are only
    started from the supervisor's main thread; a parent already gone before prctl ran is caught by
    the getppid check."""
    import ctypes

    def set_death_signal() -> None:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(125)
        if os.getppid() != parent_pid:
            os._exit(125)

    return set_death_signal


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def learner_args(spec_path: Path | str, resume: bool) -> list[str]:
    """The learner rank's command after the interpreter (the same under every backend)."""
    return ["-m", "async_or1.learner.loop", "--spec", str(spec_path)] + (["--resume"] if resume else [])


def generator_args(spec_path: Path | str, generator_id: int) -> list[str]:
    return ["-m", "async_or1.generation.worker", "--spec", str(spec_path), "--generator-id", str(generator_id)]


def rank_env(rank: int, world: int, master_addr: str, master_port: int, kind: str, local_rank: int,
             local_world: int) -> dict[str, str]:
    """torch.distributed's variables for learner rank ``rank`` (what torchrun would set)."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world), "MASTER_ADDR": master_addr,
           "MASTER_PORT": str(master_port), "LOCAL_WORLD_SIZE": str(local_world)}
    if kind == "cpu":
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    return env


def loopback_ifs(cfg: Any) -> dict:
    """Gloo listens on the address its host name resolves to, which may be a public interface:
    pin it to loopback when the run is local (every other socket binds transport.host)."""
    return {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"} if cfg.transport.host in ("127.0.0.1", "localhost") else {}


def generator_children(cfg: Any, spec: dict, spec_path: Path, run_dir: Path) -> list:
    """One process per generator, pinned to its device set (logs under run_dir/logs): a run's, or
    an evaluation pool's (launch_pool.py)."""
    from async_or1.launch_spec import child_env

    gens = []
    for g in range(cfg.generation.num_generators):
        env = {**child_env(cfg.generation.devices[g] if cfg.generation.devices else None, spec["device_kind"]),
               **loopback_ifs(cfg)}
        gens.append(Child(f"generator {g}", [sys.executable, *generator_args(spec_path, g)], env,
                          run_dir / "logs" / f"generator_{g}.log"))
    return gens


def make_children(cfg: Any, spec: dict, spec_path: Path, run_dir: Path, resume: bool) -> tuple[list, list]:
    from async_or1.launch_spec import child_env

    py = sys.executable
    world = max(1, len(cfg.learner.devices))
    gloo_if = loopback_ifs(cfg)
    learners = []
    for r in range(world):
        env = {**child_env(cfg.learner.devices[r] if cfg.learner.devices else None, spec["device_kind"]), **gloo_if,
               **rank_env(r, world, "127.0.0.1", spec["learner_master_port"], spec["device_kind"], r, world)}
        learners.append(Child(f"learner rank {r}", [py, *learner_args(spec_path, resume)], env,
                              run_dir / "logs" / f"learner_{r}.log", stdout_to_terminal=(r == 0)))
    return learners, generator_children(cfg, spec, spec_path, run_dir)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops the run like Ctrl-C: learners checkpoint


def take_stop_signals() -> None:
    """SIGTERM and SIGINT both raise KeyboardInterrupt in the supervising loop (both backends).

    SIGINT is set explicitly: a launcher started in the background of a non-interactive shell
    (`cmd &`, nohup, CI, batch scripts) inherits it ignored, and Python then installs no handler,
    so `kill -INT` would do nothing."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def supervise(learners: list, gens: list, max_restarts: int, grace_s: float = 600.0) -> int:
    """Run until learner rank 0 exits. Returns its exit code (or 130 on Ctrl-C / SIGTERM)."""
    take_stop_signals()
    try:
        while True:
            time.sleep(0.5)
            for ch in learners:
                rc = ch.poll()
                if rc is not None and rc != 0:
                    print(f"async-or1: {ch.name} died with exit code {rc}; stopping the run. Last log lines "
                          f"({ch.log_path}):\n{ch.tail()}\nContinue it with --resume.", file=sys.stderr)
                    _stop_all(learners, gens, grace_s)
                    return rc
            if learners[0].poll() == 0:
                for ch in learners[1:]:
                    ch.wait(60)
                for ch in gens:  # they were told to stop by the learner; give them a moment
                    if ch.wait(30) is None:
                        ch.signal(signal.SIGTERM)
                        ch.wait(10)
                return 0
            for ch in gens:
                rc = ch.poll()
                if rc is None or rc == 0:
                    continue
                if ch.restarts >= max_restarts:
                    print(f"async-or1: {ch.name} died (exit {rc}) {ch.restarts + 1} times; stopping the run. "
                          f"Last log lines ({ch.log_path}):\n{ch.tail()}", file=sys.stderr)
                    _stop_all(learners, gens, grace_s)
                    return 1
                ch.restarts += 1
                print(f"async-or1: {ch.name} died (exit {rc}); restarting it ({ch.restarts}/{max_restarts}); "
                      f"its prompts are re-issued. Log: {ch.log_path}", file=sys.stderr)
                ch.start()
    except KeyboardInterrupt:
        print(f"async-or1: interrupted; stopping (learners checkpoint first, up to learner.stop_grace_s="
              f"{grace_s:.0f} s). Continue with --resume.", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the checkpoint short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(learners, gens, grace_s)
        return 130


def _stop_all(learners: list, gens: list, grace_s: float) -> None:
    for ch in learners:
        ch.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for ch in learners:
        if ch.wait(max(0.0, deadline - time.monotonic())) is None:
            print(f"async-or1: {ch.name} still running after {grace_s:.0f} s: killed; a checkpoint it was "
                  f"writing is left as a .tmp directory, which --resume ignores", file=sys.stderr)
            ch.signal(signal.SIGKILL)
    for ch in gens:
        ch.signal(signal.SIGTERM)
    for ch in gens:
        if ch.wait(30) is None:
            ch.signal(signal.SIGKILL)


def run(cfg: Any, spec: dict, spec_path: Path, run_dir: Path, resume: bool) -> int:
    learners, gens = make_children(cfg, spec, spec_path, run_dir, resume)
    print(f"async-or1: run {run_dir}: {len(learners)} learner rank(s) on {cfg.learner.devices or 'any'}, "
          f"{len(gens)} generator(s) on {cfg.generation.devices or 'any'}, mode {cfg.mode} "
          f"(max_staleness {cfg.max_staleness}); logs in {run_dir / 'logs'}", flush=True)
    for ch in learners + gens:
        ch.start()
    return supervise(learners, gens, cfg.generation.max_restarts, cfg.learner.stop_grace_s)


