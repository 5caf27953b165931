"""``launch.backend: ray`` for real: Ray's multi-node test cluster on this machine (a head node with
a ``learner_node`` resource, a worker node with two ``generator_node`` slots and 2 CPUs, every
socket on 127.0.0.1: tests/ray_cluster.py), the embedded config, the learner on one Ray node and
two generators on the other.

- 20 steps with generator 1's actor process SIGKILLed mid-run: Ray restarts the actor, its
  process starts again, the learner re-issues its prompts and re-forms the weight group, the run
  completes with the ledger balanced;
- a learner actor SIGKILLed: the run stops with the resume hint, nothing left running;
- a run stopped with SIGTERM to ``async-or1 train`` (what ``ray job stop`` sends):
  the learner checkpoints within its grace and the launcher exits 130.

The first also checks that every listening socket of the run, its actors and the cluster is on
loopback; each checks that no process of the run is left (the actors' processes are the raylets' children, not the
launcher's: they are recorded from ray_placement.json while the run lives).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from async_or1.faultinject import Run, alive, cmdline

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def cluster():
    import ray  # noqa: F401  (the [ray] extra: CI installs it; a missing Ray fails here, loudly)

    # The launcher's Ray driver too must keep 127.0.0.1 as it is (see tests/ray_cluster.py); Run
    # passes this process's environment on.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    proc = subprocess.Popen([sys.executable, str(HERE / "ray_cluster.py"),
                             json.dumps({"num_cpus": 1, "resources": {"learner_node": 1}}),
                             json.dumps({"num_cpus": 2, "resources": {"generator_node": 2}})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.monotonic()
    line = proc.stdout.readline()  # the helper prints once every node is up (or dies)
    assert line, "the Ray test cluster did not start"
    info = json.loads(line)
    info["start_s"] = time.monotonic() - t0
    info["proc"] = psutil.Process(proc.pid)
    print(f"\nRay test cluster up in {info['start_s']:.1f} s: {info['nodes']}")
    try:
        yield info
    finally:
        family = _family([proc.pid])
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        left = _alive(family, 20)
        for p in left:
            p.kill()
        assert not left, f"Ray test cluster processes left: {[' '.join(cmdline(p))[:100] for p in left]}"


def _family(pids: list[int]) -> dict[int, float]:
    """pid -> create time of these processes and all their descendants, now."""
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                out[q.pid] = q.create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(family: dict[int, float], within_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while (left := alive(family)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _check_loopback(pids: set[int]) -> int:
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    bad = [(c.pid, " ".join(cmdline(psutil.Process(c.pid)))[:80], c.laddr) for c in listening
           if c.laddr.ip not in LOOPBACK]
    assert not bad, f"sockets listening beyond loopback: {bad}"
    return len(listening)


def _ray_run(tmp_path: Path, cluster: dict, name: str, steps: int, **overrides) -> Run:
    return Run(tmp_path, name, **{"launch.backend": "ray", "launch.ray_address": cluster["address"],
                                  "launch.ray_learner_resources": "{learner_node: 1}",
                                  "launch.ray_generator_resources": "{generator_node: 1}",
                                  "launch.ray_start_timeout_s": "300",
                                  "schedule.0.steps": steps, "generation.num_generators": 2,
                                  "generation.devices": "[]", "learner.devices": "[]", **overrides})


def _placement(run: Run) -> dict:
    return json.loads((run.dir / "ray_placement.json").read_text())


def _actor_family(placement: dict) -> dict[int, float]:
    return _family([w["pid"] for w in placement["learner"] + placement["generators"]])


@pytest.mark.timeout(1500)
def test_ray_two_nodes_generator_actor_sigkilled_is_restarted_and_the_run_completes(tmp_path, cluster):
    steps = 20
    head, worker = (n["node_id"] for n in cluster["nodes"])
    run = _ray_run(tmp_path, cluster, "ray-kill", steps)
    t0 = time.monotonic()
    try:
        run.start().wait_version(3, 600)
        first_steps_s = time.monotonic() - t0
        before = _placement(run)
        assert [w["node_id"] for w in before["learner"]] == [head], before
        assert [w["node_id"] for w in before["generators"]] == [worker, worker], before
        actors = _actor_family(before)
        n_listen = _check_loopback(set(run.note() and {p.pid for p in run.alive()}) | set(actors)
                                   | set(_family([cluster["proc"].pid])))
        assert n_listen >= 4, "the ROUTER, the stores and Ray's servers listen (on loopback)"

        victim = before["generators"][1]["pid"]
        assert any("async_or1.generation.worker" in " ".join(cmdline(c))
                   for c in psutil.Process(victim).children()), "the actor hosts the generator process"
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        run.wait_version(run.rows()[-1]["version"] + 2, 300)
        recovered_s = time.monotonic() - t_kill
        after = _placement(run)
        actors.update(_actor_family(after))
        rc = run.wait(900)
        total_s = time.monotonic() - t0
        assert rc == 0, run.logs()
    finally:
        run.kill_all()
    summ = run.summary()
    a = summ["accounting"]
    assert summ["final_version"] == steps
    assert a["leased"] == a["trained"] + sum(a["dropped"].values()) + a["returned"] + a["queued"] + a["in_flight"], a
    assert a["in_flight"] == 0, a
    f = summ["faults"]
    assert f["generator_restarts"] == 1 and [r["generator_id"] for r in f["recoveries"]] == [1], f
    assert f["weight_group"]["epochs"] >= 2, "the weight group was re-formed with the restarted generator"
    assert [r["version"] for r in run.rows()] == list(range(1, steps + 1))
    g1 = after["generators"][1]
    assert g1["restarts"] == 1 and g1["pid"] != victim and g1["node_id"] == worker, after
    launcher_log = (run.dir.parent / f"{run.dir.name}.launcher.log").read_text()
    assert "generator 1 lost its actor" in launcher_log and "Ray restarted its actor" in launcher_log
    assert "Ray restarted the actor of generator 1" in (run.dir / "logs" / "generator_1.log").read_text()
    left = run.no_leftovers(15) + [" ".join(cmdline(p))[:100] for p in _alive(actors, 15)]
    assert not left, f"processes of the run still alive: {left}"
    print(f"\nRay: first 3 steps {first_steps_s:.0f} s after launch (cluster up in {cluster['start_s']:.0f} s); "
          f"generator actor SIGKILLed → 2 more steps in {recovered_s:.1f} s; run {total_s:.0f} s; faults {f}; "
          f"load {os.getloadavg()}")


@pytest.mark.timeout(900)
def test_ray_sigterm_to_the_launcher_checkpoints_and_stops_everything(tmp_path, cluster):
    run = _ray_run(tmp_path, cluster, "ray-term", 40)
    try:
        run.start().wait_version(2, 600)
        actors = _actor_family(_placement(run))
        run.proc.send_signal(signal.SIGTERM)  # what `ray job stop` sends the entrypoint
        assert run.wait(300) == 130, run.logs()
    finally:
        run.kill_all()
    ckpts = sorted((run.dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "complete.json").is_file(), "the learner checkpointed on the way out"
    left = run.no_leftovers(15) + [" ".join(cmdline(p))[:100] for p in _alive(actors, 15)]
    assert not left, f"processes of the run still alive: {left}"


@pytest.mark.timeout(900)
def test_ray_learner_actor_sigkilled_stops_the_run_loudly_with_the_resume_hint(tmp_path, cluster):
    run = _ray_run(tmp_path, cluster, "ray-learner", 40)
    try:
        run.start().wait_version(2, 600)
        placement = _placement(run)
        actors = _actor_family(placement)
        os.kill(placement["learner"][0]["pid"], signal.SIGKILL)  # no restart for a learner: the run stops
        rc = run.wait(300)
    finally:
        run.kill_all()
    assert rc not in (None, 0), run.logs()
    launcher_log = (run.dir.parent / f"{run.dir.name}.launcher.log").read_text()
    assert "learner rank 0 lost its actor" in launcher_log and "Continue it with --resume" in launcher_log
    left = run.no_leftovers(15) + [" ".join(cmdline(p))[:100] for p in _alive(actors, 15)]
    assert not left, f"processes of the run still alive: {left}"
