"""Parent side of the code sandbox: start the harness, feed it, read its records under a hard limit.

One sandbox run = one ``python -S -I sandbox_harness.py`` process (its own session) for all tests
of one sample. The harness enforces the wall-clock and memory limits itself; this side adds an
outer deadline (harness start-up + limit + margin) after which the whole session is SIGKILLed, so
even a broken harness cannot hold a caller forever. Safe to call from many threads at once.

Isolation is probed once per process (``isolation_mode``): namespaces when running as root and
``unshare`` works, else a loud warning and the plain mode (rlimits + scratch cwd only). Set
``ASYNC_OR1_SANDBOX_ISOLATION=ns|plain`` to force one.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("async_or1.rewards.sandbox")
HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")
OUTPUT_LIMIT = 16 << 20   # bytes of stdout (or JSON of a returned value) per test
SCRATCH_MB = 64           # size of the private tmpfs (cwd, HOME, /tmp) in namespace mode
NPROC = 32                # processes + threads of the sandbox uid
UID_BASE = 100_000        # sandbox uids: UID_BASE + (pid % 4096) * 64 + slot, one per concurrent run
START_GRACE_S = 30.0
_STDERR_KEEP = 64 << 10

_slot_lock = threading.Lock()
_busy_slots: set[int] = set()
_mode_lock = threading.Lock()
_mode: str | None = None


@dataclass
class SandboxRun:
    tests: list[dict | None]          # one record per test, None where the program never reported
    isolation: str = ""
    ready: bool = False
    module_error: str | None = None   # the solution failed at import time (call/assert tests)
    setup_error: str | None = None    # the sandbox itself failed before running the program
    corrupt: str | None = None        # the result channel was tampered with or overflowed
    end: dict = field(default_factory=dict)
    stderr: str = ""
    seconds: float = 0.0


def _acquire_slot() -> int:
    with _slot_lock:
        slot = next((s for s in range(64) if s not in _busy_slots), 63)
        _busy_slots.add(slot)
        return slot


def _release_slot(slot: int) -> None:
    with _slot_lock:
        _busy_slots.discard(slot)


def _ro_paths() -> list[str]:
    paths = [sys.base_prefix, sys.prefix]
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.append(sysconfig.get_paths()[key])
    return list(dict.fromkeys(os.path.realpath(p) for p in paths))


def _sys_path() -> list[str]:
    return list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))


def _parse(run: SandboxRun, line: bytes, n_tests: int) -> None:
    try:
        rec = json.loads(line)
        kind = rec["t"]
    except (ValueError, TypeError, KeyError):
        run.corrupt = run.corrupt or "unparsable record on the result channel"
        return
    if kind == "ready":
        run.ready, run.isolation = True, str(rec.get("isolation", ""))
    elif kind == "setup-error":
        run.setup_error = str(rec.get("err"))
    elif kind == "setup":
        run.module_error = str(rec.get("err"))
    elif kind == "test":
        i = rec.get("i")
        expected_next = next((k for k, r in enumerate(run.tests) if r is None), n_tests)
        if not isinstance(i, int) or i != expected_next:
            run.corrupt = run.corrupt or f"test record {i!r} out of order (expected {expected_next})"
        else:
            run.tests[i] = rec
    elif kind == "end":
        if run.end:
            run.corrupt = run.corrupt or "two end records"
        run.end = rec
    elif kind != "done":
        run.corrupt = run.corrupt or f"unknown record kind {kind!r}"


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("sandbox harness %d did not die after SIGKILL", proc.pid)


def execute(code: str, mode: str, tests: list[dict], *, fn_name: str | None = None, timeout_s: float,
            memory_mb: int, output_limit: int = OUTPUT_LIMIT, isolation: str | None = None) -> SandboxRun:
    """Run ``code`` against ``tests`` (stdin texts, call args or assert expressions) in the sandbox."""
    t0 = time.monotonic()
    isolation = isolation or isolation_mode()
    slot = _acquire_slot()
    scratch = tempfile.mkdtemp(prefix="async-or1-sandbox-")
    biggest_input = max((len(t.get("stdin", "").encode("utf-8", "surrogateescape")) for t in tests), default=0)
    req = {"code": code, "mode": mode, "tests": tests, "fn_name": fn_name, "timeout_s": float(timeout_s),
           "memory_mb": int(memory_mb), "output_limit": int(output_limit),
           "fsize": max(int(output_limit), biggest_input) + (64 << 10), "nproc": NPROC,
           "uid": UID_BASE + (os.getpid() % 4096) * 64 + slot, "scratch": scratch, "scratch_mb": SCRATCH_MB,
           "isolation": isolation, "ro_paths": _ro_paths(), "sys_path": _sys_path()}
    run = SandboxRun(tests=[None] * len(tests))
    # \uXXXX escapes make a record up to 6x its output; beyond that the channel is being flooded
    max_bytes = min(len(tests) * (int(output_limit) * 6 + 4096), 512 << 20) + (1 << 20)
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-I", HARNESS, str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            proc.stdin.write(json.dumps(req).encode("utf-8", "surrogateescape"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        _read_records(proc, run, len(tests), t0 + START_GRACE_S + float(timeout_s) + 10.0, max_bytes)
    except OSError as e:
        run.setup_error = f"cannot start the sandbox: {e}"
    finally:
        if proc is not None:
            _kill_session(proc)
        _release_slot(slot)
        shutil.rmtree(scratch, ignore_errors=True)
    run.seconds = time.monotonic() - t0
    return run


def _read_records(proc: subprocess.Popen, run: SandboxRun, n_tests: int, deadline: float, max_bytes: int) -> None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    buf, err, total = bytearray(), bytearray(), 0
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                run.setup_error = run.setup_error or "sandbox did not finish within the outer deadline"
                return
            for key, _ in sel.select(timeout=left):
                data = os.read(key.fileobj.fileno(), 1 << 20)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == "err":
                    err += data[: max(0, _STDERR_KEEP - len(err))]
                    continue
                total += len(data)
                if total > max_bytes:
                    run.corrupt = "result channel overflow"
                    return
                buf += data
                if b"\n" not in data:
                    continue
                *lines, rest = bytes(buf).split(b"\n")
                buf = bytearray(rest)
                for line in lines:
                    if line.strip():
                        _parse(run, line, n_tests)
        if buf.strip():
            run.corrupt = run.corrupt or "truncated record on the result channel"
    finally:
        sel.close()
        run.stderr = err.decode("utf-8", "replace")


def isolation_mode() -> str:
    """'ns' or 'plain', decided once per process by a probe run (loud warning on 'plain')."""
    global _mode
    forced = os.environ.get("ASYNC_OR1_SANDBOX_ISOLATION", "")
    if forced in ("ns", "plain"):
        return forced
    with _mode_lock:
        if _mode is None:
            _mode = _probe()
        return _mode


def _probe() -> str:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        log.warning("code sandbox: not running as root, so no namespaces and no separate uid: programs run "
                    "with rlimits in a scratch dir only (no network or file-system isolation)")
        return "plain"
    run = execute("print(6*7)", "stdio", [{"stdin": ""}], timeout_s=10.0, memory_mb=1024, isolation="ns")
    rec = run.tests[0]
    if run.ready and rec is not None and rec.get("out") == "42\n":
        return "ns"
    why = run.setup_error or run.module_error or run.stderr.strip()[-300:] or str(run.end)
    log.warning("code sandbox: namespace isolation unavailable (%s); falling back to rlimits + separate uid "
                "only: no network or file-system isolation", why)
    return "plain"
