"""Length-prefixed JSON frames over pipes (math workers <-> pool).

A frame is a 4-byte big-endian length then that many bytes of UTF-8 JSON. The reader is
incremental (fed whatever ``os.read`` returned) so the parent can multiplex many workers with
``selectors`` and never block on a half-written frame from a worker that is being killed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 << 20


def encode_frame(obj: Any) -> bytes:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, n: int) -> bytes | None:
    """Blocking read of exactly n bytes; None on EOF (the peer went away)."""
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame_blocking(fd: int) -> Any | None:
    head = read_exact(fd, _HEADER.size)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if n > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
    body = read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body.decode("utf-8", "surrogatepass"))


class FrameReader:
    """Accumulates bytes; ``frames()`` yields every complete frame received so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Any]:
        out = []
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
            if len(self._buf) < _HEADER.size + n:
                break
            body = bytes(self._buf[_HEADER.size:_HEADER.size + n])
            del self._buf[:_HEADER.size + n]
            out.append(json.loads(body.decode("utf-8", "surrogatepass")))
        return out
