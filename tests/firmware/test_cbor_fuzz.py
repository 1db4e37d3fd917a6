"""Bad input to the node's CBOR codec: fuzzed bytes, deep nesting, huge declared lengths.

The decoder may succeed or raise CBORError, nothing else; what it decodes it can encode
again, to bytes that decode to the same value. The same seeded cases run under CPython and
in one MicroPython process, and the two interpreters must agree on every one.
"""

from __future__ import annotations

import json
import math
import random
import time
import tracemalloc
from typing import Any

import pytest
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
from hypothesis import given, settings
from hypothesis import strategies as st

from micropython_runner import run_micropython

# Valid encodings to mutate: a node event, the shapes of RFC 8949 Appendix A (indefinite
# lengths included), and the edges of every head size.
SEEDS_HEX = [
    "1bffffffffffffffff",
    "3bffffffffffffffff",
    "c249010000000000000000",
    "c349010000000000000000",
    "f97bff",
    "fa47c35000",
    "fb7e37e43c8800759c",
    "f90001",
    "f97e00",
    "f9fc00",
    "f818",
    "f8ff",
    "c074323031332d30332d32315432303a30343a30305a",
    "c1fb41d452d9ec200000",
    "d74401020304",
    "64f0908591",
    "8301820203820405",
    "a26161016162820203",
    "5f42010243030405ff",
    "7f657374726561646d696e67ff",
    "9f018202039f0405ffff",
    "bf61610161629f0203ffff",
    "826161bf61626163ff",
    "bf6346756ef563416d7421ff",
    "9f9fffff",
    "d9d9f7a0",
]
EVENT = {
    0: 1,
    1: 1,
    2: "node-1",
    3: 7,
    4: 123456,
    5: bytes(range(16)),
    6: bytes(range(8)),
    7: 1735689600123456,
    8: 987654321,
    10: {"vib": [0.01, 1.25, 1.2500001, 3.5, 2.8], "temp": [41.5, 0.0, 41.5, 42.0, 1.0]},
    11: {"vib": 0.75, "temp": float("nan")},
    12: False,
    13: [],
    14: "spc",
}
SEEDS = [bytes.fromhex(h) for h in SEEDS_HEX] + [
    dumps(EVENT),
    dumps([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1, -25, -(2**64), 2**70]),
    dumps({"k": b"x" * 30, "t": "ü水𐅑" * 9, "u": UNDEFINED, "s": Simple(7), "g": Tag(1000, [None, True])}),
]
INTERESTING = [
    0x00,
    0x17,
    0x18,
    0x19,
    0x1A,
    0x1B,
    0x1F,
    0x20,
    0x3B,
    0x40,
    0x5B,
    0x5F,
    0x60,
    0x7B,
    0x7F,
    0x80,
    0x9B,
    0x9F,
    0xA0,
    0xBB,
    0xBF,
    0xC2,
    0xC3,
    0xD8,
    0xF7,
    0xF8,
    0xF9,
    0xFB,
    0xFF,
    0x80,
    0xC0,
    0xED,
]


def mutate(rng: random.Random, b: bytes) -> bytes:
    n = len(b)
    op = rng.randrange(8)
    if op == 0:  # flip 1-3 bits
        out = bytearray(b)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if op == 1:  # truncate
        return b[: rng.randrange(n)]
    if op == 2:  # insert random or interesting bytes
        i = rng.randrange(n + 1)
        ins = bytes(
            rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
            for _ in range(rng.randint(1, 4))
        )
        return b[:i] + ins + b[i:]
    if op == 3:  # overwrite one byte with an interesting one
        i = rng.randrange(n)
        return b[:i] + bytes([rng.choice(INTERESTING)]) + b[i + 1 :]
    if op == 4:  # delete a range
        i = rng.randrange(n)
        return b[:i] + b[i + rng.randint(1, 4) :]
    if op == 5:  # splice two seeds
        other = rng.choice(SEEDS)
        return b[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :]
    if op == 6:  # duplicate a segment
        i = rng.randrange(n)
        j = rng.randrange(i, n + 1)
        return b[:j] + b[i:j] + b[j:]
    return b + bytes([rng.randrange(256)])  # append (trailing bytes)


def fuzz_cases(seed: int, n_mutations: int, n_random: int) -> list[bytes]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n_mutations):
        b = rng.choice(SEEDS)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            b = mutate(rng, b) if b else b
        cases.append(b)
    cases += [rng.randbytes(rng.randrange(33)) for _ in range(n_random)]
    return cases


