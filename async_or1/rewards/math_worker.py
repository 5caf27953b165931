"""The math worker process: reads framed requests on stdin, answers framed verdicts on stdout.

Started by ``rewards.math_workers`` as ``python -c <bootstrap>``. It runs math-verify with its
signal timeouts disabled; the parent enforces the hard limit by SIGKILLing this process. Protocol:

    parent -> worker  {"id": int, "response": str, "gold": [str], "require_think": bool}
    worker -> parent  {"ready": true}  once, after imports
                      {"id": int, "correct": bool, "reason": str}  per request
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

from async_or1.rewards.framing import encode_frame, read_frame_blocking, write_all

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    # a worker stuck in a huge sympy computation must not outlive a SIGKILLed generator
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        limit = memory_mb << 20
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass


def serve(in_fd: int, out_fd: int) -> None:
    from async_or1.rewards.math import verify_math

    write_all(out_fd, encode_frame({"ready": True}))
    while True:
        req = read_frame_blocking(in_fd)
        if req is None:  # parent closed the pipe or died: nothing left to do
            return
        try:
            ok, reason = verify_math(req["response"], req["gold"], req.get("require_think", True))
        except MemoryError:
            ok, reason = False, "memory limit during verification"
        except RecursionError:
            ok, reason = False, "recursion limit during verification"
        except Exception as e:  # one bad sample never affects another: report and go on
            ok, reason = False, f"verifier error: {type(e).__name__}: {str(e)[:200]}"
        write_all(out_fd, encode_frame({"id": req["id"], "correct": bool(ok), "reason": reason}))


def main() -> None:
    parent_pid, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    _die_with_parent(parent_pid)
    # keep the protocol channel private: anything printed by sympy/math-verify goes to stderr
    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        import math_verify  # noqa: F401  (import before the memory limit: import maps large areas)
    except Exception as e:
        write_all(out_fd, encode_frame({"ready": False, "error": f"cannot import math_verify: {e}"}))
        return
    _limit_memory(memory_mb)
    serve(0, out_fd)
