"""CURVE keys of a run: one pair for the learner's ROUTER, one pair per generator.

Made at launch into ``<run_dir>/keys`` (or ahead of time with ``async-or1 keys`` for a multi-node
run, then copied to each node and named by ``transport.keys_dir``). Secret files are mode 0600 in
a 0700 directory, and loading refuses a secret that others can read. A generator needs
``server.key`` and its own ``generator-<i>.key`` / ``.key_secret``; the learner needs
``server.key_secret`` and every ``generator-<i>.key``. One pair per generator is what binds a
peer's identity (``gen-<i>``) to something it must hold: a process with generator 1's key cannot
speak as generator 0.

Files hold Z85 text (40 characters), as ``zmq.curve_keypair`` returns it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq


class CurveKeyError(RuntimeError):
    """Keys missing, malformed or readable by others: CURVE cannot be set up (never a fallback)."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveKeyError(f"transport.curve: this libzmq ({zmq.zmq_version()}) was built without CURVE; install a "
                        "pyzmq wheel with libsodium/tweetnacl (the PyPI wheels have it)")


def _write(path: Path, text: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text + b"\n")
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask may have narrowed it; never widened
    os.replace(tmp, path)


def make_keys(directory: str | os.PathLike, num_generators: int) -> Path:
    """Fresh key pairs for the learner and ``num_generators`` generators (replacing old ones)."""
    _require_curve()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    names = ["server"] + [f"generator-{g}" for g in range(int(num_generators))]
    for name in names:
        public, secret = zmq.curve_keypair()
        _write(d / f"{name}.key", public, 0o600)
        _write(d / f"{name}.key_secret", secret, 0o600)
    return d


def _read(path: Path, secret: bool) -> bytes:
    if not path.is_file():
        raise CurveKeyError(f"CURVE key file {path} is missing (make keys with `async-or1 keys --dir {path.parent} "
                        f"--generators N`, or let `async-or1 train` make them)")
    if secret:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise CurveKeyError(f"CURVE secret key {path} has mode {mode:04o}: others can read it (chmod 600 {path})")
    text = path.read_bytes().strip()
    if len(text) != 40:
        raise CurveKeyError(f"CURVE key file {path}: expected 40 Z85 characters, got {len(text)}")
    return text


def server_keys(directory: str | os.PathLike, num_generators: int) -> tuple[bytes, bytes, dict[bytes, int]]:
    """(server public, server secret, {generator public key (Z85): generator id}) for the learner."""
    _require_curve()
    d = Path(directory)
    clients = {_read(d / f"generator-{g}.key", False): g for g in range(int(num_generators))}
    if len(clients) != int(num_generators):
        raise CurveKeyError(f"{d}: two generators share a public key; remake the keys")
    return _read(d / "server.key", False), _read(d / "server.key_secret", True), clients


def generator_keys(directory: str | os.PathLike, generator_id: int) -> tuple[bytes, bytes, bytes]:
    """(server public, this generator's public, this generator's secret)."""
    _require_curve()
    d = Path(directory)
    name = f"generator-{int(generator_id)}"
    return _read(d / "server.key", False), _read(d / f"{name}.key", False), _read(d / f"{name}.key_secret", True)