def same(a: Any, b: Any) -> bool:
    """Equal with types compared too, NaN equal to NaN, -0.0 != 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
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


def outcome(b: bytes) -> str:
    """'OK <re-encoding>' or 'CBORError'; anything else escapes and fails the test."""
    try:
        obj = loads(b)
    except CBORError:
        return "CBORError"
    again = dumps(obj)
    assert same(loads(again), obj), f"{b.hex()} decoded to {obj!r}, which does not survive dumps/loads"
    return "OK " + again.hex()


def test_fuzzed_input_raises_only_cbor_error() -> None:
    cases = fuzz_cases(seed=8949, n_mutations=16000, n_random=4000)
    t0 = time.perf_counter()
    escaped = []
    counts = {"OK": 0, "CBORError": 0}
    for b in cases:
        try:
            counts[outcome(b).split()[0]] += 1
        except AssertionError:
            raise
        except Exception as e:  # anything but CBORError is the bug this test exists to find
            escaped.append(f"{b.hex()}: {type(e).__name__}: {e}")
        for off in (0, len(b) // 2):  # loads_prefix at any offset: same rule
            try:
                loads_prefix(b, off)
            except CBORError:
                pass
            except Exception as e:
                escaped.append(f"loads_prefix({b.hex()}, {off}): {type(e).__name__}: {e}")
    assert not escaped, f"{len(escaped)} of {len(cases)} escaped as non-CBORError:\n" + "\n".join(
        escaped[:20]
    )
    # Both outcomes must be well represented, or the fuzzing tests nothing.
    assert counts["OK"] > 1000 and counts["CBORError"] > 10000, counts
    assert time.perf_counter() - t0 < 10


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_cbor_error(b: bytes) -> None:
    for buf in (b, bytearray(b), memoryview(b)):
        try:
            obj = loads(buf)
        except CBORError:
            continue
        assert same(loads(dumps(obj)), obj)


@pytest.mark.parametrize(
    "prefix",
    [b"\x81", b"\x9f", b"\xc6", b"\xa1\x00", b"\xbf\x00", b"\xd9\xd9\xf7"],
    ids=["array", "indefinite-array", "tag", "map", "indefinite-map", "self-describe-tag"],
)
@pytest.mark.parametrize("max_depth", [16, 10**6])
def test_deep_nesting_is_a_cbor_error_not_a_crash(prefix: bytes, max_depth: int) -> None:
    # With a huge max_depth the interpreter's own recursion limit is what stops it; that too
    # must surface as CBORError, never RecursionError.
    data = prefix * 10000 + b"\x00"
    t0 = time.perf_counter()
    with pytest.raises(CBORError, match="nest"):
        loads(data, max_depth=max_depth)
    assert time.perf_counter() - t0 < 2


def test_depth_limit_is_exact() -> None:
    assert loads(b"\x81" * 16 + b"\x00") == loads(b"\x81" * 16 + b"\x00", max_depth=16)
    with pytest.raises(CBORError, match="max_depth=16"):
        loads(b"\x81" * 17 + b"\x00")
    assert loads(b"\x81" * 17 + b"\x00", max_depth=17)
    assert loads(b"\x00", max_depth=0) == 0
    with pytest.raises(CBORError):
        loads(b"\x80", max_depth=0)


HUGE = [
    b"\x5b" + b"\xff" * 8,  # byte string of 2**64-1 bytes
    b"\x7b" + b"\xff" * 8,
    b"\x9b" + b"\xff" * 8,  # array of 2**64-1 items
    b"\xbb" + b"\xff" * 8,
    b"\x5a\xff\xff\xff\xff" + b"\x00" * 100,
    b"\x9b\x80" + b"\x00" * 7 + b"\x00" * 100,  # 2**63 items, 100 bytes present
    b"\xbb\x00\x00\x00\x00\x00\x00\x00\x33" + b"\x00" * 100,  # 51 pairs need 102 bytes
    b"\x5f\x5b" + b"\xff" * 8 + b"\xff",  # the same inside an indefinite string's chunk
    b"\x9f" + b"\x5b" + b"\xff" * 8,
    b"\xc2\x5b" + b"\xff" * 8,  # a bignum claiming 2**64-1 bytes
]


@pytest.mark.parametrize("data", HUGE, ids=[d[:2].hex() for d in HUGE])
def test_huge_declared_length_fails_fast_without_allocating(data: bytes) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CBORError, match="truncated"):
            loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 0.5
    assert peak < 64 * 1024, f"{peak} bytes allocated for a {len(data)}-byte input"


def test_decoding_accepts_every_bytes_like_and_rejects_the_rest() -> None:
    enc = dumps({1: [b"ab", "cd"]})
    for buf in (enc, bytearray(enc), memoryview(enc), memoryview(b"xx" + enc)[2:]):
        assert loads(buf) == {1: [b"ab", "cd"]}
        assert isinstance(loads(buf)[1][0], bytes)  # never a view into the caller's buffer
    for bad in ("a0", None, 5, [0xA0]):
        with pytest.raises(CBORError, match="expected bytes"):
            loads(bad)  # type: ignore[arg-type]
    with pytest.raises(CBORError, match="offset"):
        loads_prefix(enc, len(enc) + 1)
    with pytest.raises(CBORError, match="truncated"):
        loads_prefix(enc, len(enc))


def test_bad_values_for_the_encoder_raise_cbor_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)

    def nested(n: int) -> Any:
        v: Any = 0
        for _ in range(n):
            v = [v]
        return v

    deep = nested(65)  # the encoder's limit is 64 levels
    bad: list[Any] = [
        {1, 2},
        object(),
        1j,
        cyclic,
        deep,
        "\ud800",
        {"k": "\udfff"},
        Tag(-1, 0),
        Tag(2**64, 0),
        Tag("1", 0),
        Tag(True, 0),
        {float("nan"): 1, -float("nan"): 2},
    ]
    for v in bad:
        with pytest.raises(CBORError):
            dumps(v)
    for value in (20, 23, 24, 31, 256, -1, "1", True):
        with pytest.raises(CBORError, match="simple value"):
            Simple(value)
    with pytest.raises(CBORError, match="bytearray or memoryview"):
        dumps_into(1, b"\x00\x00")  # type: ignore[arg-type]
    with pytest.raises(CBORError, match="offset"):
        dumps_into(1, bytearray(2), 3)
    with pytest.raises(CBORError, match="buffer too small"):
        dumps_into("abc", bytearray(3))
    assert dumps(nested(64)) == b"\x81" * 64 + b"\x00"
    assert issubclass(CBORError, ValueError)


MICROPYTHON_FUZZ = """
import sys
from binascii import hexlify, unhexlify
from edgeline_node.cbor import CBORError, dumps, loads
while True:
    line = sys.stdin.readline().strip()
    if not line:
        break
    b = unhexlify(line[1:])  # each line is "x<hex>" so that empty inputs survive
    try:
        obj = loads(b)
    except CBORError:
        print("CBORError")
        continue
    except Exception as e:
        print("OTHER %s: %s" % (type(e).__name__, e))
        continue
    try:
        again = dumps(obj)
        if dumps(loads(again)) != again:
            print("OTHER re-encoding is not stable")
        else:
            print("OK " + hexlify(again).decode())
    except Exception as e:
        print("OTHER re-encoding: %s: %s" % (type(e).__name__, e))
