"""The node's CBOR codec against cbor2 (the gateway's codec), in both directions.

Under CPython with hypothesis: our dumps -> cbor2.loads gives the value back, cbor2.dumps
(canonical and not) -> our loads gives the value back, and our bytes equal
cbor2.dumps(canonical=True) exactly: the same shortest heads and floats, and the same
length-first map key order. Then one MicroPython process decodes and re-encodes a seeded
batch of cbor2 encodings, which must come back as cbor2's canonical bytes.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import cbor2
import pytest
from edgeline.firmware.edgeline_node import cbor
from edgeline.firmware.edgeline_node.cbor import (
    UNDEFINED,
    CBORError,
    Simple,
    Tag,
    dumps,
    dumps_into,
    loads,
    loads_prefix,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropython_runner import run_micropython

# Tags cbor2 6.x turns into Python objects (datetimes, decimals, sets, shared and string
# references, ...), found by round-tripping CBORTag(t, 0 / b"" / "") for t < 65536 through
# cbor2. Generated Tag items avoid them so that cbor2 hands them back as plain CBORTag.
CBOR2_SEMANTIC_TAGS = frozenset(
    {0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799}
)
DEEP = 100  # max_depth for generated values, which may nest past the default 16
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- converting between our item types and cbor2's, and comparing strictly --------------


def to_cbor2(v: Any) -> Any:
    if isinstance(v, Tag):
        return cbor2.CBORTag(v.tag, to_cbor2(v.value))
    if isinstance(v, Simple):
        return cbor2.CBORSimpleValue(v.value)
    if v is UNDEFINED:
        return cbor2.undefined
    if isinstance(v, list | tuple):
        return [to_cbor2(x) for x in v]
    if isinstance(v, dict):
        return {to_cbor2(k): to_cbor2(x) for k, x in v.items()}
    return v


def from_cbor2(v: Any) -> Any:
    # cbor2 hands back a tag's containers immutable (tuple, frozendict): make them plain.
    if isinstance(v, cbor2.CBORTag):
        return Tag(v.tag, from_cbor2(v.value))
    if isinstance(v, cbor2.CBORSimpleValue):
        return Simple(v.value)
    if v is cbor2.undefined:
        return UNDEFINED
    if isinstance(v, list | tuple):
        return [from_cbor2(x) for x in v]
    if isinstance(v, dict | cbor2.frozendict):
        return {from_cbor2(k): from_cbor2(x) for k, x in v.items()}
    return v


def normal(v: Any) -> Any:
    """What our decoder gives back for v: tuples become lists."""
    if isinstance(v, list | tuple):
        return [normal(x) for x in v]
    if isinstance(v, dict):
        return {normal(k): normal(x) for k, x in v.items()}
    if isinstance(v, Tag):
        return Tag(v.tag, normal(v.value))
    return v


def same(a: Any, b: Any) -> bool:
    """Equal with types compared too (1 != 1.0 != True), NaN equal to NaN, -0.0 != 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        b_keys = {k: k for k in b}
        return len(a) == len(b) and all(
            k in b_keys and same(k, b_keys[k]) and same(v, b[k]) for k, v in a.items()
        )
    if isinstance(a, Tag):
        return a.tag == b.tag and same(a.value, b.value)
    return bool(a == b)


# --- strategies ------------------------------------------------------------------------

HEAD_BOUNDARIES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, 2**64 + 1]
ints = st.one_of(
    st.integers(),
    st.integers(-(2**130), 2**130),
    st.sampled_from(HEAD_BOUNDARIES + [-1 - n for n in HEAD_BOUNDARIES]),
)
floats = st.one_of(
    st.floats(),  # NaNs (any payload), infinities, subnormals
    st.floats(width=16),  # exactly representable as half: must encode in 3 bytes
    st.floats(width=32),
)
tag_numbers = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 300)).filter(
    lambda t: t not in CBOR2_SEMANTIC_TAGS
)
simples = st.builds(Simple, st.integers(0, 19) | st.integers(32, 255))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    st.text(),
    st.binary(),
    st.just(UNDEFINED),
    simples,
)
keys = st.one_of(ints, st.text(), st.binary(), st.floats(allow_nan=False), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=6),
        st.builds(Tag, tag_numbers, inner),
    ),
    max_leaves=25,
)


# --- properties --------------------------------------------------------------------------


