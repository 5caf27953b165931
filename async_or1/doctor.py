"""``async-or1 doctor``: what a newcomer needs to know before a run, on one screen.

Each check is ``ok``, ``warn`` (the run goes on, but not as measured or not as safely) or
``FAIL`` (the run would break); the exit status is 1 when anything fails. Checks: Python,
the installed packages against pyproject's ranges and the tested pins (constraints.txt),
the torch build and device, cores against the config's device sets, load, memory, gloo, the
code sandbox's isolation, the embedded cache, the ports and the free disk.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_FREE_GIB = 1.0            # disk for the cache (~5 MB), a run's outputs and checkpoints
MIN_AVAILABLE_GIB = 4.0       # the embedded run peaks at ~1.6 GB RSS over its processes


@dataclass
class Check:
    status: str
    name: str
    detail: str


def tested_pins() -> dict[str, str]:
    """name -> version from the constraints file the install scripts use (the versions CI tests)."""
    from importlib import resources

    text = resources.files("async_or1").joinpath("constraints.txt").read_text()
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[_norm(name)] = ver.strip()
    return pins


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def check_packages(requirements: list[str], pins: dict[str, str],
                   version_of: Callable[[str], str | None]) -> list[Check]:
    """Each requirement (PEP 508 string) against the installed version: missing or outside the range
    fails; differing from the tested pin warns. One line for all that match their pins."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    out, matched, seen = [], [], set()
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue                      # optional extras ([dev], [sglang])
        name = _norm(req.name)
        seen.add(name)
        have = version_of(req.name)
        if have is None:
            out.append(Check(FAIL, req.name, f"not installed (needs {req.specifier or 'any'}): "
                                             f"pip install -c async_or1/constraints.txt -e ."))
            continue
        local = Version(have).public     # 2.13.0+cpu -> 2.13.0
        if req.specifier and not req.specifier.contains(local, prereleases=True):
            out.append(Check(FAIL, req.name, f"{have} installed, needs {req.specifier}"))
        elif name in pins and local != pins[name]:
            out.append(_off_pin(req.name, have, pins[name]))
        else:
            matched.append(name)
    for name, pin in pins.items():        # pinned dependencies of dependencies (sympy under math-verify)
        have = version_of(name) if name not in seen else None
        if have is not None and Version(have).public != pin:
            out.append(_off_pin(name, have, pin))
        elif have is not None:
            matched.append(name)
    n_pins = sum(m in pins for m in matched)
    out.insert(0, Check(OK, "packages", f"{len(matched)} checked and as required; {n_pins} of {len(pins)} at "
                                        f"the tested version (async_or1/constraints.txt)"))
    return out


def _off_pin(name: str, have: str, pin: str) -> Check:
    return Check(WARN, name, f"{have} installed, tested with {pin} (the embedded build and the README's "
                             f"figures may differ): pip install -c async_or1/constraints.txt -e .")


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _own_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return list(requires("async-or1") or [])
    except PackageNotFoundError:
        return []


def check_cores(cfg: Any, device_kind: str) -> Check:
    """The config's CPU device sets against the cores this process may use."""
    from async_or1.launch_spec import parse_cpu_set

    have = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    detail = f"{len(have)} usable ({_ranges(have)})"
    if device_kind != "cpu":
        return Check(OK, "cpu cores", detail)
    sets = [("learner.devices", d) for d in cfg.learner.devices] + \
           [("generation.devices", d) for d in cfg.generation.devices]
    missing, used = [], []
    for field, text in sets:
        try:
            cores = parse_cpu_set(text)
        except ValueError:
            return Check(FAIL, "cpu cores", f"{field}: {text!r} is not a core set like '0' or '2-3'")
        used += sorted(cores)
        missing += [f"{field} {text!r}" for c in cores if c not in have][:1]
    if missing:
        return Check(WARN, "cpu cores", f"{detail}; {', '.join(missing)} names cores this machine lacks "
                                        f"(pinning ignores them)")
    shared = len(used) != len(set(used))
    return Check(WARN if shared else OK, "cpu cores",
                 f"{detail}; config pins {len(sets)} process(es)" + (" (some share cores)" if shared else ""))


