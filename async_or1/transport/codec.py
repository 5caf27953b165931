"""The wire codec: ``encode(msg) -> bytes`` and ``decode(data, max_bytes) -> msg``.

A frame is ``[u32 LE header length L][header][zero pad to 8][payload]``:
- header: msgpack {"type": class name, "schema": SCHEMA_VERSION, "body": {field: value}};
- an array in the header is {"__nd__": dtype str (little-endian, e.g. "<f4"), "shape": [..], "at": byte
  offset in the payload}; its bytes lie in the payload, each array 8-aligned, zero-padded to 8.
Arrays stay out of msgpack so that each crosses memory once per side: the sender copies every
array's bytes into the frame once (one ``bytes.join``), the receiver's arrays are read-only views
on the received frame (``np.frombuffer``), no copy. The payload must be tiled exactly by the
arrays the header names (no gap, overlap or trailing byte), so a truncated or padded frame fails.
Field specs: "int" (bool refused), "float" (an int is widened), "str", "bool", "json" (None,
bool, int, float, str, bytes, lists, str-keyed maps, arrays), ("nd", dtype) = a 1-D array of
exactly that dtype, ("list", spec), ("msg", class), ("map", spec) = str keys -> spec.
Specs are compiled once into per-field functions: a group of 16 samples costs about 0.1 ms of
Python per side (plus the sender's one copy), measured by bench/transport.py.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import fields
from typing import Any, Callable

import msgpack
import numpy as np

from async_or1.transport.messages import (MESSAGE_TYPES, SCHEMA_VERSION, Heartbeat, LeaseRequest, Prompt, PromptLease,
                                          ReturnLease, RolloutGroup, Sample, Shutdown, WeightGroupInit, WeightUpdate,
                                          WireError)

_ND = "__nd__"
_ND_KEYS = frozenset((_ND, "shape", "at"))
_ALIGN = 8
_ZEROS = bytes(_ALIGN)
_ENVELOPE_KEYS = frozenset(("type", "schema", "body"))
# Never object dtypes: unpacking must not be able to build arbitrary Python objects.
_ARRAY_DTYPES = {s: np.dtype(s) for s in ("|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8",
                                          "<f2", "<f4", "<f8")}
_I32, _F32 = ("nd", "<i4"), ("nd", "<f4")

_SPECS: dict[type, dict[str, Any]] = {
    Prompt: {"prompt_id": "str", "token_ids": _I32, "ability": "str", "ground_truth": "json", "stage": "int",
             "samples_per_prompt": "int", "max_response_tokens": "int", "sample_seed": "int"},
    LeaseRequest: {"generator_id": "int", "max_prompts": "int", "incarnation": "str"},
    PromptLease: {"lease_id": "int", "prompts": ("list", ("msg", Prompt)), "min_version": "int", "done": "bool",
                  "incarnation": "str"},
    ReturnLease: {"generator_id": "int", "lease_id": "int", "prompt_ids": ("list", "str")},
    Sample: {"tokens": _I32, "logprobs": _F32, "versions": _I32, "finish_reason": "str", "reward": "float",
             "reward_details": "json"},
    RolloutGroup: {"lease_id": "int", "prompt_id": "str", "stage": "int", "generator_id": "int",
                   "prompt_tokens": _I32, "samples": ("list", ("msg", Sample)), "timings": "json"},
    WeightUpdate: {"version": "int", "names": ("list", "str"), "dtypes": ("list", "str"),
                   "shapes": ("list", ("list", "int")), "bucket_bytes": "int", "layout": "str", "group_epoch": "int"},
    WeightGroupInit: {"epoch": "int", "master_address": "str", "master_port": "int", "world_size": "int",
                      "ranks": ("map", "int"), "group_name": "str", "backend": "str"},
    Heartbeat: {"generator_id": "int", "version": "int", "time": "float", "stats": "json"},
    Shutdown: {"reason": "str"},
}
_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES}
for _cls in MESSAGE_TYPES:  # a field added to a dataclass without a spec fails at import, not on the wire
    assert [f.name for f in fields(_cls)] == list(_SPECS[_cls]), f"messages.py: spec of {_cls.__name__} out of date"


def _check_sample(s: Sample) -> None:
    n = len(s.tokens)
    if len(s.logprobs) != n or len(s.versions) != n:
        raise WireError(f"tokens/logprobs/versions lengths differ ({n}/{len(s.logprobs)}/{len(s.versions)})")


def _check_weight_update(u: WeightUpdate) -> None:
    if not len(u.names) == len(u.dtypes) == len(u.shapes):
        raise WireError(f"names/dtypes/shapes lengths differ ({len(u.names)}/{len(u.dtypes)}/{len(u.shapes)})")


_CHECKS = {Sample: _check_sample, WeightUpdate: _check_weight_update}


def _describe(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"[:120]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- scalars: out = dataclass -> packable (lenient with numpy scalars), in = unpacked -> exact ----
def _int_out(v: Any) -> int:
    if type(v) is int or (_is_int(v) or isinstance(v, np.integer)):
        return int(v)
    raise WireError(f"expected int, got {_describe(v)}")


def _int_in(v: Any) -> int:
    if type(v) is int:
        return v
    raise WireError(f"expected int, got {_describe(v)}")


def _float_out(v: Any) -> float:
    if type(v) is float or _is_int(v) or isinstance(v, (float, np.floating, np.integer)):
        return float(v)
    raise WireError(f"expected float, got {_describe(v)}")


def _float_in(v: Any) -> float:
    if type(v) is float or type(v) is int:
        return float(v)
    raise WireError(f"expected float, got {_describe(v)}")


def _str(v: Any) -> str:
    if isinstance(v, str):
        return str(v)
    raise WireError(f"expected str, got {_describe(v)}")


def _bool(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise WireError(f"expected bool, got {_describe(v)}")


# ---- arrays ---------------------------------------------------------------------------------
def _pad(n: int) -> int:
    return -n % _ALIGN


def _prefix(header: bytes) -> bytes:
    """What precedes the payload: header length, header, zero padding to 8."""
    return len(header).to_bytes(4, "little") + header + _ZEROS[:_pad(4 + len(header))]


def _le_contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when its bytes already are one little-endian run (the common case), else a copy."""
    if a.flags.c_contiguous and a.dtype.byteorder != ">":
        return a
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(a.shape)  # (0-d comes back 1-d)


