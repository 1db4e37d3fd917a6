"""The node's CBOR codec against RFC 8949's examples, under CPython and under MicroPython.

Appendix A (the shared vector file): every item decodes to its value, every `roundtrip`
item re-encodes to the same bytes, and `f818` (RFC 7049 only) is refused. Appendix F's
not-well-formed items and the items this codec refuses by policy raise CBORError.

The checking code (`diagnostic`, `decode_all`) runs unchanged in both interpreters: under
MicroPython its source is sent to one `micropython` process, which prints JSON results that
are then asserted here item by item.
"""

from __future__ import annotations

import inspect
import json
import re
from binascii import hexlify, unhexlify
from typing import Any

import pytest
from edgeline.firmware.edgeline_node.cbor import UNDEFINED, CBORError, Simple, Tag, dumps, loads

from micropython_runner import SHARED, run_micropython

VECTORS = SHARED / "testvectors/cbor/appendix_a.json"
# RFC 7049's two-byte simple(24): not well-formed under RFC 8949 (its Appendix F).
RFC7049_ONLY = "f818"

INTERPRETERS = ["cpython", pytest.param("micropython", marks=pytest.mark.micropython)]


# --- code that runs in both interpreters (keep it MicroPython-compatible) ---------------


def diagnostic(obj):
    # CBOR diagnostic notation (RFC 8949 section 8) of a decoded value, the subset the
    # vector file uses; map entries sorted so that dict order does not matter.
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if obj is None:
        return "null"
    if obj is UNDEFINED:
        return "undefined"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if obj != obj:
            return "NaN"
        if obj == float("inf"):
            return "Infinity"
        if obj == -float("inf"):
            return "-Infinity"
        return repr(obj)
    if isinstance(obj, bytes):
        return "h'" + hexlify(obj).decode() + "'"
    if isinstance(obj, str):
        out = []
        for c in obj:
            o = ord(c)
            if c == '"' or c == "\\":
                out.append("\\" + c)
            elif 32 <= o < 127:
                out.append(c)
            else:
                out.append(f"\\u{{{o:x}}}")
        return '"' + "".join(out) + '"'
    if isinstance(obj, list):
        return "[" + ", ".join([diagnostic(x) for x in obj]) + "]"
    if isinstance(obj, dict):
        items = sorted([(diagnostic(k), diagnostic(v)) for k, v in obj.items()])
        return "{" + ", ".join([k + ": " + v for k, v in items]) + "}"
    if isinstance(obj, Tag):
        inner = diagnostic(obj.value)
        return f"{obj.tag}({inner})"
    if isinstance(obj, Simple):
        return f"simple({obj.value})"
    name = type(obj).__name__
    return f"<unexpected {name}>"


def decode_all(entries):
    # entries: [[hex, reencode?], ...] -> one dict per entry: diag, reencoded or error.
    results = []
    for hx, reencode in entries:
        r = {"hex": hx}
        try:
            obj = loads(unhexlify(hx))
            r["diag"] = diagnostic(obj)
            if reencode:
                r["reencoded"] = hexlify(dumps(obj)).decode()
        except CBORError as e:
            r["error"] = "CBORError"
            r["message"] = str(e)
        except Exception as e:  # reported, then failed on by the test
            r["error"] = type(e).__name__
            r["message"] = str(e)
        results.append(r)
    return results


# --- the two ways to run it --------------------------------------------------------------

MICROPYTHON_MAIN = """
import sys, json
from binascii import hexlify, unhexlify
from edgeline_node.cbor import UNDEFINED, CBORError, Simple, Tag, dumps, loads
{functions}
print(json.dumps(decode_all(json.loads(sys.stdin.read()))))
"""