"""


@pytest.mark.micropython
def test_micropython_fuzz_agrees_with_cpython() -> None:
    cases = (
        fuzz_cases(seed=7049, n_mutations=1600, n_random=400)
        + HUGE
        + [p * 3000 + b"\x00" for p in (b"\x81", b"\x9f", b"\xc6", b"\xa1\x00")]
    )
    stdin = "".join("x" + b.hex() + "\n" for b in cases).encode()
    # A microcontroller-sized heap: a decoder that pre-sized from a declared length, or
    # recursed without a bound, would fail here.
    r = run_micropython(MICROPYTHON_FUZZ, stdin=stdin, heapsize="256k", timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    got = r.stdout.decode().splitlines()
    assert len(got) == len(cases), r.stdout.decode()[-2000:]
    other = [f"{b.hex()}: {line}" for b, line in zip(cases, got, strict=True) if line.startswith("OTHER")]
    counts = {k: sum(line.split()[0] == k for line in got) for k in ("OK", "CBORError", "OTHER")}
    assert not other, f"{counts}: non-CBORError outcomes under MicroPython:\n" + "\n".join(other[:20])
    disagree = [
        f"{b.hex()}: micropython {line!r}, cpython {outcome(b)!r}"
        for b, line in zip(cases, got, strict=True)
        if line != outcome(b)
    ]
    assert not disagree, f"{len(disagree)} cases differ between the interpreters:\n" + "\n".join(
        disagree[:20]
    )
    assert counts["OK"] > 100 and counts["CBORError"] > 1000, json.dumps(counts)
