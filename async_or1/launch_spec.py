"""What the launcher hands its children: one JSON spec per run, device sets, free ports.

Kept free of torch so the launcher and ``--help`` stay light."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def parse_cpu_set(text: str) -> set[int]:
    """'0' → {0}; '0-3' → {0,1,2,3}; '0,2-3' → {0,2,3}."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    if not cpus:
        raise ValueError(f"empty device set {text!r}")
    return cpus


def device_kind() -> str:
    """'cuda' when GPUs are visible to this machine, else 'cpu' (decided without importing torch)."""
    if os.environ.get("ASYNC_OR1_DEVICE"):
        return os.environ["ASYNC_OR1_DEVICE"]
    return "cuda" if Path("/dev/nvidia0").exists() else "cpu"


def child_env(devices: str | None, kind: str) -> dict[str, str]:
    """Environment for a child pinned to ``devices``: GPU ids via CUDA_VISIBLE_DEVICES (must be set
    before CUDA initialises, hence in the environment), CPU cores via ASYNC_OR1_CPUS."""
    env = dict(os.environ)
    if devices is None or devices == "":
        return env
    if kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(devices)
    else:
        cpus = sorted(parse_cpu_set(devices))
        env["ASYNC_OR1_CPUS"] = ",".join(map(str, cpus))
        # Each BLAS/OpenMP pool sized to its own cores: two processes each spinning threads on the
        # same two cores would halve both.
        env["OMP_NUM_THREADS"] = str(len(cpus))
    return env


def apply_process_pinning(devices: str | None = None) -> None:
    """Pin this process to its CPU set (from ASYNC_OR1_CPUS or ``devices``), before torch starts threads."""
    text = os.environ.get("ASYNC_OR1_CPUS") or (devices if device_kind() == "cpu" else None)
    if not text:
        return
    cpus = parse_cpu_set(text) & set(range(os.cpu_count() or 1))
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(path)


def read_spec(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