class _Frame:
    """Per-call state: encode's payload arrays, decode's payload view and the extents it read.
    The field functions reach it through ``_CURRENT`` (thread-local: inproc generators encode on
    several threads at once), so the compiled per-field functions keep one argument."""

    def __init__(self, payload: memoryview | None = None) -> None:
        self.arrays: list[np.ndarray] = []  # the non-empty arrays placed, in payload order
        self.size = 0
        self.payload = payload
        self.nbytes = 0 if payload is None else payload.nbytes
        self.extents: list[tuple[int, int]] = []

    def __enter__(self) -> _Frame:
        _CURRENT.frame = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.frame = None

    def place(self, a: np.ndarray) -> dict:
        """The reference to ``a`` (little-endian, C-contiguous: one flat run of bytes) in the header;
        its bytes go to the payload, in call order."""
        at, n = self.size, a.nbytes
        if n:  # an empty array has no bytes to place
            self.arrays.append(a)
            self.size += n + _pad(n)
        return {_ND: a.dtype.str, "shape": list(a.shape), "at": at}

    def parts(self) -> list:
        """The payload as buffers to join: each array's bytes, then its zero padding to 8."""
        out = []
        for a in self.arrays:
            out.append(a.data)
            if a.nbytes % _ALIGN:
                out.append(_ZEROS[:_pad(a.nbytes)])
        return out

    def array(self, d: Any, dtype: np.dtype | None) -> np.ndarray:
        """A header reference -> a read-only view on the payload (``dtype``: the 1-D dtype the field needs)."""
        if type(d) is not dict or d.keys() != _ND_KEYS:
            raise WireError(f"expected an array map with keys {sorted(_ND_KEYS)}, got {_describe(d)}")
        dt, shape, at = _ARRAY_DTYPES.get(d[_ND]) if type(d[_ND]) is str else None, d["shape"], d["at"]
        if dt is None or (dtype is not None and dt is not dtype):
            raise WireError(f"array dtype {d[_ND]!r} not allowed (expected {dtype.str if dtype else sorted(_ARRAY_DTYPES)})")
        if type(shape) is not list or not all(type(x) is int and x >= 0 for x in shape):
            raise WireError(f"bad array shape {shape!r}")
        if dtype is not None and len(shape) != 1:
            raise WireError(f"expected a 1-D array, got shape {shape}")
        count = math.prod(shape)
        need = count * dt.itemsize
        if type(at) is not int or at < 0 or at % _ALIGN or at + need > self.nbytes:
            raise WireError(f"array of {need} bytes at payload offset {at!r} is misplaced (payload has "
                            f"{self.nbytes} bytes, offsets are multiples of {_ALIGN})")
        return self.view(at, count, dt).reshape(shape)

    def view(self, at: int, count: int, dt: np.dtype) -> np.ndarray:
        """``count`` items of ``dt`` at payload offset ``at`` (already checked to fit), recorded for
        the tiling check; read-only, as the payload view is."""
        if count:
            self.extents.append((at, count * dt.itemsize))
        return np.frombuffer(self.payload, dtype=dt, count=count, offset=at)

    def check_tiling(self) -> None:
        cursor = 0
        for at, n in sorted(self.extents):
            if at != cursor:
                raise WireError(f"payload bytes {min(at, cursor)}..{max(at, cursor)} are "
                                f"{'shared by two arrays' if at < cursor else 'not any array'}")
            cursor = at + n + _pad(n)
        if cursor != self.nbytes:
            raise WireError(f"payload has {self.nbytes} bytes, its arrays cover {cursor}")


