"""Hostile programs in the code sandbox: each scores 0 (or is harmless) and leaves nothing behind.

All hostile programs run once, two at a time, in a module fixture; each test then checks its
verdict. The last tests check the machine afterwards: no process of a sandbox uid, no stray child
of this process, no file written outside the scratch dirs, no connection to a local listener.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from async_or1.rewards.code import prepare_tests, run_code, score_run
from async_or1.rewards.sandbox import UID_BASE, execute, probe

TAG = uuid.uuid4().hex
SECRET = f"secret-{uuid.uuid4().hex}"          # an expected output that must never leak
STDIO = {"inputs": [f"{TAG}\n"], "outputs": [SECRET]}
CALL = {"fn_name": "f", "inputs": [[1]], "outputs": [SECRET]}
OUTSIDE = [f"/tmp/{TAG}-w", f"/var/tmp/{TAG}-w", f"/dev/shm/{TAG}-w", f"/{TAG}-w", f"/root/{TAG}-w",
           os.path.join(os.getcwd(), f"{TAG}-w"), os.path.join(tempfile.gettempdir(), f"{TAG}-w2")]

SEARCH = """
import os, re
marker = input().strip()
found = []
# breadth first, shallow before deep, as a patient attacker would: a crowded /tmp (clones, caches)
# must not hide a file two levels down behind a deep walk
level = [r for r in ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/work") if os.path.isdir(r)]
for depth in range(6):
    nxt = []
    for d in level:
        try:
            entries = list(os.scandir(d))
        except Exception:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if e.name not in (".git", "__pycache__", ".pyenv", "site-packages", ".venv"):
                        nxt.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    with open(e.path, "rb") as fh:
                        data = fh.read(1 << 20)
                    if marker.encode() in data and b"secret-" in data:
                        found += re.findall(rb"secret-[0-9a-f]{32}", data)
            except Exception:
                continue
    if found:
        break
    level = nxt
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for part in ("cmdline", "environ"):
        try:
            data = open(f"/proc/{pid}/{part}", "rb").read()
        except Exception:
            continue
        found += re.findall(rb"secret-[0-9a-f]{32}", data)
print(found[0].decode() if found else "nothing found")
"""

PROGRAMS = {
    "infinite_loop": ("while True:\n    pass", STDIO),
    "ignores_signals": ("import signal, time\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGXCPU, "
                        "signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\nsignal.alarm(1)\n"
                        "while True:\n    time.sleep(0.01)", STDIO),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", STDIO),
    "thread_bomb": ("import threading, time\nwhile True:\n    try:\n        threading.Thread(target=time.sleep, "
                    "args=(60,)).start()\n    except Exception:\n        pass", STDIO),
    "allocates_8gb": ("x = bytearray(8 << 30)\nprint(len(x))", STDIO),
    "allocates_list": ("x = [0] * (2 * 10**9)\nprint(len(x))", STDIO),
    "huge_output": ("import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)", STDIO),
    "posix_exit_first": ("import posix\nposix._exit(0)", STDIO),
    "os_exit_in_module": ("import os\nos._exit(0)\ndef f(x):\n    return 1", CALL),
    "sys_exit_first": ("import sys\nsys.exit(0)", STDIO),
    "always_equal": ("class Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                     "def f(x):\n    return Eq()", CALL),
    "int_subclass_eq": ("class I(int):\n    def __eq__(self, o):\n        return True\n"
                        "def f(x):\n    return I(7)", CALL),
    "always_equal_assert": ("class Eq:\n    def __eq__(self, o):\n        return True\n"
                            "def f(x):\n    return Eq()", [f"assert f(1) == '{SECRET}'"]),
    "searches_for_expected": (SEARCH, STDIO),
    "writes_outside": ("import os\nfor p in " + repr(OUTSIDE) + ":\n    try:\n        open(p, 'w').write('x')\n"
                       "    except Exception:\n        pass\nprint('done')", STDIO),
    "kills_parent_and_group": ("import os, signal\nfor f in (lambda: os.kill(os.getppid(), 9), lambda: os.killpg(0, 9),"
                               " lambda: os.kill(-1, 9), lambda: os.kill(1, 9)):\n    try:\n        f()\n"
                               "    except Exception:\n        pass\nprint('alive')", STDIO),
    "escapes_with_setsid": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                            "        time.sleep(300)\n    os._exit(0)\nprint('x')", STDIO),
}


# Where namespaces cannot be had (no root and no user namespaces) these run in plain mode, asked for
# explicitly: no file-system or network isolation, and this user's uid (kill(-1) would end this test
# run), so the programs that test those are not run there, and the results must say so loudly.
NS = probe("namespaces").shortfall() is None
ISOLATION = "namespaces" if NS else "plain"
NEEDS_NS = ("searches_for_expected", "writes_outside", "kills_parent_and_group", "connects_to_local_port")
if not NS:
    for _name in NEEDS_NS:
        PROGRAMS.pop(_name, None)


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def secret_file():
    # a world-readable copy of the "data set" with the expected output, where a program could look
    d = tempfile.mkdtemp(prefix="async-or1-test-secret-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "rows.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"id": 1, "tests": STDIO}) + "\n")
    os.chmod(path, 0o644)
    yield path
    os.remove(path)
    os.rmdir(d)


@pytest.fixture(scope="module")
def results(listener, secret_file):
    port = listener.getsockname()[1]
    programs = dict(PROGRAMS)
    if NS:
        programs["connects_to_local_port"] = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'pwned')\n"
            "    print('connected')\nexcept Exception as e:\n    print('blocked', type(e).__name__)", STDIO)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "async-or1-sandbox-*")))
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        futs = {name: ex.submit(run_code, f"</think>\n```python\n{code}\n```", tests, timeout_s=1.5, memory_mb=1024,
                                isolation=ISOLATION)
                for name, (code, tests) in programs.items()}
        out = {name: f.result() for name, f in futs.items()}
    out["_elapsed"] = time.monotonic() - t0
    out["_before"] = before
    return out


@pytest.mark.parametrize("name", sorted(PROGRAMS) + (["connects_to_local_port"] if NS else []))
def test_hostile_program_scores_zero(results, name):
    r = results[name]
    assert r["passed"] is False and r["passed_tests"] == 0, r
    assert r["total_tests"] == 1
    assert r["seconds"] < 1.5 + 5.0, r  # limit + start-up; nobody holds the caller


def test_hostile_runs_record_the_isolation_applied(results):
    want = "namespaces (net, mount, pid, ipc)" if NS else "NO namespaces"
    assert all(want in results[n]["isolation"] for n in PROGRAMS), {n: results[n]["isolation"] for n in PROGRAMS}
    assert results["_elapsed"] < 40


def test_specific_failure_reasons(results):
    assert "timeout" in results["infinite_loop"]["reason"]
    assert "timeout" in results["ignores_signals"]["reason"]
    assert "MemoryError" in results["allocates_8gb"]["reason"]
    assert "output limit" in results["huge_output"]["reason"]
    assert "program ended before reporting" in results["posix_exit_first"]["reason"]
    assert "cannot be compared" in results["always_equal"]["reason"]
    assert "wrong output" in results["int_subclass_eq"]["reason"]
    for name in [n for n in NEEDS_NS if n in results]:
        assert "wrong output" in results[name]["reason"], (name, results[name])  # ran to the end, found nothing


def test_nothing_left_behind(results):
    time.sleep(0.2)
    strays = [p.info for p in psutil.process_iter(["pid", "uids", "name"])
              if p.info["uids"] and p.info["uids"].real >= UID_BASE]
    assert strays == []
    children = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not [c for c in children if "sandbox_harness" in " ".join(c.cmdline())]
    for path in OUTSIDE:
        assert not os.path.exists(path), path
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "async-or1-sandbox-*")))
    assert after <= results["_before"]  # every scratch dir was removed


def test_no_connection_reached_the_listener(results, listener):
    with pytest.raises(socket.timeout):
        listener.accept()


def test_process_limit_really_bounds_a_fork_bomb():
    code = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n    n += 1\nprint(n)")
    run = execute(code, "stdio", [{"stdin": ""}], timeout_s=5, memory_mb=512, isolation=ISOLATION)
    assert run.tests[0] is not None and run.tests[0]["status"] == "ok", run
    # as root: RLIMIT_NPROC (32) of the fresh sandbox uid; otherwise the user's tasks + 32
    assert 0 < int(run.tests[0]["out"]) < (32 if os.geteuid() == 0 else 64)


def test_memory_limit_covers_the_whole_process_tree():
    # each process stays under the address-space limit; together they exceed memory_mb
    code = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        b = bytearray(700 << 20)\n"
            "        time.sleep(20)\n        os._exit(0)\ntime.sleep(20)\nprint('survived')")
    run = execute(code, "stdio", [{"stdin": ""}], timeout_s=10, memory_mb=1024, isolation=ISOLATION)
    assert run.end["why"] == "memory limit", run.end
    assert run.seconds < 8 and run.end["peak_rss_mb"] < 2500


def test_search_finds_the_secret_without_namespaces(secret_file):
    # proof that the search program works: in plain mode the world-readable data file is visible
    # (documented weakness of the fallback), so its zero above comes from the isolation
    mode, tests, expected, _ = prepare_tests(STDIO)
    run = execute(SEARCH, mode, tests, timeout_s=20, memory_mb=1024, isolation="plain")
    assert run.tests[0] is not None, run
    assert run.tests[0]["out"].strip() == SECRET
    assert score_run(mode, tests, expected, run)[0] == 1
