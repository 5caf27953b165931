"""Inside the sandbox: isolation set-up, then the tests (loaded by sandbox_harness; stdlib only).

The child never receives expected outputs: it gets the code, the stdin texts / call arguments /
assert expressions, and reports what the program did (stdout text, or the returned value as plain
JSON) in one record per test. Comparison happens in the parent. Record kinds on the results fd:
``ready`` (with the isolation applied), ``setup`` (module-level failure), ``test``, ``done``.

The solution runs as a module of its own (registered in ``sys.modules``) whose ``__builtins__`` are
Python's plus the prelude's names. Its namespace therefore holds exactly what the solution binds,
and only those names may be tested: a prelude function (``operator.add`` for ``fn_name: add``)
never stands in for a missing solution.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
import signal
import sys
import threading
import time
import types

from _async_or1_sandbox_isolation import apply_limits, drop_privileges, enter_namespace_root, plain_setup

PRELUDE = (  # what the LiveCodeBench / Skywork harness prepends to every solution
    "from typing import *\nfrom functools import *\nfrom collections import *\nfrom itertools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom string import *\nfrom operator import *\n"
    "from math import *\nimport math, sys, os, re, datetime, random, heapq, bisect, collections, itertools, "
    "functools, string\ninf = float('inf')\n")
# Module names the prelude imports whole: tests may use them (``assert math.isclose(f(1), 0.5)``).
PRELUDE_MODULES = frozenset({"math", "sys", "os", "re", "datetime", "random", "heapq", "bisect", "collections",
                             "itertools", "functools", "string"})
_MAX_DEPTH = 200
_MAX_ERR = 300


_OWNER = {"pid": -1}
_real_exit = os._exit


def emit(fd: int, rec: dict) -> None:
    if os.getpid() != _OWNER["pid"]:  # a fork of the program unwound into harness code: end it here
        _real_exit(0)
    view = memoryview((json.dumps(rec) + "\n").encode())
    while view:
        view = view[os.write(fd, view):]


def _err(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"[:_MAX_ERR]
    except BaseException:  # a hostile __str__
        return type(e).__name__[:_MAX_ERR]


def plain(x, depth: int = 0):
    """A JSON-ready copy built with the base types' own methods (no user __eq__/__iter__ runs)."""
    if depth > _MAX_DEPTH:
        raise ValueError("returned value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str or t is int or t is float:
        return x
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, int):
        return int.__index__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, list):
        return [plain(v, depth + 1) for v in list.__iter__(x)]
    if isinstance(x, tuple):
        return [plain(v, depth + 1) for v in tuple.__iter__(x)]
    if isinstance(x, dict):
        out = {}
        for k, v in dict.items(x):
            if type(k) is not str:
                raise TypeError(f"dict key of type {type(k).__name__} is not comparable to JSON output")
            out[k] = plain(v, depth + 1)
        return out
    if getattr(t, "__module__", "") == "numpy" and hasattr(x, "tolist"):
        return plain(x.tolist(), depth + 1)
    raise TypeError(f"returned a {t.__name__}, which cannot be compared to JSON output")


def _text_streams(in_fd: int, out_fd: int):
    sin = io.TextIOWrapper(io.BufferedReader(io.FileIO(in_fd, "r", closefd=False)), encoding="utf-8",
                           errors="replace")
    sout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(out_fd, "w", closefd=False)), encoding="utf-8",
                            errors="replace")
    sys.stdin = sys.__stdin__ = sin
    sys.stdout = sys.__stdout__ = sout
    return sout


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _install(fd: int, target: int) -> None:
    if fd != target:  # the program may have closed ``target`` (``open(0)`` garbage-collected)
        os.dup2(fd, target)
        os.close(fd)


