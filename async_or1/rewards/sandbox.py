"""Parent side of the code sandbox: start the harness, feed it, read its records under a hard limit.

One sandbox run = one ``python -S -I sandbox_harness.py`` process (its own session) for all tests
of one sample. The harness enforces the wall-clock and memory limits itself; this side adds an
outer deadline (harness start-up + limit + margin) after which the whole session is SIGKILLed, so
even a broken harness cannot hold a caller forever. Safe to call from many threads at once.

Isolation is what the caller asks for, never less: ``"namespaces"`` (private root, no network, own
pid namespace; as root with a fresh uid, otherwise inside a user namespace) or ``"plain"`` (rlimits
and a scratch cwd only, by explicit request).
``probe(isolation)`` runs a self-check program once per process and reports what the sandbox
really gives (can a program see a host file, reach a host port, see host processes, import the
standard library?); ``require(isolation)`` raises ``SandboxUnavailable`` when that is less than
asked. A namespace set-up that fails is that error, not a quiet downgrade.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import site
import socket
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
ISOLATIONS = ("plain", "namespaces")   # weakest first
_probe_lock = threading.Lock()
_probes: dict[str, "IsolationReport"] = {}


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot give the isolation asked for: an error for the caller, never a downgrade."""


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
    # the site-packages this interpreter itself uses (a venv's own, plus the base ones with
    # --system-site-packages), so a solution sees the same packages from every install location
    dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + site.getsitepackages()
    return [p for p in dict.fromkeys(os.path.realpath(d) for d in dirs) if os.path.isdir(p)]


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
            memory_mb: int, isolation: str, output_limit: int = OUTPUT_LIMIT) -> SandboxRun:
    """Run ``code`` against ``tests`` (stdin texts, call args or assert expressions) in the sandbox.

    ``isolation`` is applied as asked or the run fails with ``setup_error``; check it first with
    ``require``."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    t0 = time.monotonic()
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


PROBE = """
import json, os
req = json.loads(input())
out = {}
try:
    with open(req["file"]) as f:
        out["file"] = f.read()
except OSError:
    out["file"] = None
try:
    import socket
    socket.create_connection(("127.0.0.1", req["port"]), timeout=2).close()
    out["net"] = True
except ImportError:
    out["net"] = None
except OSError:
    out["net"] = False
try:
    with open("/proc/%d/stat" % req["pid"]) as f:
        out["pid"] = f.read().rsplit(")", 1)[1].split()[19]
except (OSError, IndexError):
    out["pid"] = None
try:
    import dataclasses, decimal, fractions, statistics
    @dataclasses.dataclass
    class P:
        x: fractions.Fraction
    out["stdlib"] = str(P(fractions.Fraction(1, 3)).x + fractions.Fraction(statistics.median([1, 2]))) == "11/6"