def run_decode_all(interp: str, entries: list[list[Any]]) -> list[dict[str, str]]:
    if interp == "cpython":
        return decode_all(entries)
    script = MICROPYTHON_MAIN.format(
        functions=inspect.getsource(diagnostic) + "\n" + inspect.getsource(decode_all)
    )
    r = run_micropython(script, stdin=json.dumps(entries).encode(), timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def appendix_a() -> list[dict[str, Any]]:
    if not VECTORS.exists():
        pytest.fail(
            f"the shared CBOR test vectors are missing: expected {VECTORS} "
            "(RFC 8949 Appendix A as JSON, from github.com/cbor/test-vectors)"
        )
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors) > 70, f"{VECTORS} holds only {len(vectors)} vectors"
    return vectors


_INDEFINITE_BYTES = re.compile(r"\(_ ((?:h'[0-9a-f]*'(?:, )?)+)\)")


def expected_diagnostic(vector: dict[str, Any]) -> str:
    if "decoded" in vector:
        return diagnostic(vector["decoded"])
    # The decoder joins an indefinite-length byte string's chunks: (_ h'01', h'02') -> h'0102'.
    return _INDEFINITE_BYTES.sub(
        lambda m: "h'" + "".join(re.findall(r"h'([0-9a-f]*)'", m.group(1))) + "'",
        vector["diagnostic"],
    )


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_rfc8949_appendix_a(interp: str) -> None:
    vectors = appendix_a()
    results = run_decode_all(interp, [[v["hex"], v["roundtrip"]] for v in vectors])
    assert len(results) == len(vectors)
    failures = []
    for v, r in zip(vectors, results, strict=True):
        assert r["hex"] == v["hex"]
        if v["hex"] == RFC7049_ONLY:
            if r.get("error") != "CBORError":
                failures.append(f"{v['hex']}: must be refused with CBORError, got {r}")
            continue
        if "error" in r:
            failures.append(f"{v['hex']}: {r['error']}: {r['message']}")
            continue
        want = expected_diagnostic(v)
        if r["diag"] != want:
            failures.append(f"{v['hex']}: decoded to {r['diag']}, expected {want}")
        if v["roundtrip"] and r["reencoded"] != v["hex"]:
            failures.append(f"{v['hex']}: re-encoded to {r['reencoded']}")
    assert not failures, f"{interp}: {len(failures)} of {len(vectors)} vectors failed:\n" + "\n".join(
        failures
    )
    # Guard against a vector file that silently lost its interesting half.
    assert sum(v["roundtrip"] for v in vectors) >= 60
    assert any(v["hex"] == RFC7049_ONLY for v in vectors)


# RFC 8949 Appendix F.1 (not well-formed), one line per group there, then the items this
# codec refuses by policy although they are well-formed.
NOT_WELL_FORMED = """
18 19 1a 1b 1901 1a0102 1b01020304050607 38 58 78 98 9a01ff00 b8 d8 f8 f900 fa0000 fb000000
41 61 5affffffff00 5bffffffffffffffff010203 7affffffff00 7b7fffffffffffffff010203
81 818181818181818181 8200 a1 a20102 a100 a2000000
c0
5f4100 7f6100
9f 9f0102 bf bf01020102 819f 9f8000 9f9f9f9f9fffffffff 9f819f819f9fffffff
1c 1d 1e 3c 3d 3e 5c 5d 5e 7c 7d 7e 9c 9d 9e bc bd be dc dd de fc fd fe
f800 f801 f818 f81f
5f00ff 5f21ff 5f6100ff 5f80ff 5fa0ff 5fc000ff 5fe0ff 7f4100ff
5f5f4100ffff 7f7f6100ffff
ff
81ff 8200ff a1ff a1ff00 a100ff a20000ff 9f81ff 9f829f819f9fffffffff
bf00ff bf000000ff
1f 3f df
"""
REFUSED_BY_POLICY = {
    "0000": "trailing bytes after the item",
    "": "empty input",
    "a201000100": "duplicate map key",
    "bf01000100ff": "duplicate map key (indefinite map)",
    "a2f500f500": "duplicate map key true",
    "a2f97e0000fa7fc0000000": "two NaN keys (they encode alike)",
    "a20100f93c0000": "keys 1 and 1.0 (one key in Python)",
    "a2f90000f9800000": "keys 0.0 and -0.0 (one key in Python)",
    "a18000": "array as map key (unhashable)",
    "a1a000": "map as map key (unhashable)",
    "a1c18000": "tag around an array as map key (unhashable)",
    "62c080": "overlong UTF-8",
    "62c1bf": "overlong UTF-8 (c1)",
    "63e08080": "overlong UTF-8, 3 bytes",
    "63e09fbf": "overlong UTF-8, 3 bytes (largest)",
    "64f0808080": "overlong UTF-8, 4 bytes",
    "64f08fbfbf": "overlong UTF-8, 4 bytes (largest)",
    "64f5808080": "lead byte f5",
    "63edbfbf": "UTF-8-encoded surrogate (last)",
    "63eda080": "UTF-8-encoded surrogate",
    "64f4908080": "code point above U+10FFFF",
    "6180": "lone continuation byte",
    "61ff": "0xff in text",
    "62c328": "bad continuation byte",
    "7f62c3bc61c3ff": "UTF-8 sequence split across chunks",
    "c200": "bignum tag over an int",
    "c380": "bignum tag over an array",
    "81" * 17 + "00": "17 nested arrays with max_depth 16",
    "c6" * 17 + "00": "17 nested tags with max_depth 16",
    "a100" * 17 + "00": "17 nested maps with max_depth 16",
}