def run_stdio(compiled, builtins_ns: dict, stdin_text: str, limit: int) -> dict:
    _install(_memfd("stdin", stdin_text.encode("utf-8", "surrogateescape")), 0)
    _install(_memfd("stdout"), 1)
    sout = _text_streams(0, 1)
    status, err = "ok", None
    _, e = solution_module(compiled, builtins_ns, "__main__")  # a fresh module per test, as a fresh process
    _join_threads()
    if isinstance(e, SystemExit):
        if e.code not in (None, 0):
            status, err = "error", f"exit status {e.code!r}"[:_MAX_ERR]
    elif e is not None:
        status, err = "error", _err(e)
    for stream in (sout, sys.stdout):
        try:
            stream.flush()
        except BaseException as e:
            status, err = "error", "output limit exceeded" if isinstance(e, OSError) else _err(e)
    os.lseek(1, 0, os.SEEK_SET)
    data = os.read(1, limit + 1)
    if len(data) > limit:
        status, err, data = "error", "output limit exceeded", data[:limit]
    return {"status": status, "err": err, "out": data.decode("utf-8", "replace")}


def _join_threads() -> None:
    """Wait for the program's non-daemon threads, as interpreter shutdown would: the usual way to get
    a deeper stack, ``threading.stack_size(…); Thread(target=main).start()``, prints from that thread
    after the module has returned. A thread that never ends runs into the wall-clock limit."""
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            try:
                t.join()
            except RuntimeError:  # not started yet
                pass


def _value_record(fn, limit: int) -> dict:
    try:
        value = plain(fn())
        text = json.dumps(value)
    except BaseException as e:
        return {"status": "error", "err": _err(e)}
    if len(text) > limit:
        return {"status": "error", "err": "returned value exceeds the output limit"}
    return {"status": "ok", "value": value}


def solution_module(compiled, builtins_ns: dict, name: str) -> tuple[types.ModuleType, BaseException | None]:
    """Run the solution as a real module registered in ``sys.modules`` under ``name``.

    Registration matters: ``dataclasses``, ``typing`` and pickle look the class's module up there
    (``sys.modules[cls.__module__].__dict__``). The prelude is reached through the module's
    ``__builtins__``, so the module's own dict holds exactly the names the solution binds."""
    mod = types.ModuleType(name)
    mod.__dict__["__builtins__"] = builtins_ns
    sys.modules[name] = mod
    try:
        exec(compiled, mod.__dict__)
    except BaseException as e:
        return mod, e
    return mod, None


def _load_module(compiled, builtins_ns: dict, res_fd: int) -> dict | None:
    # a main block reading stdin must not run for these tests
    mod, err = solution_module(compiled, builtins_ns, "__sandbox_solution__")
    if err is not None:
        emit(res_fd, {"t": "setup", "err": _err(err)})
        return None
    return mod.__dict__


def _soft_exit(code: int = 0) -> None:
    # ``print(ans); os._exit(0)`` is a common fast exit: let the harness still record the output.
    # A program that reaches the real _exit (posix._exit) simply ends without its records.
    if os.getpid() != _OWNER["pid"]:
        _real_exit(code)
    raise SystemExit(code)


def prelude_builtins() -> dict:
    """Python's builtins (with ``exit``/``quit``) plus the prelude's names, Python's winning where they clash.

    The prelude star-imports ``operator`` and ``math``, whose ``pow`` (2 arguments, float) and
    ``abs`` would otherwise shadow the builtins: ``pow(b, e, mod)`` must work as in plain Python."""
    ns: dict = {"__builtins__": builtins}
    exec(PRELUDE, ns)
    del ns["__builtins__"]
    # ``exit()`` / ``quit()`` come from the site module, which ``python -S`` leaves out; solutions
    # call them after printing their answer
    return {**ns, "exit": _exit_builtin, "quit": _exit_builtin, **builtins.__dict__}


def _exit_builtin(code=None):
    raise SystemExit(code)


_PYTHON_BUILTINS = frozenset(dir(builtins))


def names_tests_need(sources: list[str]) -> list[str]:
    """Names the test code reads without binding them that neither Python nor the prelude's whole-module
    imports provide: the solution must define each one itself (``assert add(1, 2) == 3`` needs ``add``)."""
    need: dict[str, None] = {}
    for src in sources:
        tree = ast.parse(src)
        bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
        bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.Lambda) for a in n.args.args}
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in bound \
                    and n.id not in _PYTHON_BUILTINS and n.id not in PRELUDE_MODULES:
                need[n.id] = None
    return list(need)


