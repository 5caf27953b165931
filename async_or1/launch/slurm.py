"""``async-or1 slurm``: the sbatch script that runs a training run on a Ray cluster inside a Slurm job.

    check the config (and that the allocation can hold it) → write the script to stdout

The script, on the allocation's first node (where Slurm runs batch scripts):

    Ray head there (srun) → a Ray worker on every other node (srun) → wait for the head →
    ``async-or1 train --config F launch.backend=ray launch.ray_address=HEAD:PORT`` →
    stop the Ray nodes

The launcher itself waits (``launch.ray_start_timeout_s``) until the workers have joined with the
GPUs the run needs. ``#SBATCH --signal=B:TERM@S`` has Slurm send the script SIGTERM S seconds
before the time limit; the script passes it to the launcher, whose learners checkpoint (resume
with ``--resume`` in the next job). Ray, ``async-or1`` and the config must be reachable on every
node as on the submitting shell (sbatch exports the environment; the run directory, model and
data on a shared file system).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any


def gpus_needed(cfg: Any) -> int:
    """GPUs the run takes on a GPU cluster: one per learner rank, ``sglang_tp_size`` per SGLang
    generator (one per torch-engine generator)."""
    per_gen = cfg.generation.sglang_tp_size if cfg.generation.engine == "sglang" else 1
    return max(1, len(cfg.learner.devices)) + cfg.generation.num_generators * per_gen


def check_fits(cfg: Any, nodes: int, gpus_per_node: int) -> None:
    if nodes < 1:
        raise SystemExit(f"async-or1 slurm: --nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise SystemExit(f"async-or1 slurm: --gpus-per-node must be >= 0, got {gpus_per_node}")
    need = gpus_needed(cfg)
    if gpus_per_node and need > nodes * gpus_per_node:
        raise SystemExit(
            f"async-or1 slurm: the run needs {need} GPUs ({max(1, len(cfg.learner.devices))} learner rank(s) from "
            f"learner.devices + {cfg.generation.num_generators} generator(s) × "
            f"{cfg.generation.sglang_tp_size if cfg.generation.engine == 'sglang' else 1}), the job has "
            f"{nodes} × {gpus_per_node} = {nodes * gpus_per_node}")


def sbatch_script(config_path: str, overrides: list[str], name: str, nodes: int, gpus_per_node: int,
                  partition: str | None = None, time_limit: str | None = None, ray_port: int = 6379,
                  stop_signal_s: int = 300, log_dir: str = ".") -> str:
    """The batch script's text (bash). Every user value is shell-quoted."""
    q = shlex.quote
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={q('async-or1-' + name)}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
        f"#SBATCH --signal=B:TERM@{stop_signal_s}",
        f"#SBATCH --output={q(str(Path(log_dir) / 'async-or1-%j.out'))}",
    ]
    if gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        head.append(f"#SBATCH --partition={q(partition)}")
    if time_limit:
        head.append(f"#SBATCH --time={q(time_limit)}")
    train = " ".join(["async-or1", "train", "--config", q(str(Path(config_path).resolve())),
                      *(q(o) for o in overrides), "launch.backend=ray", 'launch.ray_address="$head_ip:$ray_port"',
                      '"$@"'])
    body = f"""
# Written by `async-or1 slurm`. Extra arguments to sbatch after the script name go to
# `async-or1 train` (e.g. --resume).
set -euo pipefail
ray_port={ray_port}
gpus={gpus_per_node}
cpus="${{SLURM_CPUS_ON_NODE:-1}}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head="${{nodes[0]}}"
head_ip="$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{{print $1}}')"
echo "async-or1 slurm: Ray head on $head ($head_ip:$ray_port), ${{#nodes[@]}} node(s)"

pids=()
stop_ray() {{
  trap - EXIT
  for pid in "${{pids[@]}}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${{pids[@]}}" 2>/dev/null || true
}}
trap stop_ray EXIT

srun --nodes=1 --ntasks=1 --overlap -w "$head" \\
  ray start --head --block --node-ip-address="$head_ip" --port="$ray_port" \\
  --num-cpus="$cpus" --num-gpus="$gpus" --include-dashboard=false &
pids+=($!)
for _ in $(seq 300); do
  ray status --address="$head_ip:$ray_port" >/dev/null 2>&1 && break
  sleep 2
done
ray status --address="$head_ip:$ray_port" >/dev/null || {{ echo "async-or1 slurm: the Ray head did not start" >&2; exit 1; }}
for node in "${{nodes[@]:1}}"; do
  srun --nodes=1 --ntasks=1 --overlap -w "$node" \\
    ray start --block --address="$head_ip:$ray_port" --num-cpus="$cpus" --num-gpus="$gpus" &
  pids+=($!)
done

# In the background so that Slurm's SIGTERM (time limit, scancel) reaches it: its learners
# checkpoint before it exits (130); continue with `sbatch THIS_SCRIPT --resume`.
{train} &
train_pid=$!
trap 'kill -TERM "$train_pid" 2>/dev/null || true' TERM INT
rc=0
wait "$train_pid" || rc=$?
while kill -0 "$train_pid" 2>/dev/null; do wait "$train_pid" || rc=$?; done
echo "async-or1 slurm: async-or1 train exited with $rc"
exit "$rc"
"""
    return "\n".join(head) + "\n" + body


def main(config_path: str, overrides: list[str], nodes: int, gpus_per_node: int, partition: str | None,
         time_limit: str | None, ray_port: int) -> int:
    from async_or1.config import load_config

    cfg = load_config(config_path, [*overrides, "launch.backend=ray"])  # bad input fails here, not in the job
    check_fits(cfg, nodes, gpus_per_node)
    print(sbatch_script(config_path, overrides, cfg.name, nodes, gpus_per_node, partition, time_limit, ray_port),
          end="")
    return 0
