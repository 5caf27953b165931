"""The code sandbox from the places users install the package: a venv under /tmp, a venv under $HOME,
the system interpreter (Debian's /usr/bin/python3, with the worktree on PYTHONPATH), and that
interpreter run by an unprivileged user (uid 65534 via setpriv), whose namespaces come with a user
namespace.

Each interpreter runs ``CHECK`` in a fresh process: the self-check must report namespace isolation
with nothing leaking, correct programs that import ``fractions`` and ``dataclasses`` (stdin, call
and assert layouts) must pass, so must a program that signals its parent, its process group and
every process before printing (the harness survives it), and hostile ones (reading a host file,
connecting to a host port, writing outside, an empty program named like a prelude function) must fail;
a fork bomb stops below 64 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="namespace isolation needs root")]

CHECK = r'''
import json, sys
from async_or1.rewards.code import run_code
from async_or1.rewards.sandbox import require

marker, port, outside = sys.argv[1], int(sys.argv[2]), sys.argv[3]
report = require("namespaces")
R = lambda code: "reasoning</think>\n```python\n" + code + "\n```"
run = lambda code, tests: run_code(R(code), tests, timeout_s=10, memory_mb=1024)
DC = "from dataclasses import dataclass\nfrom fractions import Fraction\n@dataclass\nclass P:\n    q: Fraction\n"
good = {
    "stdio_fractions": run(DC + "a, b = map(int, input().split())\nprint(P(Fraction(a, b)).q + Fraction(1, 3))",
                           {"inputs": ["1 2\n", "2 3\n"], "outputs": ["5/6", "1"]}),
    "call_dataclass": run(DC + "class Solution:\n    def half(self, n: int) -> str:\n        return str(P(Fraction(n, 2)).q)",
                          {"fn_name": "half", "inputs": [[3], [4]], "outputs": ["3/2", "2"]}),
    "assert_gcd": run("from math import gcd as g\ndef gcd(a, b):\n    return g(a, b)", ["assert gcd(12, 18) == 6"]),
    "pow_mod": run("print(pow(3, 200, 10**9 + 7))", {"inputs": [""], "outputs": [str(pow(3, 200, 10**9 + 7))]}),
    # hostile, but must not stop the harness from recording its output: signals to the parent, the
    # process group, every process and pid 1 stay inside the sandbox
    "kills_around": run("import os\nfor pid in (os.getppid(), 0, -1, 1):\n    try:\n        os.kill(pid, 9)\n"
                        "    except OSError:\n        pass\nprint('alive')", {"inputs": [""], "outputs": ["alive"]}),
}
bad = {
    "reads_host_file": run("print(open(%r).read())" % marker, {"inputs": [""], "outputs": [open(marker).read()]}),
    "connects": run("import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=2)\nprint('in')" % port,
                    {"inputs": [""], "outputs": ["in"]}),
    "writes_outside": run("open(%r, 'w').write('x')\nprint('ok')" % outside, {"inputs": [""], "outputs": ["ok"]}),
    "empty_add": run("pass", {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}),
}
from async_or1.rewards.sandbox import execute
FORKS = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
         "    if pid == 0:\n        time.sleep(30)\n    n += 1\nprint(n)")
forks = execute(FORKS, "stdio", [{"stdin": ""}], timeout_s=5, memory_mb=512, isolation="namespaces").tests[0]
print(json.dumps({"prefix": sys.prefix, "summary": report.summary(), "shortfall": report.shortfall(),
                  "forks": forks and forks.get("out"),
                  "good": {k: [v["passed"], v["reason"]] for k, v in good.items()},
                  "bad": {k: [v["passed"], v["reason"]] for k, v in bad.items()}}))
'''


def _venv(where: Path) -> Path:
    # --without-pip: the base interpreter's pip and setuptools (seen through --system-site-packages)
    # install the worktree, so nothing is downloaded; ensurepip's bundled setuptools lacks bdist_wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)], check=True,
                   timeout=120)
    py = where / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    return py


@pytest.fixture(scope="module")
def interpreters():
    tmp_venv = Path(tempfile.mkdtemp(prefix="async-or1-venv-", dir="/tmp"))
    home_venv = Path(tempfile.mkdtemp(prefix="async-or1-test-venv-", dir=Path.home()))
    # the rewards package imports nothing else of async_or1: a world-readable copy of it is all that
    # the unprivileged user needs (the worktree may sit under a directory closed to other users)
    shared = Path(tempfile.mkdtemp(prefix="async-or1-test-pkg-", dir="/tmp"))
    (shared / "async_or1").mkdir()
    shutil.copy(ROOT / "async_or1" / "__init__.py", shared / "async_or1")
    shutil.copytree(ROOT / "async_or1" / "rewards", shared / "async_or1" / "rewards")
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    try:
        yield {"venv under /tmp": (_venv(tmp_venv / "v"), {}, []),
               "venv under $HOME": (_venv(home_venv / "v"), {}, []),
               "system interpreter": (Path("/usr/bin/python3"), {"PYTHONPATH": str(ROOT)}, []),
               "unprivileged user": (Path("/usr/bin/python3"), {"PYTHONPATH": str(shared)},
                                     ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])}
    finally:
        for d in (tmp_venv, home_venv, shared):
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("where", ["venv under /tmp", "venv under $HOME", "system interpreter", "unprivileged user"])
def test_sandbox_from_each_install_location(interpreters, where, tmp_path):
    py, env, prefix = interpreters[where]
    # Every machine here (CI included) has both; a missing one is a broken test machine, not a pass.
    assert py.exists(), f"{py} is needed for the '{where}' install location"
    assert not prefix or shutil.which(prefix[0]), f"{prefix[0]} (util-linux) is needed for the '{where}' case"
    secret_dir = Path(tempfile.mkdtemp(prefix="async-or1-test-host-"))
    os.chmod(secret_dir, 0o1777)  # readable and writable by anyone: only the isolation keeps a program out
    marker = secret_dir / "rows.jsonl"
    marker.write_text(f"secret-{os.urandom(8).hex()}")
    marker.chmod(0o644)
    outside = secret_dir / "written-by-sandbox"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    try:
        os.chmod(tmp_path, 0o777)
        p = subprocess.run([*prefix, str(py), "-c", CHECK, str(marker), str(srv.getsockname()[1]), str(outside)],
                           capture_output=True, text=True, timeout=240, cwd=tmp_path,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path if prefix else Path.home()), **env})
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.splitlines()[-1])
        if where.startswith("venv"):
            assert out["prefix"] == str(py.parent.parent)
        if prefix:
            assert "user namespace, uid 65534" in out["summary"], out["summary"]
        assert out["shortfall"] is None, out["summary"]
        assert out["summary"].startswith("namespaces: host files hidden, network unreachable, host processes hidden, "
                                         "stdlib readable"), out["summary"]
        assert all(ok for ok, _ in out["good"].values()), out["good"]
        assert not any(ok for ok, _ in out["bad"].values()), out["bad"]
        assert out["forks"] and 0 < int(out["forks"]) < 64, out["forks"]  # RLIMIT_NPROC bounds a fork bomb
        assert not outside.exists()
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
        shutil.rmtree(secret_dir, ignore_errors=True)
