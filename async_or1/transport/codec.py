"""The wire codec: ``encode(msg) -> bytes`` and ``decode(data, max_bytes) -> msg``.

Envelope: {"type": class name, "schema": SCHEMA_VERSION, "body": {field: value}}.
An array is {"__nd__": dtype str (little-endian, e.g. "<f4"), "shape": [..], "data": bin}.
Field specs: "int" (bool refused), "float" (an int is widened), "str", "bool", "json" (None,
bool, int, float, str, bytes, lists, str-keyed maps, arrays), ("nd", dtype) = a 1-D array of
exactly that dtype, ("list", spec), ("msg", class), ("map", spec) = str keys -> spec.
Specs are compiled once into per-field functions: a group of 16 samples is validated in
about 0.1 ms, so the wire is dominated by memory traffic, not Python (bench/transport.py).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable

import msgpack
import numpy as np

from async_or1.transport.messages import (MESSAGE_TYPES, SCHEMA_VERSION, Heartbeat, LeaseRequest, Prompt, PromptLease,
                                          ReturnLease, RolloutGroup, Sample, Shutdown, WeightGroupInit, WeightUpdate,
                                          WireError)

_ND = "__nd__"
_ND_KEYS = frozenset((_ND, "shape", "data"))
_ENVELOPE_KEYS = frozenset(("type", "schema", "body"))
# Never object dtypes: unpacking must not be able to build arbitrary Python objects.
_ARRAY_DTYPES = {s: np.dtype(s) for s in ("|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8",
                                          "<f2", "<f4", "<f8")}
_I32, _F32 = ("nd", "<i4"), ("nd", "<f4")

_SPECS: dict[type, dict[str, Any]] = {
    Prompt: {"prompt_id": "str", "token_ids": _I32, "ability": "str", "ground_truth": "json", "stage": "int",
             "samples_per_prompt": "int", "max_response_tokens": "int"},
    LeaseRequest: {"generator_id": "int", "max_prompts": "int"},
    PromptLease: {"lease_id": "int", "prompts": ("list", ("msg", Prompt)), "min_version": "int", "done": "bool"},
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
def _nd_out(a: np.ndarray) -> dict:
    flat = np.ascontiguousarray(a.reshape(-1), dtype=a.dtype.newbyteorder("<"))
    # The array's own buffer packs as msgpack bin with one copy (into the packer), no tobytes().
    return {_ND: flat.dtype.str, "shape": list(a.shape), "data": flat.data}


def _nd_in(v: Any, dtype: str | None) -> np.ndarray:
    if type(v) is not dict or v.keys() != _ND_KEYS:
        raise WireError(f"expected an array map with keys {sorted(_ND_KEYS)}, got {_describe(v)}")
    dt, shape, data = v[_ND], v["shape"], v["data"]
    if not isinstance(dt, str) or dt not in _ARRAY_DTYPES or (dtype is not None and dt != dtype):
        raise WireError(f"array dtype {dt!r} not allowed (expected {dtype or sorted(_ARRAY_DTYPES)})")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise WireError(f"bad array shape {shape!r}")
    if dtype is not None and len(shape) != 1:
        raise WireError(f"expected a 1-D array, got shape {shape}")
    if type(data) is not bytes:
        raise WireError(f"array data must be bin, got {type(data).__name__}")
    need = math.prod(shape) * _ARRAY_DTYPES[dt].itemsize
    if len(data) != need:
        raise WireError(f"array data has {len(data)} bytes, shape {shape} of {dt} needs {need}")
    return np.frombuffer(data, dtype=_ARRAY_DTYPES[dt]).reshape(shape)  # read-only view on the bytes, no copy


def _nd_field(dtype: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    dt = _ARRAY_DTYPES[dtype]
    size = dt.itemsize

    def out(a: Any) -> dict:
        if type(a) is np.ndarray and a.dtype.str == dtype and a.ndim == 1 and a.flags.c_contiguous:
            return {_ND: dtype, "shape": [a.shape[0]], "data": a.data}  # the common case, no conversion
        if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.newbyteorder("<") == dt:
            return _nd_out(a)  # strided or big-endian: one conversion
        raise WireError(f"expected a 1-D {dt} array, got {getattr(a, 'dtype', type(a).__name__)} "
                        f"{getattr(a, 'shape', '')}")

    def inn(v: Any) -> np.ndarray:
        if type(v) is dict and v.keys() == _ND_KEYS:
            shape, data = v["shape"], v["data"]
            if (v[_ND] == dtype and type(shape) is list and len(shape) == 1 and type(shape[0]) is int
                    and type(data) is bytes and len(data) == shape[0] * size and shape[0] >= 0):
                return np.frombuffer(data, dtype=dt)
        return _nd_in(v, dtype)  # raises with the precise reason

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
        return _nd_out(v)
    if isinstance(v, np.generic):
        return _json_out(v.item())
    raise WireError(f"{type(v).__name__} is not JSON-like")


def _json_in(v: Any) -> Any:
    if type(v) is dict:
        if _ND in v:
            return _nd_in(v, None)
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


# ---- the two entry points ---------------------------------------------------------------------
def encode(msg: Any) -> bytes:
    """One message -> one frame. Validates like ``decode`` so a bad message fails at its sender."""
    cls = type(msg)
    if cls not in _SPECS:
        raise WireError(f"cannot encode {cls.__name__}: not a message type", kind="schema")
    try:
        body = _msg_out(msg, cls)
        return msgpack.packb({"type": cls.__name__, "schema": SCHEMA_VERSION, "body": body}, use_bin_type=True)
    except WireError as e:
        raise e.under(cls.__name__) from None
    except (OverflowError, TypeError, ValueError, RecursionError) as e:  # e.g. an int beyond 64 bits
        raise WireError(f"cannot pack: {type(e).__name__}: {e}", where=cls.__name__) from e


def decode(data: Any, max_bytes: int | None = None) -> Any:
    """One frame (bytes-like) -> one message, fully validated; WireError with the reason otherwise.
    Arrays are read-only views on the unpacked bytes (copy before editing in place)."""
    size = memoryview(data).nbytes
    if max_bytes is not None and size > max_bytes:
        raise WireError(f"frame of {size} bytes exceeds the limit of {max_bytes}", kind="oversized")
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError, UnicodeDecodeError...
        raise WireError(f"not a msgpack frame ({size} bytes): {type(e).__name__}: {e}") from e
    if type(env) is not dict or env.keys() != _ENVELOPE_KEYS:
        raise WireError(f"not a message envelope (want keys {sorted(_ENVELOPE_KEYS)}): {_describe(env)}")
    if type(env["schema"]) is not int or env["schema"] != SCHEMA_VERSION:
        raise WireError(f"schema version {env['schema']!r} != {SCHEMA_VERSION}", kind="schema")
    cls = _BY_NAME.get(env["type"]) if isinstance(env["type"], str) else None
    if cls is None:
        raise WireError(f"unknown message type {env['type']!r}", kind="schema")
    try:
        return _msg_in(env["body"], cls)
    except WireError as e:
        raise e.under(cls.__name__) from None
    except (RecursionError, TypeError, OverflowError, ValueError) as e:  # hostile nesting or sizes: never a crash
        raise WireError(f"{type(e).__name__}: {e}", where=cls.__name__) from e
