"""Wire format: bit-exact round trips of every message type, and precise rejection of bad frames."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import numpy as np
import pytest

from async_or1.transport import codec
from async_or1.transport import messages as m
from async_or1.transport.messages import SCHEMA_VERSION, WireError, decode, encode

SPECIALS = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, -3.4e38], dtype=np.float32)


def sample(n: int = 6, seed: int = 0) -> m.Sample:
    rng = np.random.default_rng(seed)
    lp = rng.standard_normal(n).astype(np.float32)
    lp[: min(n, len(SPECIALS))] = SPECIALS[: min(n, len(SPECIALS))]
    return m.Sample(tokens=rng.integers(0, 2**31 - 1, n, dtype=np.int32), logprobs=lp,
                    versions=np.sort(rng.integers(0, 5, n)).astype(np.int32), finish_reason="length", reward=0.25,
                    reward_details={"reason": "ok", "seconds": 0.5, "passed_tests": 3, "correct": False, "none": None,
                                    "nested": {"list": [1, "two", 3.0, [True]], "bytes": b"\x00\xff"}})


def prompt() -> m.Prompt:
    return m.Prompt(prompt_id="train:17@3", token_ids=np.arange(9, dtype=np.int32) - 4, ability="code",
                    ground_truth={"inputs": ["1 2\n"], "outputs": ["3\n"], "fn_name": None}, stage=1,
                    samples_per_prompt=4, max_response_tokens=4096)


EXAMPLES = [
    prompt(),
    m.LeaseRequest(generator_id=3, max_prompts=8),
    m.PromptLease(lease_id=12, prompts=[prompt(), dataclasses.replace(prompt(), prompt_id="x", ground_truth=["42"])],
                  min_version=7, done=False),
    m.PromptLease(lease_id=0, prompts=[], min_version=0, done=True),
    m.ReturnLease(generator_id=1, lease_id=12, prompt_ids=["a@1", "b@1"]),
    sample(),
    m.Sample(tokens=np.zeros(0, np.int32), logprobs=np.zeros(0, np.float32), versions=np.zeros(0, np.int32),
             finish_reason="aborted", reward=0.0),
    m.RolloutGroup(lease_id=12, prompt_id="train:17@3", stage=1, generator_id=3,
                   prompt_tokens=np.arange(5, dtype=np.int32), samples=[sample(6, 1), sample(0, 2), sample(33, 3)],
                   timings={"generate": 1.5, "score": 0.25}),
    m.WeightUpdate(version=4, names=["a.weight", "b.bias"], dtypes=["bfloat16", "float32"], shapes=[[3, 4], [4]],
                   bucket_bytes=1 << 28, layout="per_tensor", group_epoch=2),
    m.WeightGroupInit(epoch=2, master_address="10.0.0.1", master_port=29511, world_size=3, ranks={"0": 1, "1": 2}),
    m.Heartbeat(generator_id=2, version=9, time=1.7e9, stats={"incarnation": "123-4.5", "idle_s": 0.5,
                                                              "weights_fp": "ab" * 20}),
    m.Shutdown(reason="schedule finished"),
    m.Shutdown(),
]


def same(a, b) -> bool:
    """Deep equality, arrays compared by dtype, shape and raw bytes (so NaN payloads count)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_type_has_an_example():
    assert {type(x) for x in EXAMPLES} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip_bit_exact(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert same(msg, back), (msg, back)
    assert same(back, decode(memoryview(bytearray(data))))  # any buffer works (zmq frames are memoryviews)


def test_arrays_travel_as_raw_buffers_not_lists():
    s = sample(1000)
    data = encode(s)
    assert len(data) < 1000 * 12 + 600  # 12 bytes a token plus a small envelope
    header, payload = codec.split(data)
    ref = header["body"]["logprobs"]
    assert ref == {"__nd__": "<f4", "shape": [1000], "at": 4000}  # after the 4000 token bytes
    assert payload[4000:8000] == s.logprobs.tobytes() and len(payload) == 12_000
    assert int.from_bytes(data[:4], "little") + 4 + len(payload) <= len(data)


def test_frame_layout_by_hand():
    """The documented layout, built without the codec: [u32 L][header][pad to 8][payload]."""
    tokens = np.array([5, 6, 7], np.int32)
    body = {"tokens": {"__nd__": "<i4", "shape": [3], "at": 0}, "logprobs": {"__nd__": "<f4", "shape": [3], "at": 16},
            "versions": {"__nd__": "<i4", "shape": [3], "at": 32}, "finish_reason": "stop", "reward": 1.0,
            "reward_details": {}}
    header = msgpack.packb({"type": "Sample", "schema": SCHEMA_VERSION, "body": body})
    lead = len(header).to_bytes(4, "little") + header
    payload = (tokens.tobytes() + bytes(4) + np.full(3, -0.5, "<f4").tobytes() + bytes(4)
               + np.zeros(3, "<i4").tobytes() + bytes(4))
    back = decode(lead + bytes(-len(lead) % 8) + payload)
    assert same(back, m.Sample(tokens=tokens, logprobs=np.full(3, -0.5, np.float32), versions=np.zeros(3, np.int32),
                               finish_reason="stop", reward=1.0))
    assert encode(back) == lead + bytes(-len(lead) % 8) + payload  # and the codec writes exactly that


def test_received_arrays_are_read_only_views_on_the_frame():
    data = encode(EXAMPLES[7])
    back = decode(data)
    frame = np.frombuffer(data, np.uint8)
    for s in back.samples:
        assert not s.tokens.flags.writeable
        assert s.tokens.size == 0 or np.shares_memory(s.tokens, frame)  # no copy on receipt
    buf = bytearray(data)  # a writable buffer (zmq frames are) still gives read-only arrays
    assert not decode(memoryview(buf)).samples[0].logprobs.flags.writeable


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                   "float16", "float32", "float64", ">i4", ">f8"])
def test_json_arrays_any_plain_dtype_and_shape(dtype):
    rng = np.random.default_rng(1)
    arrs = [(rng.standard_normal((2, 3, 4)) * 100).astype(dtype), np.zeros((0, 5), dtype), np.array(7, dtype=dtype),
            (rng.standard_normal(10) * 100).astype(dtype)[::3]]
    hb = m.Heartbeat(generator_id=0, version=0, time=0.0, stats={"arrays": arrs})
    back = decode(encode(hb)).stats["arrays"]
    for a, b in zip(arrs, back):
        assert b.dtype == a.dtype.newbyteorder("<") and b.shape == a.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def test_decoded_arrays_do_not_alias_the_sender():
    s = sample()
    back = decode(encode(s))
    s.tokens[0] += 1
    assert back.tokens[0] != s.tokens[0]


