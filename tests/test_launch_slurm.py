"""``async-or1 slurm``: the batch script it writes, run by bash against fake Slurm and Ray tools.

The fakes model what the script relies on: ``scontrol show hostnames`` expands the node list,
``srun -w NODE CMD`` runs CMD "on" NODE (here: on this machine, with FAKE_NODE=NODE), a
``ray start --block`` stays up until signalled, ``ray status --address`` succeeds once a head is
up at that address, and ``async-or1 train`` waits for the worker node to join, then exits 0 (or,
told to, waits for SIGTERM and exits 130 as the real launcher does after its learners checkpoint). Every call is logged, so the test checks
the order (head, then workers joined to the head's address, then the run) and the teardown.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from async_or1.cli import main

FAKES = {
    "scontrol": """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 2
echo "$3" | tr ',' '\\n'
""",
    "srun": """#!/bin/bash
node=""
while [ $# -gt 0 ]; do
  case "$1" in
    -w) node="$2"; shift 2;;
    --*) shift;;
    *) break;;
  esac
done
echo "srun $node: $*" >> "$FAKE_LOG"
FAKE_NODE="$node" exec "$@"
""",
    "hostname": """#!/bin/bash
echo "192.0.2.$(( ${#FAKE_NODE} )) fe80::1"
""",
    "ray": """#!/bin/bash
if [ "$1" = status ]; then
  addr="${2#--address=}"
  [ -f "$FAKE_STATE/head_$addr" ]; exit $?
fi
echo "ray $FAKE_NODE: $*" >> "$FAKE_LOG"
trap 'echo "ray $FAKE_NODE: stopped" >> "$FAKE_LOG"; exit 0' TERM
for a in "$@"; do
  case "$a" in --node-ip-address=*) ip="${a#*=}";; --port=*) port="${a#*=}";; --address=*) touch "$FAKE_STATE/joined_$FAKE_NODE";; esac
done
[ "$2" = --head ] && touch "$FAKE_STATE/head_$ip:$port"
while true; do sleep 0.1; done
""",
    "async-or1": """#!/bin/bash
echo "train: $*" >> "$FAKE_LOG"
echo $$ > "$FAKE_STATE/train.pid"
# As the real launcher, wait until the worker node joined (launch.ray_start_timeout_s).
for _ in $(seq 300); do [ -f "$FAKE_STATE/joined_gpu-bb" ] && break; sleep 0.1; done
if [ -n "${FAKE_TRAIN_WAITS:-}" ]; then
  trap 'echo "train: SIGTERM, checkpointing" >> "$FAKE_LOG"; exit 130' TERM
  while true; do sleep 0.1; done
fi
exit 0
""",
}


def _write_script(tmp_path: Path, capsys, *extra: str) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: big\nlearner:\n  devices: ['0', '1', '2', '3']\n"
                   "generation:\n  engine: sglang\n  num_generators: 2\n  sglang_tp_size: 2\n")
    assert main(["slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu q",
                 "--time", "1:00:00", *extra]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    return script


def _run(tmp_path: Path, script: Path, *args: str, train_waits: bool = False) -> subprocess.Popen:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in FAKES.items():
        (fake / name).write_text(text)
        (fake / name).chmod(stat.S_IRWXU)
    (tmp_path / "state").mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a,gpu-bb",
           "SLURM_CPUS_ON_NODE": "16", "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_STATE": str(tmp_path / "state")}
    if train_waits:
        env["FAKE_TRAIN_WAITS"] = "1"
    return subprocess.Popen(["bash", str(script), *args], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


@pytest.mark.timeout(120)
def test_sbatch_script_starts_ray_head_then_workers_then_the_run_and_stops_ray(tmp_path, capsys):
    script = _write_script(tmp_path, capsys, "generation.prompts_per_lease=2")
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition='gpu q'",
                 "#SBATCH --time=1:00:00", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:TERM@300"):
        assert line in text.splitlines(), line
    rc, out = _finish(_run(tmp_path, script, "--resume"), 90)
    assert rc == 0, out
    calls = _calls(tmp_path)
    head_ip = "192.0.2.5"  # the fake hostname on node gpu-a
    assert calls[0] == "srun gpu-a: hostname --ip-address"
    assert calls[1] == "srun gpu-a: ray start --head --block --node-ip-address=192.0.2.5 --port=6379 --num-cpus=16 --num-gpus=4 --include-dashboard=false"
    assert calls[2] == "ray gpu-a: start --head --block --node-ip-address=192.0.2.5 --port=6379 --num-cpus=16 --num-gpus=4 --include-dashboard=false"
    worker = f"start --block --address={head_ip}:6379 --num-cpus=16 --num-gpus=4"
    train = (f"train: train --config {tmp_path / 'run.yaml'} generation.prompts_per_lease=2 "
             f"launch.backend=ray launch.ray_address={head_ip}:6379 --resume")
    # The worker joins while the run starts: the launcher itself waits until the cluster holds the run.
    assert sorted(calls[3:6]) == sorted([f"srun gpu-bb: ray {worker}", f"ray gpu-bb: {worker}", train]), calls
    assert calls.index(f"srun gpu-bb: ray {worker}") < calls.index(f"ray gpu-bb: {worker}")
    assert sorted(calls[6:]) == ["ray gpu-a: stopped", "ray gpu-bb: stopped"], "both Ray nodes stopped after the run"
    assert "async-or1 train exited with 0" in out


@pytest.mark.timeout(120)
def test_sbatch_script_passes_slurms_sigterm_to_the_run_and_exits_with_its_code(tmp_path, capsys):
    script = _write_script(tmp_path, capsys)
    proc = _run(tmp_path, script, train_waits=True)
    pid_file = tmp_path / "state" / "train.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline and proc.poll() is None, _finish(proc, 5)
        time.sleep(0.1)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)  # what Slurm sends the batch shell (--signal=B:TERM@300, scancel)
    rc, out = _finish(proc, 60)
    assert rc == 130, out
    calls = _calls(tmp_path)
    assert "train: SIGTERM, checkpointing" in calls
    assert calls.index("train: SIGTERM, checkpointing") < min(calls.index("ray gpu-a: stopped"),
                                                                calls.index("ray gpu-bb: stopped"))
    train_pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(train_pid, 0)


def test_slurm_refuses_a_job_too_small_for_the_run(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learner:\n  devices: ['0', '1', '2', '3']\ngeneration:\n  engine: sglang\n  num_generators: 3\n"
                   "  sglang_tp_size: 2\n")
    with pytest.raises(SystemExit, match=r"needs 10 GPUs .* the job has 2 × 4 = 8"):
        main(["slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4"])
    assert capsys.readouterr().out == "", "nothing written for sbatch"
    assert main(["slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4", "algo.nope=1"]) == 2