def refused_items() -> list[tuple[str, str]]:
    items = [(hx, "RFC 8949 Appendix F") for hx in NOT_WELL_FORMED.split()]
    return items + list(REFUSED_BY_POLICY.items())


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_refused_items_raise_cbor_error(interp: str) -> None:
    items = refused_items()
    results = run_decode_all(interp, [[hx, False] for hx, _ in items])
    wrong = [
        f"{hx} ({why}): {r.get('error') or 'decoded to ' + r['diag']} {r.get('message', '')}"
        for (hx, why), r in zip(items, results, strict=True)
        if r.get("error") != "CBORError"
    ]
    assert not wrong, f"{interp}: not refused with CBORError:\n" + "\n".join(wrong)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_accepted_at_the_limits(interp: str) -> None:
    # The counterparts of the refusals above that must still decode.
    items = {
        "81" * 16 + "00": "[" * 16 + "0" + "]" * 16,
        "c6" * 16 + "00": "6(" * 16 + "0" + ")" * 16,
        "f820": "simple(32)",
        "f3": "simple(19)",
        "a2010002f5": "{1: 0, 2: true}",
        "a201000000": "{0: 0, 1: 0}",
        "a2f400f500": "{false: 0, true: 0}",
        "a1c10100": "{1(1): 0}",
        "a2c1f97e0000c6f97e0000": "{1(NaN): 0, 6(NaN): 0}",
        "a2f93c0000f9000000": "{0.0: 0, 1.0: 0}",
        "c240": "0",
        "c34100": "-1",
        "c2490000000000000000ff": "255",
        "7f62c3bc63e6b0b4ff": '"\\u{fc}\\u{6c34}"',
        "62c280": '"\\u{80}"',
        "63e0a080": '"\\u{800}"',
        "63ed9fbf": '"\\u{d7ff}"',
        "63ee8080": '"\\u{e000}"',
        "64f0908080": '"\\u{10000}"',
        "64f48fbfbf": '"\\u{10ffff}"',
        "5fff": "h''",
        "7fff": '""',
        "bfff": "{}",
        "1b0000000000000001": "1",
        "fa3f800000": "1.0",
        "fb3ff0000000000000": "1.0",
        "f97e01": "NaN",
        "f90001": "5.960464477539063e-08",
        "f903ff": "6.097555160522461e-05",
        "f98001": "-5.960464477539063e-08",
        "fa00000001": "1.401298464324817e-45",
    }
    results = run_decode_all(interp, [[hx, False] for hx in items])
    wrong = [
        f"{hx}: {r.get('error', '')} {r.get('message', '')} {r.get('diag', '')} != {want}"
        for (hx, want), r in zip(items.items(), results, strict=True)
        if r.get("diag") != want
    ]
    assert not wrong, f"{interp}:\n" + "\n".join(wrong)