def _ranges(cores: list[int]) -> str:
    if not cores:
        return "none"
    parts, lo, prev = [], cores[0], cores[0]
    for c in cores[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(lo) if lo == prev else f"{lo}-{prev}")
        if c is not None:
            lo = prev = c
    return ",".join(parts)


def check_load() -> Check:
    """Other work on the machine: every figure in the README was measured with its load beside it."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    one, _, fifteen = os.getloadavg()
    busy = one > n
    return Check(WARN if busy else OK, "load", f"{one:.1f} (1 min), {fifteen:.1f} (15 min) on {n} core(s)"
                 + (": other work holds the cores; expect runs slower than the README's figures" if busy else ""))


def check_memory() -> Check:
    import psutil

    vm = psutil.virtual_memory()
    gib = 1024 ** 3
    detail = f"{vm.available / gib:.1f} GiB available of {vm.total / gib:.1f} GiB"
    return Check(WARN if vm.available / gib < MIN_AVAILABLE_GIB else OK, "memory",
                 detail + (f" (the embedded run wants ~{MIN_AVAILABLE_GIB:.0f})"
                           if vm.available / gib < MIN_AVAILABLE_GIB else ""))


def check_torch(cfg: Any) -> tuple[list[Check], str]:
    import torch

    from async_or1.launch_spec import device_kind

    kind = device_kind()
    cuda_build = torch.version.cuda
    build = f"torch {torch.__version__}, " + (f"CUDA {cuda_build} build" if cuda_build else "CPU-only build")
    out = []
    if kind == "cuda":
        if not torch.cuda.is_available():
            out.append(Check(FAIL, "torch", f"{build}, but this machine has GPUs (/dev/nvidia0) that torch cannot "
                                            f"use: install a CUDA build of torch, or set ASYNC_OR1_DEVICE=cpu"))
        else:
            out.append(Check(OK, "torch", f"{build}; {torch.cuda.device_count()} GPU(s): "
                                          f"{torch.cuda.get_device_name(0)}"))
    else:
        ds = os.environ.get("DS_ACCELERATOR")
        out.append(Check(OK, "torch", f"{build}; no GPU, runs on CPU"
                         + ("" if ds == "cpu" else " (export DS_ACCELERATOR=cpu for --role runs)")))
        if cfg.generation.engine == "sglang":
            out.append(Check(FAIL, "engine", "generation.engine=sglang needs a GPU; use generation.engine=torch"))
    dist = torch.distributed
    gloo = dist.is_available() and dist.is_gloo_available()
    nccl = dist.is_available() and dist.is_nccl_available()
    if kind == "cuda" and not nccl:
        out.append(Check(FAIL, "distributed", "NCCL unavailable: learners and weight broadcast need it on GPUs"))
    elif not gloo and kind == "cpu":
        out.append(Check(FAIL, "distributed", "gloo unavailable in this torch build: the CPU weight broadcast and "
                                              "the learner group need it"))
    else:
        out.append(Check(OK, "distributed", "gloo" + (" and NCCL" if nccl else "") + " available"))
    return out, kind


def check_sandbox(cfg: Any) -> Check:
    """The isolation the code sandbox really gives for rewards.code_isolation (a probe program run)."""
    from async_or1.rewards.sandbox import probe

    want = cfg.rewards.code_isolation
    rep = probe(want)
    short = rep.shortfall()
    if short is None:
        return Check(OK, "code sandbox", rep.summary())
    return Check(WARN, "code sandbox", f"{want} unavailable: {short} (math is unaffected; code rewards would "
                                       f"refuse to run: set rewards.code_isolation=plain only for trusted code)")


def check_embedded(cfg: Any) -> Check:
    """The default build in the cache: complete, missing (the first run builds it), or being built."""
    import fcntl
    import json

    from async_or1.embedded import VERSION, default_cache_dir, is_complete
    from async_or1.embedded.build import BuildParams

    from async_or1.embedded import BUILTIN_MODELS

    if cfg.model.path in BUILTIN_MODELS and cfg.model.path != "embedded":
        return Check(OK, "model", f"{cfg.model.path}: built-in, built and cached on first use")
    if cfg.model.path != "embedded":
        p = Path(cfg.model.path)
        ok = (p / "config.json").is_file()
        return Check(OK if ok else FAIL, "model", f"{p}" + ("" if ok else ": no config.json there (nothing is "
                                                                           "downloaded at run time)"))
    parent = default_cache_dir()
    root = parent / VERSION
    complete, why = is_complete(root, json.loads(json.dumps(BuildParams().to_json())))
    if complete:
        stamp = json.loads((root / "STAMP.json").read_text())
        rep = stamp.get("report", {})
        return Check(OK, "embedded cache", f"{root} built {stamp.get('built_at', '?')}, held-out accuracy "
                                           f"{rep.get('heldout_accuracy_t1', float('nan')):.3f} at T=1")
    lock = parent / f".{VERSION}.lock"
    busy = False
    if lock.exists():
        with lock.open("a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            except BlockingIOError:
                busy = True
    if busy:
        return Check(WARN, "embedded cache", f"{root}: another process is building it now; a run waits for it")
    return Check(WARN, "embedded cache", f"{root}: not built ({why}); the first run builds it (a few minutes, "
                                         f"once), or `async-or1 embedded` now")


def check_port(host: str, port: int, what: str) -> Check:
    """A fixed port must be free on ``host``; port 0 means the launcher picks one, so ``host`` must
    be bindable at all."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if port:
                return Check(FAIL, "ports", f"{what}={port} on {host}: {e.strerror or e} (another run? pick a "
                                            f"free port or 0)")
            return Check(FAIL, "ports", f"cannot bind {host}: {e.strerror or e} (transport.host)")
        got = s.getsockname()[1]
    return Check(OK, "ports", f"{what}={port} free on {host}" if port else f"free ports on {host} (e.g. {got})")


