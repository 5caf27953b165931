"""Drive a real ``async-or1 train`` from outside and hurt it: start it, wait for a version, find
its processes, send them signals, and check afterwards that none is left. Used by the fault
tests (``tests/test_faults_procs.py``) and the fault benchmark (``bench/faults.py``).

A run's processes are the launcher and its descendants, recorded (pid, start time) every time
the run is looked at: children outlive a SIGKILLed launcher as orphans, so the record is what
finds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

# Small, quick and bounded: every timeout here is short enough that a hang fails a test in minutes.
BASE = {"eval.at_start_and_end": "false", "log.plots": "false", "log.tensorboard": "false",
        "rewards.workers": "1", "transport.weights_timeout_s": "60", "transport.lease_retry_s": "5",
        "buffer.wait_timeout_s": "240", "generation.max_restarts": "2", "learner.stop_grace_s": "120"}


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def alive(procs: dict[int, float]) -> list[psutil.Process]:
    """Those of ``procs`` (pid -> create time) still running: not a reused pid, not a zombie."""
    out = []
    for pid, t0 in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == t0 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class Run:
    """One `async-or1 train` of the embedded config; remembers every process it ever started."""

    def __init__(self, out: Path, name: str, config: Path = ROOT / "configs/cpu-tiny.yaml", **overrides) -> None:
        self.config = config
        self.dir = out / name
        self.args = [f"{k}={v}" for k, v in {**BASE, "name": name, "output_dir": str(out), **overrides}.items()]
        self.procs: dict[int, float] = {}  # pid -> create_time, of the launcher and all its descendants
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> Run:
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._rows0 = len(self.rows(all_launches=True))  # a resumed run appends to the same metrics
        log = (self.dir.parent / f"{self.dir.name}.launcher.log").open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "async_or1.cli", "train", "--config",
                                      str(self.config), *self.args, *extra],
                                     env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.note()
        return self

    def note(self) -> list[psutil.Process]:
        """Record the launcher's descendants now (children outlive a killed launcher as orphans)."""
        try:
            me = psutil.Process(self.proc.pid)
            family = [me] + me.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in family:
            try:
                self.procs[p.pid] = p.create_time()
            except psutil.NoSuchProcess:
                pass
        return family

    def alive(self) -> list[psutil.Process]:
        return alive(self.procs)

    def role(self, module: str) -> list[psutil.Process]:
        return [p for p in self.note() if module in " ".join(cmdline(p))]

    def rows(self, all_launches: bool = False) -> list[dict]:
        """Step rows of metrics.jsonl written by this launch (or by every launch of the run)."""
        f = self.dir / "metrics.jsonl"
        if not f.is_file():
            return []
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if not r.get("eval")]
        return rows if all_launches else rows[getattr(self, "_rows0", 0):]

    def wait_version(self, version: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.note()
            if any(r["version"] >= version for r in self.rows()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before version {version}\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"version {version} not reached within {timeout_s} s\n{self.logs()}")

    def wait(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.note()
            time.sleep(0.5)
        if self.proc.poll() is None:
            raise AssertionError(f"run did not end within {timeout_s} s\n{self.logs()}")
        return self.proc.returncode

    def logs(self, n: int = 40) -> str:
        out = ""
        for f in [self.dir.parent / f"{self.dir.name}.launcher.log", *sorted((self.dir / "logs").glob("*.log"))]:
            if f.is_file():
                out += f"\n--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:])
        return out

    def summary(self) -> dict:
        return json.loads((self.dir / "learner_summary.json").read_text())

    def kill_all(self) -> None:
        for p in self.alive():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def no_leftovers(self, within_s: float) -> list[str]:
        """Processes of the run still alive after ``within_s`` (empty when all are gone)."""
        deadline = time.monotonic() + within_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        return [f"{p.pid} {' '.join(cmdline(p))[:120]}" for p in self.alive()]