@HYPOTHESIS
@given(values)
def test_our_encoding_is_cbor2_canonical_and_decodes_there(v: Any) -> None:
    ours = dumps(v)
    assert same(from_cbor2(cbor2.loads(ours)), normal(v))
    # Preferred serialization with length-first keys: byte for byte what the gateway writes.
    assert ours.hex() == cbor2.dumps(to_cbor2(v), canonical=True).hex()


@HYPOTHESIS
@given(values, st.booleans())
def test_cbor2_encodings_decode_to_the_value(v: Any, canonical: bool) -> None:
    encoded = cbor2.dumps(to_cbor2(v), canonical=canonical)
    decoded = loads(encoded, max_depth=DEEP)
    assert same(decoded, normal(v))
    # Whatever cbor2 wrote, re-encoding gives the canonical form.
    assert dumps(decoded) == cbor2.dumps(to_cbor2(v), canonical=True)


@HYPOTHESIS
@given(values)
def test_self_round_trip_and_dumps_into(v: Any) -> None:
    encoded = dumps(v)
    assert same(loads(encoded, max_depth=DEEP), normal(v))
    buf = bytearray(len(encoded) + 7)
    assert dumps_into(v, buf, 3) == 3 + len(encoded)
    assert bytes(buf[3 : 3 + len(encoded)]) == encoded
    assert buf[:3] == b"\0\0\0" and buf[3 + len(encoded) :] == b"\0\0\0\0"
    view = memoryview(bytearray(len(encoded)))
    assert dumps_into(v, view) == len(encoded) and bytes(view) == encoded
    if encoded:
        with pytest.raises(CBORError, match="buffer too small"):
            dumps_into(v, bytearray(len(encoded) - 1))


@settings(HYPOTHESIS, max_examples=100)
@given(values, values)
def test_loads_prefix_walks_a_concatenation(a: Any, b: Any) -> None:
    ea, eb = dumps(a), dumps(b)
    both = ea + eb
    va, end = loads_prefix(both, 0, max_depth=DEEP)
    assert same(va, normal(a)) and end == len(ea)
    vb, end = loads_prefix(memoryview(both), end, max_depth=DEEP)
    assert same(vb, normal(b)) and end == len(both)
    with pytest.raises(CBORError, match="trailing"):
        loads(both, max_depth=DEEP)


@given(st.integers(0, 1), st.integers(1, 2**52 - 1))
def test_every_nan_encodes_as_f97e00(sign: int, payload: int) -> None:
    nan = struct.unpack(">d", struct.pack(">Q", sign << 63 | 0x7FF << 52 | payload))[0]
    assert math.isnan(nan)
    assert dumps(nan) == b"\xf9\x7e\x00" == cbor2.dumps(nan, canonical=True)
    assert math.isnan(cbor2.loads(dumps(nan)))
    # NaN of any width and payload decodes to NaN.
    for enc in (
        struct.pack(">Bd", 0xFB, nan),
        b"\xfa" + struct.pack(">I", 0x7F800000 | (payload & 0x7FFFFF or 1) | sign << 31),
        b"\xf9" + struct.pack(">H", 0x7C00 | (payload & 0x3FF or 1) | sign << 15),
    ):
        assert math.isnan(loads(enc))


@given(st.floats(width=16, allow_nan=False))
def test_half_exact_floats_take_three_bytes(x: float) -> None:
    assert dumps(x)[:1] == b"\xf9" and len(dumps(x)) == 3
    assert same(loads(dumps(x)), x)


@given(st.floats(width=32, allow_nan=False))
def test_single_exact_floats_never_take_nine_bytes(x: float) -> None:
    assert len(dumps(x)) in (3, 5)
    assert same(loads(dumps(x)), x)


def strict_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def our_utf8(b: bytes) -> bool:
    try:
        cbor._check_utf8(memoryview(b))
    except CBORError:
        return False
    return True


def test_micropython_utf8_check_agrees_with_cpython_on_every_sequence_start() -> None:
    # MicroPython's own str() accepts overlongs and surrogates, so the codec checks UTF-8
    # itself there; it must accept exactly what CPython's strict decoder does. Every lead
    # byte with every second byte, then tails at the edges of the continuation range.
    tails = [b"", b"\x80", b"\xbf", b"\x80\x80", b"\xbf\xbf", b"\x80\x7f", b"\x80\xc0", b"\x80\x80\x80"]
    wrong = [
        seq.hex()
        for lead in range(256)
        for second in range(256)
        for tail in (tails if lead >= 0xC0 else tails[:1])
        for seq in [bytes([lead, second]) + tail, b"a" + bytes([lead, second]) + tail + b"z"]
        if our_utf8(seq) != strict_utf8(seq)
    ]
    assert not wrong, f"{len(wrong)} disagreements, e.g. {wrong[:10]}"