def test_numpy_scalars_and_int_rewards_are_normalised_on_encode():
    hb = m.Heartbeat(generator_id=np.int64(3), version=1, time=5, stats={"x": np.float32(0.5), "n": np.int16(2)})
    back = decode(encode(hb))
    assert back.generator_id == 3 and type(back.generator_id) is int
    assert back.time == 5.0 and type(back.time) is float
    assert back.stats == {"x": 0.5, "n": 2}


# ---- the sender refuses what the receiver would refuse ----------------------------------------

@pytest.mark.parametrize("bad, needle", [
    (m.LeaseRequest(generator_id=True, max_prompts=1), "LeaseRequest.generator_id: expected int"),
    (m.LeaseRequest(generator_id=1.0, max_prompts=1), "LeaseRequest.generator_id: expected int"),
    (dataclasses.replace(sample(), tokens=np.arange(6, dtype=np.int64)), "Sample.tokens: expected a 1-D int32"),
    (dataclasses.replace(sample(), tokens=[1, 2, 3, 4, 5, 6]), "Sample.tokens: expected a 1-D int32"),
    (dataclasses.replace(sample(), versions=np.zeros(5, np.int32)), "lengths differ (6/6/5)"),
    (dataclasses.replace(sample(), reward_details={1: "x"}), "map keys must be strings"),
    (dataclasses.replace(sample(), reward_details={"o": object()}), "object is not JSON-like"),
    (dataclasses.replace(sample(), reward_details={"o": np.array(["s"])}), "cannot travel"),
    (m.WeightUpdate(version=1, names=["a"], dtypes=[], shapes=[[1]], bucket_bytes=1), "names/dtypes/shapes"),
    (m.WeightGroupInit(epoch=1, master_address="h", master_port=1, world_size=2, ranks={"0": "1"}),
     "WeightGroupInit.ranks.0: expected int"),
    (m.Heartbeat(generator_id=0, version=0, time=0.0, stats={"big": 2**70}), "cannot pack"),
    (m.PromptLease(lease_id=1, prompts=[m.LeaseRequest(0, 1)], min_version=0), "PromptLease.prompts[0]: expected Prompt"),
])
def test_encode_validates(bad, needle):
    with pytest.raises(WireError) as e:
        encode(bad)
    assert needle in str(e.value)