_CURRENT = threading.local()


def _nd_field(dtype: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    dt = _ARRAY_DTYPES[dtype]
    size = dt.itemsize

    def out(a: Any) -> dict:
        if type(a) is np.ndarray and a.dtype is dt and a.ndim == 1 and a.flags.c_contiguous:
            return _CURRENT.frame.place(a)  # the common case: no conversion
        if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.newbyteorder("<") == dt:
            return _CURRENT.frame.place(_le_contiguous(a))
        raise WireError(f"expected a 1-D {dt} array, got {getattr(a, 'dtype', type(a).__name__)} "
                        f"{getattr(a, 'shape', '')}")

    def inn(v: Any) -> np.ndarray:
        if type(v) is dict and len(v) == 3:  # fast path: a well-formed reference
            shape, at, frame = v.get("shape"), v.get("at"), _CURRENT.frame
            if (v.get(_ND) == dtype and type(shape) is list and len(shape) == 1 and type(at) is int
                    and type(shape[0]) is int and shape[0] >= 0 and at >= 0 and not at % _ALIGN
                    and at + shape[0] * size <= frame.nbytes):
                return frame.view(at, shape[0], dt)
        return _CURRENT.frame.array(v, dt)  # checks everything, raises with the precise reason

    return out, inn


# ---- JSON-like values -----------------------------------------------------------------------
def _json_out(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str) or k == _ND:
                raise WireError(f"map keys must be strings other than {_ND!r}, got {k!r}")
            try:
                out[k] = _json_out(x)
            except WireError as e:
                raise e.under(f".{k}") from None
        return out
    if isinstance(v, (list, tuple)):
        return _each(v, _json_out)
    if isinstance(v, np.ndarray):
        if v.dtype.newbyteorder("<").str not in _ARRAY_DTYPES:
            raise WireError(f"array dtype {v.dtype} cannot travel")
        return _CURRENT.frame.place(_le_contiguous(v))
    if isinstance(v, np.generic):
        return _json_out(v.item())
    raise WireError(f"{type(v).__name__} is not JSON-like")


def _json_in(v: Any) -> Any:
    if type(v) is dict:
        if _ND in v:
            return _CURRENT.frame.array(v, None)
        out = {}
        for k, x in v.items():
            try:
                out[k] = _json_in(x)
            except WireError as e:
                raise e.under(f".{k}") from None
        return out
    if type(v) is list:
        return _each(v, _json_in)
    return v  # msgpack yields only None/bool/int/float/str/bytes here (no ext hook is installed)


def _each(v: Any, f: Callable[[Any], Any]) -> list:
    try:
        return [f(x) for x in v]
    except WireError:
        for i, x in enumerate(v):  # error path only: find the element to name it
            try:
                f(x)
            except WireError as e:
                raise e.under(f"[{i}]") from None
        raise


# ---- compiling specs ------------------------------------------------------------------------
_ENC: dict[type, tuple] = {}   # class -> ((field, fn), ...)
_DEC: dict[type, tuple] = {}


def _msg_out(v: Any, cls: type) -> dict:
    if type(v) is not cls:
        raise WireError(f"expected {cls.__name__}, got {type(v).__name__}")
    out = {}
    for name, fn in _ENC[cls]:
        try:
            out[name] = fn(getattr(v, name))
        except WireError as e:
            raise e.under(f".{name}") from None
    if cls in _CHECKS:
        _CHECKS[cls](v)
    return out


def _msg_in(v: Any, cls: type) -> Any:
    if type(v) is not dict:
        raise WireError(f"expected a {cls.__name__} map, got {_describe(v)}")
    specs = _SPECS[cls]
    if v.keys() != specs.keys():
        missing, extra = sorted(specs.keys() - v.keys()), sorted(map(str, v.keys() - specs.keys()))
        raise WireError("; ".join(p for p in (missing and f"missing fields {missing}",
                                             extra and f"unknown fields {extra}") if p))
    kw = {}
    for name, fn in _DEC[cls]:
        try:
            kw[name] = fn(v[name])
        except WireError as e:
            raise e.under(f".{name}") from None
    obj = cls(**kw)
    if cls in _CHECKS:
        _CHECKS[cls](obj)
    return obj


def _compile(spec: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(encode fn, decode fn) for one field spec."""
    simple = {"int": (_int_out, _int_in), "float": (_float_out, _float_in), "str": (_str, _str),
              "bool": (_bool, _bool), "json": (_json_out, _json_in)}
    if isinstance(spec, str):
        return simple[spec]
    kind, sub = spec
    if kind == "nd":
        return _nd_field(sub)
    if kind == "msg":
        return (lambda v: _msg_out(v, sub)), (lambda v: _msg_in(v, sub))
    f_out, f_in = _compile(sub)
    if kind == "list":
        def list_out(v: Any) -> list:
            if not isinstance(v, (list, tuple)):
                raise WireError(f"expected a list, got {_describe(v)}")
            return _each(v, f_out)

        def list_in(v: Any) -> list:
            if type(v) is not list:
                raise WireError(f"expected a list, got {_describe(v)}")
            return _each(v, f_in)

        return list_out, list_in
    assert kind == "map", spec

    def map_fn(f: Callable[[Any], Any]) -> Callable[[Any], dict]:
        def run(v: Any) -> dict:
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise WireError(f"expected a map with string keys, got {_describe(v)}")
            out = {}
            for k, x in v.items():
                try:
                    out[k] = f(x)
                except WireError as e:
                    raise e.under(f".{k}") from None
            return out
        return run

    return map_fn(f_out), map_fn(f_in)


for _cls, _spec in _SPECS.items():
    _fns = {name: _compile(s) for name, s in _spec.items()}
    _ENC[_cls] = tuple((name, f[0]) for name, f in _fns.items())
    _DEC[_cls] = tuple((name, f[1]) for name, f in _fns.items())


# ---- arenas: a payload laid out by its producer -------------------------------------------------
_HEADROOM = 1 << 16  # bytes reserved in front of an arena's payload for the frame's header
_ARENAS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id(buffer) -> buffer
_LAYOUT: dict[int, tuple] = {}  # id(buffer) -> ((id, nbytes) of each non-empty view handed out, in order)


def arena(arrays: list, dtypes: list[str]) -> list[np.ndarray]:
    """``arrays`` (1-D array-likes) copied, as ``dtypes``, into one fresh buffer laid out exactly
    as a frame's payload (8-aligned, zero-padded, in this order) behind room for the header.

    The producer's list -> array conversion writes straight into the frame-to-be: ``encode`` of a
    message whose arrays are these views, in this order, writes its header into the room in front
    and sends the buffer as it is, so the sender copies nothing (the generator builds every
    RolloutGroup this way). Any other message, or another order, is encoded by copying as usual."""
    dts = [_ARRAY_DTYPES[d] for d in dtypes]
    sizes = [len(a) * dt.itemsize for a, dt in zip(arrays, dts)]
    buf = np.empty(_HEADROOM + sum(n + _pad(n) for n in sizes), np.uint8)
    out, at = [], _HEADROOM
    for a, dt, n in zip(arrays, dts, sizes):
        view = buf[at:at + n].view(dt)
        view[:] = a
        buf[at + n:at + n + _pad(n)] = 0
        out.append(view)
        at += n + _pad(n)
    _ARENAS[id(buf)] = buf
    _LAYOUT[id(buf)] = tuple((id(v), v.nbytes) for v in out if v.nbytes)
    weakref.finalize(buf, _LAYOUT.pop, id(buf), None)
    return out


def _in_arena(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The arena whose views ``arrays`` (payload order, empty ones left out) are, each in its own
    slot and in the arena's order, or None. By identity, not address: reading an address costs
    ~2 µs an array, comparing ids ~0.1."""
    base = arrays[0].base if arrays else None
    if base is None or _ARENAS.get(id(base)) is not base:
        return None
    layout = _LAYOUT.get(id(base), ())
    if len(layout) != len(arrays):
        return None
    for a, (ident, n) in zip(arrays, layout):
        if id(a) != ident or a.base is not base or a.nbytes != n:
            return None
    return base


# ---- the two entry points ---------------------------------------------------------------------
def encode(msg: Any) -> bytes | memoryview:
    """One message -> one frame. Validates like ``decode`` so a bad message fails at its sender.
    A message built on an ``arena`` comes back as a view of that arena (no copy), else as bytes."""
    cls = type(msg)
    if cls not in _SPECS:
        raise WireError(f"cannot encode {cls.__name__}: not a message type", kind="schema")
    try:
        with _Frame() as frame:
            body = _msg_out(msg, cls)
        header = msgpack.packb({"type": cls.__name__, "schema": SCHEMA_VERSION, "body": body}, use_bin_type=True)
    except WireError as e:
        raise e.under(cls.__name__) from None
    except (OverflowError, TypeError, ValueError, RecursionError) as e:  # e.g. an int beyond 64 bits
        raise WireError(f"cannot pack: {type(e).__name__}: {e}", where=cls.__name__) from e
    prefix = _prefix(header)
    buf = _in_arena(frame.arrays) if len(prefix) <= _HEADROOM else None
    if buf is not None:
        start = _HEADROOM - len(prefix)
        buf[start:_HEADROOM] = np.frombuffer(prefix, np.uint8)
        return memoryview(buf)[start:]
    return b"".join([prefix, *frame.parts()])


def decode(data: Any, max_bytes: int | None = None) -> Any:
    """One frame (bytes-like) -> one message, fully validated; WireError with the reason otherwise.
    Arrays are read-only views on ``data`` (which they keep alive); copy one to edit it."""
    view = memoryview(data).toreadonly()  # arrays are views on it: read-only even if the buffer is not
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = view.nbytes
    if max_bytes is not None and size > max_bytes:
        raise WireError(f"frame of {size} bytes exceeds the limit of {max_bytes}", kind="oversized")
    if size < 4:
        raise WireError(f"frame of {size} bytes has no header length")
    n = int.from_bytes(view[:4], "little")
    start = 4 + n + _pad(4 + n)
    if start > size:
        raise WireError(f"header of {n} bytes (payload from byte {start}) runs past the frame of {size} bytes")
    try:
        env = msgpack.unpackb(view[4:4 + n], raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError, UnicodeDecodeError...
        raise WireError(f"header is not msgpack ({n} bytes): {type(e).__name__}: {e}") from e
    if type(env) is not dict or env.keys() != _ENVELOPE_KEYS:
        raise WireError(f"not a message envelope (want keys {sorted(_ENVELOPE_KEYS)}): {_describe(env)}")
    if type(env["schema"]) is not int or env["schema"] != SCHEMA_VERSION:
        raise WireError(f"schema version {env['schema']!r} != {SCHEMA_VERSION}", kind="schema")
    cls = _BY_NAME.get(env["type"]) if isinstance(env["type"], str) else None
    if cls is None:
        raise WireError(f"unknown message type {env['type']!r}", kind="schema")
    try:
        with _Frame(view[start:]) as frame:
            msg = _msg_in(env["body"], cls)
        frame.check_tiling()  # after the fields, so a bad field is reported by its path first
        return msg
    except WireError as e:
        raise e.under(cls.__name__) from None
    except (RecursionError, TypeError, OverflowError, ValueError) as e:  # hostile nesting or sizes: never a crash
        raise WireError(f"{type(e).__name__}: {e}", where=cls.__name__) from e


def split(data: bytes) -> tuple[dict, bytes]:
    """A frame as (header map with array references left as maps, payload bytes): for tests and
    debugging tools that build or inspect frames by hand. No validation beyond the framing."""
    n = int.from_bytes(data[:4], "little")
    return msgpack.unpackb(data[4:4 + n], raw=False), bytes(data[4 + n + _pad(4 + n):])


def join(header: dict, payload: bytes = b"") -> bytes:
    """The inverse of ``split``: packs ``header`` as is (hand-made references included)."""
    return _prefix(msgpack.packb(header, use_bin_type=True)) + payload