def _call_target(g: dict, fn_name: str):
    """The solution's own ``Solution().fn_name`` or ``fn_name``; never a prelude or builtin name."""
    sol = g.get("Solution")
    if isinstance(sol, type) and fn_name in dir(sol):
        return lambda args: getattr(sol(), fn_name)(*args)
    fn = g.get(fn_name)
    if callable(fn):
        return lambda args: fn(*args)
    return None


def run_tests(req: dict, res_fd: int, builtins_ns: dict) -> None:
    limit, tests = int(req["output_limit"]), req["tests"]
    os._exit = _soft_exit
    compiled = compile(req["code"], "<solution>", "exec")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8")
    mode = req["mode"]
    g = None
    if mode != "stdio":
        os.dup2(null, 0)
        os.dup2(null, 1)
        _text_streams(0, 1)
        g = _load_module(compiled, builtins_ns, res_fd)
        if g is None:
            return
    fn_name = req.get("fn_name")
    target = _call_target(g, fn_name) if mode == "call" else None
    for i, t in enumerate(tests):
        t0 = time.perf_counter()
        missing = [] if mode != "assert" else \
            [n for n in names_tests_need([t.get("expr") or t["stmt"]]) if n not in g]
        if mode == "stdio":
            rec = run_stdio(compiled, builtins_ns, t["stdin"], limit)
        elif mode == "call":
            rec = _value_record(lambda: target(t["args"]), limit) if target is not None else \
                {"status": "error", "err": f"the solution defines no function or Solution method named {fn_name!r}"}
        elif missing:
            rec = {"status": "error", "err": f"the solution does not define {missing[0]!r}"[:_MAX_ERR]}
        elif "expr" in t:
            code = compile(t["expr"], f"<test {i}>", "eval")
            rec = _value_record(lambda: eval(code, g), limit)
        else:
            try:
                exec(compile(t["stmt"], f"<test {i}>", "exec"), g)
                rec = {"status": "ok"}
            except BaseException as e:
                rec = {"status": "error", "err": _err(e)}
        rec.update(t="test", i=i, sec=round(time.perf_counter() - t0, 6))
        emit(res_fd, rec)


def child_main(req: dict, ns: bool, ready_fd: int, supervisor: int, libc) -> None:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG for the set-up too (the uid change clears it)
    if ns:
        # a process group of its own: in a user namespace the program has the supervisor's uid, and
        # kill(0, SIGKILL) would otherwise reach the supervisor, which sits outside the pid namespace
        os.setsid()
    res_fd = os.dup(1)
    while res_fd < 100:  # out of the way of the fds a program expects (0-2) and of its first files
        res_fd = os.dup2(res_fd, res_fd + 100)
    os.set_inheritable(res_fd, False)
    for p in req.get("sys_path", []):
        if p not in sys.path:
            sys.path.append(p)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG instead
    if ns:
        note = enter_namespace_root(req, libc)
    else:
        note = plain_setup(req)
    builtins_ns = prelude_builtins()  # imported while the python prefix is surely readable
    apply_limits(req)
    note += drop_privileges(req, libc, supervisor, ns)
    sys.argv = ["solution.py"]  # as if run as a script (fileinput and argparse read argv)
    os.environ.clear()
    os.environ.update({"HOME": os.getcwd(), "TMPDIR": os.getcwd(), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                       "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    _OWNER["pid"] = os.getpid()
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    emit(res_fd, {"t": "ready", "isolation": note})
    try:
        run_tests(req, res_fd, builtins_ns)
    except BaseException as e:
        emit(res_fd, {"t": "setup", "err": _err(e)})
    emit(res_fd, {"t": "done"})
    _real_exit(0)  # no interpreter teardown: user atexit handlers and threads never run past here