def test_encode_refuses_non_messages():
    with pytest.raises(WireError, match="not a message type"):
        encode({"type": "Shutdown"})


# ---- rejection on receipt -------------------------------------------------------------------

def envelope(msg) -> dict:
    """The header of ``msg``'s frame; arrays in it are payload references (see ``frame_of``)."""
    return codec.split(encode(msg))[0]


def pack(env, payload: bytes = b"") -> bytes:
    return codec.join(env, payload)


def repack(msg, edit) -> bytes:
    """``msg``'s frame with its header edited in place by ``edit(body)`` (payload unchanged)."""
    env, payload = codec.split(encode(msg))
    edit(env["body"])
    return pack(env, payload)


def rejects(data, kind: str, needle: str, max_bytes=None) -> None:
    with pytest.raises(WireError) as e:
        decode(data, max_bytes)
    assert e.value.kind == kind, (e.value.kind, str(e.value))
    assert needle in str(e.value), str(e.value)


def test_truncated_frames_all_rejected():
    data = encode(EXAMPLES[7])  # a RolloutGroup
    n = int.from_bytes(data[:4], "little")
    for cut in range(0, 4):
        rejects(data[:cut], "malformed", f"frame of {cut} bytes has no header length")
    for cut in range(4, 4 + n):
        rejects(data[:cut], "malformed", "runs past the frame")
    for cut in list(range(4 + n, len(data), 7)) + [len(data) - 1]:
        with pytest.raises(WireError) as e:
            decode(data[:cut])
        assert e.value.kind == "malformed" and ("runs past the frame" in str(e.value) or "misplaced" in str(e.value)
                                                or "arrays cover" in str(e.value)), str(e.value)


def test_trailing_and_gap_bytes_rejected():
    data = encode(m.Shutdown())
    rejects(data + bytes(8), "malformed", "payload has 8 bytes, its arrays cover 0")
    data = encode(EXAMPLES[5])  # a Sample: three arrays of 24 bytes each
    rejects(data + bytes(8), "malformed", "payload has 80 bytes, its arrays cover 72")
    rejects(repack(EXAMPLES[5], lambda b: b["logprobs"].update(at=32)), "malformed", "payload bytes 24..32 are not any array")
    rejects(repack(EXAMPLES[5], lambda b: b["logprobs"].update(at=16)), "malformed",
            "payload bytes 16..24 are shared by two arrays")
    rejects(repack(EXAMPLES[5], lambda b: b["logprobs"].update(at=4)), "malformed", "logprobs: array of 24 bytes at "
            "payload offset 4 is misplaced (payload has 72 bytes, offsets are multiples of 8)")
    rejects(repack(EXAMPLES[5], lambda b: b["versions"].update(at=56)), "malformed", "Sample.versions: array of 24 "
            "bytes at payload offset 56 is misplaced")


def test_random_bytes_never_escape_as_other_errors():
    rng = random.Random(0)
    good = encode(EXAMPLES[7])
    for i in range(600):
        if i % 3 == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif i % 3 == 1:  # random bytes behind a plausible header length
            n = rng.randint(0, 200)
            data = n.to_bytes(4, "little") + bytes(rng.getrandbits(8) for _ in range(rng.randint(n, n + 64)))
        else:  # flip a few bytes of a valid frame: exercises the validator behind msgpack
            buf = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
            data = bytes(buf)
        try:
            decode(data)
        except WireError:
            pass


def test_oversized():
    data = encode(EXAMPLES[7])
    rejects(data, "oversized", f"frame of {len(data)} bytes exceeds the limit of 100", max_bytes=100)
    assert same(decode(data, max_bytes=len(data)), EXAMPLES[7])


def test_wrong_schema_version_and_unknown_type():
    env = envelope(m.Shutdown())
    rejects(pack({**env, "schema": SCHEMA_VERSION + 1}), "schema", f"schema version {SCHEMA_VERSION + 1} != ")
    rejects(pack({**env, "schema": "1"}), "schema", "schema version '1'")
    rejects(pack({**env, "type": "Reboot"}), "schema", "unknown message type 'Reboot'")
    rejects(pack({**env, "type": 3}), "schema", "unknown message type 3")
    old = msgpack.packb(env)  # schema 1 frames were bare msgpack: their first bytes read as a huge length
    rejects(old, "malformed", "runs past the frame")


