"""The command line: overrides wherever they stand, and ``async-or1 doctor`` on a real machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from async_or1.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "async_or1.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def test_overrides_split_by_options_are_all_taken_in_order():
    # the command: refused before ("unrecognized arguments: schedule.0.steps=1")
    a = parse_args(["train", "--config", "F", "name=x", "--overwrite", "schedule.0.steps=1"])
    assert a.overrides == ["name=x", "schedule.0.steps=1"] and a.overwrite and a.config == "F"
    a = parse_args(["train", "name=a", "--dry-run", "algo.clip_high=0.3", "--config", "F", "name=b", "--resume"])
    assert a.overrides == ["name=a", "algo.clip_high=0.3", "name=b"] and a.dry_run and a.resume
    a = parse_args(["bench", "throughput", "learner.lr=1e-4", "--steps", "3", "seed=2", "--repeats", "2", "x.y=-1"])
    assert a.overrides == ["learner.lr=1e-4", "seed=2", "x.y=-1"] and (a.steps, a.repeats) == (3, 2)
    a = parse_args(["doctor", "transport.port=5555", "--config", "F", "name=z"])
    assert a.overrides == ["transport.port=5555", "name=z"] and a.config == "F"
    a = parse_args(["eval", "--model", "m", "model.dtype=bfloat16", "--k", "2", "generation.num_generators=2"])
    assert a.overrides == ["model.dtype=bfloat16", "generation.num_generators=2"] and a.k == 2


@pytest.mark.parametrize("argv", [
    ["train", "--config", "F", "name=x", "--overwrite", "bogus"],      # not an override, not an option
    ["train", "--dry-run", "a=1", "--no-such-flag"],
    ["eval", "--model", "m", "a=1", "--no-such-flag"],                 # eval's overrides are its pool's config
    ["plot", "runs/x", "name=y"],
])
def test_leftovers_that_are_not_overrides_are_still_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_dry_run_applies_overrides_from_anywhere_on_the_line():
    r = run_cli("train", "--config", "configs/cpu-tiny.yaml", "name=x", "--overwrite", "schedule.0.steps=1",
                "--dry-run", "schedule.0.steps=3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("name: x\n") and "- steps: 3\n" in r.stdout                  # the later override wins


def test_openmp_threads_sleep_by_default_unless_the_user_says_otherwise():
    code = "import os, sys; from async_or1.cli import main; main(['config']); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.stdout.splitlines()[-1] == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert r.stdout.splitlines()[-1] == "ACTIVE", r.stderr


# ---- doctor ---------------------------------------------------------------------------------------

def test_package_check_against_ranges_and_pins():
    from async_or1.doctor import FAIL, OK, WARN, check_packages

    have = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "deepspeed": "0.14.0", "sympy": "1.13.0"}
    checks = check_packages(["torch>=2.4,<2.14", "transformers>=5.0,<5.26", "deepspeed>=0.15", "pyzmq>=25",
                             'pytest>=8; extra == "dev"'],
                            {"torch": "2.13.0", "transformers": "5.25.0", "sympy": "1.14.0"}, have.get)
    by = {c.name: c for c in checks}
    assert by["packages"].status == OK and "1 of 3 at the tested version" in by["packages"].detail  # torch+cpu ok
    assert by["transformers"].status == WARN and "tested with 5.25.0" in by["transformers"].detail
    assert by["sympy"].status == WARN                                  # a pinned dependency of a dependency
    assert by["deepspeed"].status == FAIL and "needs >=0.15" in by["deepspeed"].detail
    assert by["pyzmq"].status == FAIL and "not installed" in by["pyzmq"].detail
    assert "pytest" not in by                                          # extras are not required


def test_shipped_pins_match_pyproject_ranges():
    """constraints.txt (what CI installs) must lie inside pyproject's ranges, or the install fails."""
    from packaging.requirements import Requirement

    from async_or1.doctor import _norm, tested_pins

    pins = tested_pins()
    assert {"torch", "transformers", "tokenizers", "deepspeed", "math-verify"} <= set(pins)
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    lines = [line.split("#", 1)[0].strip().strip(",").strip('"') for line in deps.splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    for r in reqs:
        if _norm(r.name) in pins:
            assert r.specifier.contains(pins[_norm(r.name)]), (r, pins[_norm(r.name)])
    for name in ("transformers", "deepspeed", "tokenizers", "math-verify"):
        assert any(_norm(r.name) == name and any(s.operator == "<" for s in r.specifier) for r in reqs), name


def test_doctor_one_screen_ready_on_this_machine(tmp_path):
    r = run_cli("doctor", f"output_dir={tmp_path / 'runs'}", env={"ASYNC_OR1_CACHE": str(tmp_path / "cache")})
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(lines) <= 24 and lines[-1].startswith("doctor: ready to run")
    text = r.stdout
    for name in ("python", "packages", "torch", "distributed", "cpu cores", "load", "memory", "code sandbox",
                 "embedded cache", "ports", "disk"):
        assert f"  {name} " in text, name
    assert "not built" in text and str(tmp_path / "cache") in text                   # the empty cache is named
    assert "CPU-only build" in text or "CUDA" in text


def test_doctor_fails_on_a_taken_port_and_a_missing_model(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_cli("doctor", f"transport.port={port}", f"model.path={tmp_path / 'nothing'}",
                    env={"ASYNC_OR1_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [line for line in r.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert any(f"transport.port={port}" in line for line in fails), r.stdout
    assert any("no config.json" in line for line in fails), r.stdout
    assert "2 problem(s) would break a run" in r.stdout


def test_doctor_sees_a_build_in_progress(tmp_path):
    """The cache lock held by another process (a build under way) is reported, not waited on."""
    import fcntl

    from async_or1.embedded import VERSION

    cache = tmp_path / "cache"
    cache.mkdir()
    with (cache / f".{VERSION}.lock").open("a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        r = run_cli("doctor", env={"ASYNC_OR1_CACHE": str(cache)}, timeout=60)
    assert r.returncode == 0 and "another process is building it now" in r.stdout, r.stdout