def check_disk(paths: list[Path]) -> Check:
    import shutil

    worst = None
    for p in paths:
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        free = shutil.disk_usage(q).free / 1024 ** 3
        if worst is None or free < worst[1]:
            worst = (p, free)
    p, free = worst
    return Check(WARN if free < MIN_FREE_GIB else OK, "disk", f"{free:.1f} GiB free at {p}")


def run_checks(cfg: Any) -> list[Check]:
    from async_or1.embedded import default_cache_dir

    checks = [Check(OK if sys.version_info >= (3, 10) else FAIL, "python",
                    f"{sys.version.split()[0]} at {sys.executable}")]
    checks += check_packages(_own_requirements(), tested_pins(), _installed_version)
    torch_checks, kind = check_torch(cfg)
    checks += torch_checks
    checks += [check_cores(cfg, kind), check_load(), check_memory(), check_sandbox(cfg), check_embedded(cfg)]
    host = cfg.transport.host
    ports = [(f, getattr(cfg.transport, f)) for f in ("port", "weights_port") if getattr(cfg.transport, f)]
    for f, port in ports:
        checks.append(check_port(host, port, f"transport.{f}"))
    if not ports:
        checks.append(check_port(host, 0, "transport.port"))
    checks.append(check_disk([default_cache_dir(), Path(cfg.output_dir)]))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"  {c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    if fails:
        lines.append(f"doctor: {fails} problem(s) would break a run" + (f", {warns} warning(s)" if warns else ""))
    else:
        lines.append("doctor: ready to run" + (f" ({warns} warning(s))" if warns else ""))
    return "\n".join(lines)


def main(cfg: Any, config_path: str | None) -> int:
    print(f"async-or1 doctor (config: {config_path or 'defaults'})")
    checks = run_checks(cfg)
    print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