def test_not_an_envelope():
    rejects(pack([1, 2, 3]), "malformed", "not a message envelope")
    rejects(pack({"type": "Shutdown", "schema": 1}), "malformed", "not a message envelope")
    rejects(pack({**envelope(m.Shutdown()), "extra": 1}), "malformed", "not a message envelope")
    rejects(pack({1: 2}), "malformed", "header is not msgpack")  # non-string map keys refused by the unpacker


def test_missing_and_extra_fields():
    env = envelope(EXAMPLES[1])
    del env["body"]["max_prompts"]
    rejects(pack(env), "malformed", "LeaseRequest: missing fields ['max_prompts']")
    env = envelope(EXAMPLES[1])
    env["body"]["colour"] = "red"
    rejects(pack(env), "malformed", "LeaseRequest: unknown fields ['colour']")

    def drop_versions(body):
        del body["samples"][2]["versions"]
    rejects(repack(EXAMPLES[7], drop_versions), "malformed", "RolloutGroup.samples[2]: missing fields ['versions']")


def test_field_types_checked_on_receipt():
    cases = [
        (1, ("max_prompts",), 2.0, "LeaseRequest.max_prompts: expected int"),
        (1, ("max_prompts",), True, "LeaseRequest.max_prompts: expected int"),
        (1, ("generator_id",), "3", "LeaseRequest.generator_id: expected int"),
        (3, ("done",), 1, "PromptLease.done: expected bool"),
        (4, ("prompt_ids",), "a@1", "ReturnLease.prompt_ids: expected a list"),
        (4, ("prompt_ids", 1), 7, "ReturnLease.prompt_ids[1]: expected str"),
        (8, ("shapes", 0, 1), -1.5, "WeightUpdate.shapes[0][1]: expected int"),
        (9, ("ranks",), [1, 2], "WeightGroupInit.ranks: expected a map"),
        (10, ("time",), "now", "Heartbeat.time: expected float"),
        (7, ("samples", 0, "reward"), {"__nd__": "<f4", "shape": [1], "at": 0}, "samples[0].reward: expected float"),
    ]
    for idx, path, value, needle in cases:
        def edit(body):
            node = body
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
        with pytest.raises(WireError) as e:
            decode(repack(EXAMPLES[idx], edit))
        assert e.value.kind == "malformed" and needle in str(e.value), str(e.value)


def test_arrays_checked_on_receipt():
    def mutate(fn):
        return repack(EXAMPLES[7], lambda body: fn(body["samples"][0]))

    # 6 int32 tokens at payload offset 0: 24 bytes; as int64 they would need 48
    rejects(mutate(lambda s: s["tokens"].update({"__nd__": "<i8", "shape": [3]})),
            "malformed", "samples[0].tokens: array dtype '<i8' not allowed (expected <i4)")
    rejects(mutate(lambda s: s["logprobs"].update({"__nd__": "|O"})), "malformed",
            "samples[0].logprobs: array dtype '|O' not allowed")
    rejects(mutate(lambda s: s["tokens"].update({"shape": [2, 3]})), "malformed",
            "samples[0].tokens: expected a 1-D array, got shape [2, 3]")
    rejects(mutate(lambda s: s["tokens"].update({"shape": [-6]})), "malformed", "samples[0].tokens: bad array shape")
    rejects(mutate(lambda s: s["tokens"].update({"at": "0"})), "malformed", "samples[0].tokens: array of 24 bytes at "
            "payload offset '0' is misplaced")
    rejects(mutate(lambda s: s["tokens"].update({"extra": 1})), "malformed", "samples[0].tokens: expected an array map")
    rejects(mutate(lambda s: s["tokens"].pop("at")), "malformed", "samples[0].tokens: expected an array map")
    rejects(mutate(lambda s: s.update({"tokens": [1, 2, 3, 4, 5, 6]})), "malformed",
            "samples[0].tokens: expected an array map with keys ['__nd__', 'at', 'shape'], got list [1, 2, 3, 4, 5, 6]")

    def short_versions(s):  # 5 versions for 6 tokens, payload re-tiled so only the lengths disagree
        s["versions"]["shape"] = [5]
    data = mutate(short_versions)
    env, payload = codec.split(data)
    at = env["body"]["samples"][0]["versions"]["at"]
    payload = payload[:at] + payload[at:at + 20] + bytes(4) + payload[at + 24:]
    rejects(pack(env, payload), "malformed",
            "RolloutGroup.samples[0]: tokens/logprobs/versions lengths differ (6/6/5)")

    def bad_detail(s):  # json fields: a malformed array inside details is caught, with its path
        s["reward_details"]["arr"] = {"__nd__": "<f8", "shape": [2], "at": 10**6}
    rejects(mutate(bad_detail), "malformed", "samples[0].reward_details.arr: array of 16 bytes at payload offset "
            "1000000 is misplaced")