@settings(max_examples=300)
@given(st.text(max_size=8), st.binary(max_size=3), st.integers(0, 40))
def test_micropython_utf8_check_agrees_with_cpython_on_text(text: str, junk: bytes, at: int) -> None:
    b = text.encode()
    for candidate in (b, b[: at % (len(b) + 1)], b[: at % (len(b) + 1)] + junk + b[at % (len(b) + 1) :]):
        assert our_utf8(candidate) == strict_utf8(candidate), candidate.hex()


# --- the same under MicroPython ------------------------------------------------------------

INT_EDGES = [*HEAD_BOUNDARIES, 2**70, 2**128 + 5]
FLOAT_EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.5,
    65504.0,
    65520.0,
    2.0**-24,
    2.0**-25,
    2.0**-14,
    2.0**-149,
    3.4028234663852886e38,
    1e300,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    0.1,
]
CHARS = 'aZ09 "\\\n\x00\x7fü水𐅑\u2028\uffff\U0010ffff'


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(14 if depth < 4 else 9)
    if kind == 0:
        return rng.choice(INT_EDGES) * rng.choice([1, -1]) + rng.choice([0, 0, -1, 1])
    if kind == 1:
        return rng.getrandbits(rng.choice([4, 8, 16, 31, 32, 33, 63, 64, 65, 100])) * rng.choice([1, -1])
    if kind == 2:
        width = rng.choice(["e", "f", "d", "edge"])
        if width == "edge":
            return rng.choice(FLOAT_EDGES)
        return struct.unpack(">" + width, rng.randbytes(struct.calcsize(width)))[0]
    if kind == 3:
        return "".join(rng.choice(CHARS) for _ in range(rng.choice([0, 1, 5, 23, 24, 300])))
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 16, 23, 24, 255, 256, 1000]))
    if kind == 5:
        return rng.random() < 0.5
    if kind == 6:
        return None
    if kind == 7:
        return UNDEFINED
    if kind == 8:
        return Simple(rng.choice([0, 19, 32, 100, 255]))
    if kind == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 10:  # the wire format's maps: small uint keys
        return {rng.randrange(40): random_value(rng, depth + 1) for _ in range(rng.randrange(8))}
    if kind == 11:
        return {
            "".join(rng.choices("abcdef", k=rng.randrange(1, 5))): random_value(rng, depth + 1)
            for _ in range(rng.randrange(6))
        }
    if kind == 12:  # mixed keys: exercises the length-first sort
        pool = [-1, 24, 1000, -300, "b", "aa", b"\x00" * 30, b"", 1.5, 2**70, True, None]
        return {k: random_value(rng, depth + 1) for k in rng.sample(pool, rng.randrange(len(pool)))}
    tag = rng.choice([6, 24, 32, 1000, 2**32, 2**64 - 1])
    return Tag(tag, random_value(rng, depth + 1))


MICROPYTHON_REENCODE = """
import sys
from binascii import hexlify, unhexlify
from edgeline_node.cbor import dumps, loads
while True:
    line = sys.stdin.readline().strip()
    if not line:
        break
    try:
        print(hexlify(dumps(loads(unhexlify(line)))).decode())
    except Exception as e:
        print("ERR %s: %s" % (type(e).__name__, e))
"""


@pytest.mark.micropython
def test_micropython_decodes_and_reencodes_like_cbor2() -> None:
    rng = random.Random(20250401)
    cases = []  # (value, input encoding, expected re-encoding)
    for _ in range(300):
        v = random_value(rng)
        canonical = cbor2.dumps(to_cbor2(v), canonical=True)
        cases.append((v, canonical, canonical))
        cases.append((v, cbor2.dumps(to_cbor2(v)), canonical))  # floats as doubles, insertion order
    stdin = "".join(enc.hex() + "\n" for _, enc, _ in cases).encode()
    r = run_micropython(MICROPYTHON_REENCODE, stdin=stdin, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(cases), r.stdout.decode()[-2000:]
    wrong = [
        f"{v!r}\n  in:   {enc.hex()}\n  got:  {line}\n  want: {want.hex()}"
        for (v, enc, want), line in zip(cases, lines, strict=True)
        if line != want.hex()
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ under MicroPython:\n" + "\n".join(wrong[:10])
