"""Sandbox supervisor, run as ``python -S -I sandbox_harness.py PARENT_PID`` (stdlib only).

Reads one JSON request on stdin, then:

  supervisor (this process, root or the caller's uid, trusted, never runs solution code)
    - dies with its parent (PR_SET_PDEATHSIG) and adopts orphans (PR_SET_CHILD_SUBREAPER), so
      double-forked / setsid'ed descendants can still be found and killed;
    - isolation "namespaces": unshare(NEWNS|NEWNET|NEWPID|NEWIPC, plus NEWUSER when not root), then
      fork -> the child is pid 1 of a fresh pid namespace: when it dies the kernel kills every
      process left inside;
    - enforces the wall-clock limit (started when the child says it is ready) and a memory limit on
      the whole process tree (RSS sum, polled), kills the tree, and appends an "end" record.
  child (sandbox_runner): private tmpfs root with read-only binds of /usr and the Python prefix,
    no network, rlimits, an unprivileged uid, then runs the tests and writes one record per test.

Records are JSON lines on stdout (fd 1 of this process). The parent never trusts the exit code:
a test passes only through its own record, compared in the parent.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
START_TIMEOUT_S = 30.0
POLL_S = 0.02
_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


def emit(fd: int, rec: dict) -> None:
    data = (json.dumps(rec) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _proc_pids(proc_root: str) -> list[int]:
    try:
        return [int(p) for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return []


def _descendants(root_pid: int) -> list[int]:
    """Host pids below root_pid (scan of /proc: CONFIG_PROC_CHILDREN is not always there)."""
    parent_of: dict[int, int] = {}
    for pid in _proc_pids("/proc"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            parent_of[pid] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], list(children.get(root_pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _rss_bytes(proc_root: str, pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"{proc_root}/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree(child: int) -> None:
    """SIGKILL the child and every descendant (this process is their subreaper), until none is left."""
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(500):
        pids = _descendants(os.getpid())
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
        _reap()


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"


def supervise(child: int, ready_fd: int, req: dict, ns: bool) -> None:
    timeout_s, mem_limit = float(req["timeout_s"]), int(req["memory_mb"]) << 20
    proc_root = os.path.join(req["scratch"], "proc") if ns else "/proc"
    start_deadline, deadline, why, status = time.monotonic() + START_TIMEOUT_S, None, "exit", None
    peak, ticks = 0, 0
    try:  # readable when the child exits: no polling delay at the end of a short run
        exit_fd = os.pidfd_open(child)
    except (AttributeError, OSError):
        exit_fd = -1
    while True:
        pid, st = os.waitpid(child, os.WNOHANG)
        if pid:
            status = st
            break
        fds = [fd for fd in (ready_fd if deadline is None else -1, exit_fd) if fd >= 0]
        readable = select.select(fds, [], [], POLL_S)[0] if fds else time.sleep(POLL_S) or []
        if ready_fd in readable and deadline is None:
            if os.read(ready_fd, 8):
                deadline = time.monotonic() + timeout_s
            else:  # the child exited or failed before it was ready
                os.close(ready_fd)
                ready_fd = -1
        now = time.monotonic()
        if deadline is None and now > start_deadline:
            why = "startup timeout"
            break
        if deadline is not None and now > deadline:
            why = "timeout"
            break
        ticks += 1
        if ns or ticks % 3 == 0:  # a /proc scan in the no-namespace fallback costs more: poll less
            pids = _proc_pids(proc_root) if ns else [child] + _descendants(child)
            rss = _rss_bytes(proc_root, pids)
            peak = max(peak, rss)
            if rss > mem_limit:
                why = "memory limit"
                break
    if status is None:
        try:
            os.kill(child, signal.SIGKILL)
            _, status = os.waitpid(child, 0)
        except (ProcessLookupError, ChildProcessError):
            status = 0
    kill_tree(child)
    emit(1, {"t": "end", "why": why, "status": _status_text(status), "peak_rss_mb": peak >> 20})


def _load(name: str, filename: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_runner():
    # by file path, before any chroot: the repository is not visible inside, and -I -S keep
    # async_or1 itself off sys.path
    _load("_async_or1_sandbox_isolation", "sandbox_isolation.py")
    return _load("_async_or1_sandbox_runner", "sandbox_runner.py")


def enter_namespaces() -> None:
    """New mount, network, pid and IPC namespaces. A user other than root also gets a new user
    namespace in which only its own uid and gid are mapped (to the same numbers), so the set-up has
    the capabilities it needs there and the program, which drops them, runs as that user."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare{' (with a user namespace)' if flags & CLONE_NEWUSER else ''}: {os.strerror(e)}")
    if flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def main() -> None:
    parent = int(sys.argv[1])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    req = json.loads(sys.stdin.buffer.read())
    runner = _load_runner()
    ns = req["isolation"] == "namespaces"
    try:
        if ns:
            enter_namespaces()
    except OSError as e:
        emit(1, {"t": "setup-error", "err": str(e)})
        emit(1, {"t": "end", "why": "setup", "status": "not started", "peak_rss_mb": 0})
        return
    ready_r, ready_w = os.pipe()
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        try:
            runner.child_main(req, ns, ready_w, supervisor, _libc)
        except BaseException as e:  # setup failed before any solution code ran
            try:
                emit(1, {"t": "setup-error", "err": f"{type(e).__name__}: {e}"[:500]})
            finally:
                os._exit(3)
        os._exit(0)
    os.close(ready_w)
    supervise(pid, ready_r, req, ns)


if __name__ == "__main__":
    main()
