"""The embedded default: a tiny reasoning model and a verifiable task, built on first use.

``ensure_embedded()`` returns the cached build, building it once if it is missing,
incomplete, or from other build parameters. The build happens in a temporary directory
next to the cache and is renamed into place at the end, under a file lock, so an
interrupted build never looks complete and two processes never build at once.

Cache location: ``<cache_dir>/embedded-v2`` where cache_dir is the argument, else
``$ASYNC_OR1_CACHE``, else ``~/.cache/async-or1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Bumped whenever the build's output changes (v2: fixed SFT budget, the sampling pass through the
# torch engine), so that every older cache is rebuilt rather than half-matched.
VERSION = "embedded-v2"
STAMP = "STAMP.json"


@dataclass(frozen=True)
class EmbeddedPaths:
    root: Path
    model: Path        # Hugging Face model dir (Qwen2 + tokenizer with chat template)
    train: Path        # JSONL rows, Skywork-OR1-RL-Data layout
    heldout: Path


def default_cache_dir() -> Path:
    env = os.environ.get("ASYNC_OR1_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "async-or1"


def paths_of(root: Path) -> EmbeddedPaths:
    return EmbeddedPaths(root=root, model=root / "model", train=root / "train.jsonl", heldout=root / "heldout.jsonl")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): _sha256(f) for f in sorted(root.rglob("*")) if f.is_file() and f.name != STAMP}


def is_complete(root: Path, params_json: dict, version: str = VERSION) -> tuple[bool, str]:
    """(complete, why not). Complete = stamp of this version and params, every file present and unchanged."""
    stamp_path = root / STAMP
    if not stamp_path.is_file():
        return False, "no stamp"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "unreadable stamp"
    if stamp.get("version") != version:
        return False, f"version {stamp.get('version')!r} != {version!r}"
    if stamp.get("params") != params_json:
        return False, "built with other parameters"
    files = stamp.get("files") or {}
    for rel, digest in files.items():
        f = root / rel
        if not f.is_file():
            return False, f"missing {rel}"
        if _sha256(f) != digest:
            return False, f"changed {rel}"
    p = paths_of(root)
    if not (p.model / "config.json").is_file() or not p.train.is_file() or not p.heldout.is_file():
        return False, "stamp lists too few files"
    return True, ""


class _Lock:
    """An exclusive advisory lock on a file next to the cache (POSIX flock)."""

    def __init__(self, path: Path, on_wait: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.on_wait = on_wait

    def __enter__(self) -> "_Lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.path.open("a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.on_wait()                  # say why nothing moves: a build elsewhere can take minutes
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


BUILTIN_MODELS = ("embedded", "embedded-small")   # model.path values this package builds itself


def ensure_builtin(name: str) -> EmbeddedPaths:
    """The cached build behind a ``model.path`` of ``BUILTIN_MODELS``, built on first use."""
    if name == "embedded":
        return ensure_embedded()
    if name == "embedded-small":
        from async_or1.embedded.small import ensure_small

        return ensure_small()
    raise ValueError(f"no built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")


def ensure_embedded(cache_dir: str | Path | None = None, force: bool = False, params=None,
                    log: Callable[[str], None] = print) -> EmbeddedPaths:
    """The embedded model and task, built (once) if needed. ``params``: a build.BuildParams
    (tests pass a smaller one); the default build is what every other command expects."""
    from async_or1.embedded.build import BuildParams, build

    return ensure_built(VERSION, params or BuildParams(), build, cache_dir, force, log)


def ensure_built(version: str, params, build: Callable, cache_dir: str | Path | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> EmbeddedPaths:
    """``<cache>/<version>``, built by ``build(dir, params, log) -> report`` unless a complete build
    of these params is there: in a temporary directory, under a file lock, renamed into place."""
    params_json = json.loads(json.dumps(params.to_json()))
    parent = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = parent / version
    ok, why = (False, "forced") if force else is_complete(root, params_json, version)
    if ok:
        return paths_of(root)
    with _Lock(parent / f".{version}.lock",
               lambda: log(f"[{version}] another process is building {root}; waiting for it")):
        if not force:                       # another process may have built it while we waited
            ok, why = is_complete(root, params_json, version)
            if ok:
                return paths_of(root)
        log(f"[{version}] building the model and task into {root} ({why}); this runs once")
        tmp = parent / f".{version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            report = build(tmp, params, log)
            stamp = {"version": version, "params": params_json, "files": _file_hashes(tmp), "report": report,
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
            if root.exists():
                old = parent / f".{version}.old-{os.getpid()}"
                root.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[{version}] done in {report['seconds']:.0f}s: held-out accuracy {report['heldout_accuracy_t1']:.2f} "
        f"at temperature 1")
    return paths_of(root)


def build_report(paths: EmbeddedPaths) -> dict:
    """The report stored with a build (SFT curve, held-out accuracy, timings)."""
    return json.loads((paths.root / STAMP).read_text()).get("report", {})