except Exception as e:
    out["stdlib"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class IsolationReport:
    """What the sandbox really gives, measured by running ``PROBE`` in it."""
    requested: str
    applied: str = ""                       # the harness's own account (mode, uid, rlimits)
    host_file_visible: bool | None = None   # could it read a world-readable file of the host?
    network_reachable: bool | None = None   # could it connect to a port on the host's loopback?
    host_processes_visible: bool | None = None  # could it see this process in /proc?
    stdlib: str = ""                        # "ok" or why importing fractions/dataclasses/... failed
    error: str | None = None                # the sandbox could not run the probe at all

    def shortfall(self) -> str | None:
        """Why this is less than ``requested`` (None when it is not)."""
        if self.error:
            return self.error
        if self.stdlib != "ok":
            return f"the sandboxed program cannot use the standard library ({self.stdlib}): correct programs would fail"
        if self.requested == "namespaces":
            leaks = [what for what, bad in (("a host file", self.host_file_visible),
                                            ("the host network", self.network_reachable),
                                            ("host processes", self.host_processes_visible)) if bad is not False]
            if leaks:
                return "the sandboxed program can reach " + ", ".join(leaks)
        return None

    def summary(self) -> str:
        if self.error:
            return f"{self.requested}: UNAVAILABLE ({self.error})"
        yes_no = (lambda v, yes, no: "unknown " + yes if v is None else (yes.upper() if v else no))
        return (f"{self.requested}: host files {yes_no(self.host_file_visible, 'visible', 'hidden')}, network "
                f"{yes_no(self.network_reachable, 'reachable', 'unreachable')}, host processes "
                f"{yes_no(self.host_processes_visible, 'visible', 'hidden')}, stdlib "
                f"{'readable' if self.stdlib == 'ok' else 'BROKEN: ' + self.stdlib} [{self.applied}]")


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _run_probe(isolation: str) -> IsolationReport:
    token = f"async-or1-probe-{os.urandom(8).hex()}"
    probe_dir = tempfile.mkdtemp(prefix="async-or1-probe-")
    listener = socket.socket()
    try:
        os.chmod(probe_dir, 0o755)  # as readable as a data set or a home directory usually is
        marker = os.path.join(probe_dir, "host-file")
        with open(marker, "w") as f:
            f.write(token)
        os.chmod(marker, 0o644)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stdin = json.dumps({"file": marker, "port": listener.getsockname()[1], "pid": os.getpid()})
        run = execute(PROBE, "stdio", [{"stdin": stdin}], timeout_s=10.0, memory_mb=1024, isolation=isolation)
    finally:
        listener.close()
        shutil.rmtree(probe_dir, ignore_errors=True)
    rec = run.tests[0]
    if run.setup_error or not run.ready or rec is None or rec.get("status") != "ok":
        why = run.setup_error or (rec or {}).get("err") or run.module_error or run.stderr.strip()[-300:] \
            or str(run.end) or "no result"
        return IsolationReport(isolation, applied=run.isolation, error=f"{isolation} sandbox failed: {why}")
    try:
        got = json.loads(rec["out"])
    except (ValueError, TypeError):
        return IsolationReport(isolation, applied=run.isolation, error=f"unreadable probe output {rec['out'][:200]!r}")
    mine = _start_time(os.getpid())
    return IsolationReport(isolation, applied=run.isolation, host_file_visible=got.get("file") == token,
                           network_reachable=got.get("net"),
                           host_processes_visible=got.get("pid") is not None and got.get("pid") == mine,
                           stdlib="ok" if got.get("stdlib") is True else str(got.get("stdlib")))


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to ``path`` that other users cannot traverse, if any."""
    parts = os.path.realpath(path).split("/")
    for k in range(2, len(parts) + 1):
        d = "/".join(parts[:k])
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return d
    return None


def probe(isolation: str = "namespaces") -> IsolationReport:
    """The isolation the sandbox really gives when asked for ``isolation`` (measured once per process)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    with _probe_lock:
        if isolation not in _probes:
            _probes[isolation] = _run_probe(isolation)
            log.info("code sandbox: %s", _probes[isolation].summary())
        return _probes[isolation]


def require(isolation: str = "namespaces") -> IsolationReport:
    """``probe(isolation)``, or ``SandboxUnavailable`` saying why the sandbox gives less."""
    report = probe(isolation)
    why = report.shortfall()
    if why is not None:
        closed = _closed_ancestor(_ro_paths()[0]) if os.geteuid() == 0 and report.stdlib != "ok" else None
        if closed:
            hint = (f"{closed} is not searchable by other users, and the sandboxed program runs as another uid: "
                    f"`chmod o+x {closed}`, or install Python elsewhere")
        elif isolation == "namespaces":
            hint = ("namespaces need root, or, for other users, unprivileged user namespaces (sysctls "
                    "user.max_user_namespaces, kernel.unprivileged_userns_clone, and on Ubuntu "
                    "kernel.apparmor_restrict_unprivileged_userns); a container's seccomp profile can also block unshare")
        else:
            hint = "nothing ran"
        if isolation == "namespaces":
            hint += (". To run untrusted code with rlimits only, ask for that explicitly "
                     "(rewards.code_isolation=plain, or --isolation plain)")
        raise SandboxUnavailable(f"code sandbox: asked for {isolation} isolation, but {why}. {hint}.")
    return report
