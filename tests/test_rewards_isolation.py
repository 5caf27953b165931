"""The sandbox's self-check and its isolation policy: what is asked for is given, or nothing runs.

``probe`` runs a real program in the real sandbox (a host file it must not read, a listener on the
host loopback it must not reach, this process it must not see, the standard library it must be able
to import). Where a test needs the namespace set-up to fail, it adds a Python installation path the
sandbox cannot bind (``/tmp`` itself, which would cover the sandbox's own /tmp): the failure then
comes from the real harness, only its cause is staged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from async_or1.rewards import sandbox
from async_or1.rewards.code import run_code
from async_or1.rewards.pool import RewardPool
from async_or1.rewards.sandbox import SandboxUnavailable, probe, require

GOOD = "reasoning</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="runs as root (the unprivileged path is in test_rewards_install_locations)")


@pytest.fixture
def fresh_probes(monkeypatch):
    monkeypatch.setattr(sandbox, "_probes", {})


@pytest.fixture
def broken_namespaces(monkeypatch, fresh_probes):
    real = sandbox._ro_paths
    monkeypatch.setattr(sandbox, "_ro_paths", lambda: real() + ["/tmp"])


@needs_root
def test_probe_measures_namespace_isolation(fresh_probes):
    r = probe("namespaces")
    assert (r.host_file_visible, r.network_reachable, r.host_processes_visible, r.stdlib) == (False, False, False, "ok")
    assert r.shortfall() is None and require("namespaces") is r
    assert r.summary().startswith("namespaces: host files hidden, network unreachable, host processes hidden, "
                                  "stdlib readable [namespaces (net, mount, pid, ipc)")


def test_probe_sees_what_plain_mode_leaks(fresh_probes):
    # the same program in plain mode sees the host file and this process: the probe can tell
    r = probe("plain")
    assert r.error is None, r
    assert r.host_file_visible is True and r.host_processes_visible is True
    if r.stdlib == "ok":
        assert require("plain") is r
    else:  # as root with the interpreter under a closed directory (/root/.pyenv): refused, with the fix named
        with pytest.raises(SandboxUnavailable, match="cannot use the standard library.*chmod o\\+x"):
            require("plain")


@needs_root
def test_failed_namespace_set_up_is_an_error_not_a_downgrade(broken_namespaces):
    r = probe("namespaces")
    assert r.error and "would cover the sandbox's own /tmp" in r.error and "UNAVAILABLE" in r.summary()
    with pytest.raises(SandboxUnavailable, match="asked for namespaces isolation.*rewards.code_isolation=plain"):
        require("namespaces")
    with pytest.raises(SandboxUnavailable):
        run_code(GOOD, ADD, timeout_s=5, memory_mb=512)
    with RewardPool(workers=1, math_timeout_s=5) as pool:
        assert pool.score([("math", "x</think>\\boxed{2}", ["2"])])[0].correct  # math needs no sandbox
        with pytest.raises(SandboxUnavailable):
            pool.score([("code", GOOD, ADD), ("math", "x</think>\\boxed{2}", ["2"])])


@needs_root
def test_interpreter_under_tmp_is_bound_inside_the_sandboxes_tmp(monkeypatch, fresh_probes):
    # a venv in /tmp/x used to collide with the sandbox's own /tmp (FileExistsError -> plain mode)
    prefix = tempfile.mkdtemp(prefix="async-or1-test-prefix-", dir="/tmp")
    os.chmod(prefix, 0o755)
    with open(os.path.join(prefix, "p13_site_module.py"), "w") as f:
        f.write("VALUE = 41\n")
    real_ro, real_path = sandbox._ro_paths, sandbox._sys_path
    monkeypatch.setattr(sandbox, "_ro_paths", lambda: real_ro() + [prefix])
    monkeypatch.setattr(sandbox, "_sys_path", lambda: real_path() + [prefix])
    try:
        assert require("namespaces").host_file_visible is False
        r = run_code("x</think>\n```python\nimport p13_site_module, os\n"
                     "print(p13_site_module.VALUE + 1, os.access(os.path.dirname(p13_site_module.__file__), os.W_OK))"
                     "\n```", {"inputs": [""], "outputs": ["42 False"]}, timeout_s=5, memory_mb=512)
        assert r["passed"] and "namespaces" in r["isolation"], r
    finally:
        os.remove(os.path.join(prefix, "p13_site_module.py"))
        os.rmdir(prefix)


def _cfg(isolation: str, abilities=("math", "code")):
    from async_or1.config import load_config

    return load_config(None, [f"rewards.code_isolation={isolation}", f"data.abilities={json.dumps(list(abilities))}"])


def _rows(tmp_path, abilities: list[str]) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"ability": a, "prompt": [{"role": "user", "content": "q"}]}) + "\n"
                            for a in abilities))
    return str(path)


@needs_root
def test_training_refuses_to_start_with_less_isolation_than_configured(broken_namespaces, tmp_path, capsys):
    from async_or1.launch import check_code_sandbox

    with pytest.raises(SystemExit, match="refusing to start: the data holds code rows and code sandbox: asked for "
                                         "namespaces isolation"):
        check_code_sandbox(_cfg("namespaces"), [_rows(tmp_path, ["math", "code"])])
    check_code_sandbox(_cfg("namespaces"), [_rows(tmp_path, ["math", "math"])])  # no code row: no sandbox needed
    check_code_sandbox(_cfg("namespaces", abilities=["math"]), [_rows(tmp_path, ["code"])])


@needs_root
def test_training_reports_the_measured_isolation(fresh_probes, tmp_path, capsys):
    from async_or1.launch import check_code_sandbox

    check_code_sandbox(_cfg("namespaces"), [_rows(tmp_path, ["code"])])
    assert "async-or1: code sandbox: namespaces: host files hidden, network unreachable" in capsys.readouterr().out


def test_cli_probe_prints_the_self_check():
    for isolation in ("namespaces", "plain"):
        p = subprocess.run([sys.executable, "-m", "async_or1.cli", "reward", "code", "--probe", "--isolation",
                            isolation], capture_output=True, text=True, timeout=120)
        out = json.loads(p.stdout)
        assert set(out) >= {"requested", "host_file_visible", "network_reachable", "host_processes_visible",
                            "stdlib", "shortfall"}
        assert out["requested"] == isolation and p.returncode == (0 if out["shortfall"] is None else 2), p
    if ROOT:
        assert out["host_file_visible"] is True  # plain mode: the host file is readable by the probe


PATCHED = ("import sys\nfrom async_or1.rewards import sandbox\nreal = sandbox._ro_paths\n"
           "sandbox._ro_paths = lambda: real() + ['/tmp']\nfrom async_or1.cli import main\n")


@needs_root
def test_async_or1_train_refuses_before_anything_starts(tmp_path):
    rows = tmp_path / "code.jsonl"
    rows.write_text(json.dumps({"data_source": "t", "prompt": [{"role": "user", "content": "Echo."}],
                                "ability": "code", "reward_model": {"ground_truth": json.dumps(ADD)}}) + "\n")
    argv = ["train", "--config", "configs/cpu-tiny.yaml", f"data.train_files=[{rows}]", f"output_dir={tmp_path}",
            "name=refused"]
    p = subprocess.run([sys.executable, "-c", PATCHED + f"sys.exit(main({argv!r}))"], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode != 0 and "refusing to start: the data holds code rows" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "refused" / "logs").exists() and not list((tmp_path / "refused").glob("eval_*"))


@needs_root
def test_cli_code_refuses_to_score_without_the_isolation_asked_for(tmp_path):
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"id": 1, "response": GOOD, "tests": ADD}) + "\n")
    code = PATCHED + f"sys.exit(main(['reward', 'code', '--jsonl', {str(rows)!r}]))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p
    assert "asked for namespaces isolation" in p.stderr and "would cover the sandbox's own /tmp" in p.stderr