@pytest.mark.parametrize("depth, needle", [(600, "RecursionError"), (5000, "StackError")])
def test_hostile_nesting_is_a_wire_error(depth, needle):
    """Deep nesting inside a JSON field: refused by msgpack's stack limit or by our walk's recursion guard."""
    def pack(v):
        return msgpack.packb(v, use_bin_type=True)
    header = (b"\x83" + pack("type") + pack("Heartbeat") + pack("schema") + pack(SCHEMA_VERSION) + pack("body")
            + b"\x84" + pack("generator_id") + pack(0) + pack("version") + pack(0) + pack("time") + pack(0.0)
            + pack("stats") + b"\x81" + pack("d") + b"\x91" * depth + b"\x90")  # [[[...[]...]]]
    lead = len(header).to_bytes(4, "little") + header
    rejects(lead + bytes(-len(lead) % 8), "malformed", needle)


# ---- arenas: the producer lays the payload out, encode copies nothing ----------------------------

def _arena_group(details=None, order=None):
    rng = np.random.default_rng(5)
    toks = [rng.integers(0, 1000, n, dtype=np.int32) for n in (5, 0, 7)]
    lps = [(-rng.random(len(t))).astype(np.float32) for t in toks]
    arrays = [np.arange(3, dtype=np.int32)] + [x for t, lp in zip(toks, lps) for x in (t, lp, np.full(len(t), 3, np.int32))]
    dtypes = ["<i4"] + ["<i4", "<f4", "<i4"] * 3
    views = codec.arena(arrays, dtypes)
    if order is not None:
        views = [views[i] for i in order]
    samples = [m.Sample(tokens=views[1 + 3 * i], logprobs=views[2 + 3 * i], versions=views[3 + 3 * i],
                        finish_reason="stop", reward=1.0, reward_details=details or {"x": 1}) for i in range(3)]
    arena_msg = m.RolloutGroup(lease_id=1, prompt_id="a@1.0", stage=0, generator_id=0, prompt_tokens=views[0],
                               samples=samples, timings={"t": 1.0})
    plain = m.RolloutGroup(lease_id=1, prompt_id="a@1.0", stage=0, generator_id=0,
                           prompt_tokens=np.array(views[0]), samples=[dataclasses.replace(
                               s, tokens=np.array(s.tokens), logprobs=np.array(s.logprobs),
                               versions=np.array(s.versions)) for s in samples], timings={"t": 1.0})
    return arena_msg, plain


def test_arena_group_is_sent_in_place_and_byte_identical():
    arena_msg, plain = _arena_group()
    data = encode(arena_msg)
    assert isinstance(data, memoryview)  # a view of the arena: no copy of the arrays
    assert np.shares_memory(np.frombuffer(data, np.uint8), arena_msg.samples[0].tokens)
    assert bytes(data) == encode(plain)  # the same frame the copying path builds
    assert same(decode(data), plain) and bytes(encode(arena_msg)) == bytes(data)  # re-encoding is stable


def test_arena_fallbacks_copy_and_never_write_into_someone_elses_bytes():
    arena_msg, plain = _arena_group()
    before = np.array(arena_msg.prompt_tokens.base)  # the whole arena
    one = encode(arena_msg.samples[2])  # arrays inside the arena, not from its payload start
    assert isinstance(one, bytes) and same(decode(one), plain.samples[2])
    assert np.array_equal(arena_msg.prompt_tokens.base, before)  # nothing written in front of them
    swapped, plain = _arena_group(order=[0, 7, 8, 9, 4, 5, 6, 1, 2, 3])  # samples 0 and 2 trade places
    assert isinstance(encode(swapped), bytes) and same(decode(encode(swapped)), plain)
    big, plain = _arena_group(details={"log": "x" * 70_000})  # header larger than the room in front
    assert isinstance(encode(big), bytes) and same(decode(encode(big)), plain)
