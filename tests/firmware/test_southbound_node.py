"""The node's southbound helpers (firmware/edgeline_node/southbound.py) under CPython and under
the MicroPython unix port, against Python's own hmac and hashlib.

Every case is built here with cbor2 and `hmac` (not with the code under test), handed to one
device-side script as CBOR on stdin, and the script's answers are compared with what Python
says they must be. The same script runs in a CPython subprocess and in `micropython`, through
one parametrised fixture: a good tag is accepted; a tampered model, a wrong key, another
node's tag, an older version, a gap in the chunks are refused with the right status.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from edgeline.firmware.edgeline_node import southbound as node_sb
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host import southbound as host_sb

from micropython_runner import FIRMWARE, run_micropython

NODE = "node-1"
KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(1, 33))

# Device-side driver: reads a CBOR list of cases from stdin (hex, one line), prints JSON.
DRIVER = r"""
import sys, json, binascii, hashlib
from edgeline_node import cbor
from edgeline_node import southbound as sb
from edgeline_node.compat import ticks_add

class Slot:
    def __init__(self, log):
        self.buf = bytearray()
        self.closed = False
        log.append(self)
    def write(self, b):
        self.buf.extend(b)
    def close(self):
        self.closed = True

def hx(b):
    return binascii.hexlify(b).decode()

out = []
for case in cbor.loads(binascii.unhexlify(sys.stdin.readline().strip()), max_depth=8):
    op = case["op"]
    if op == "hmac":
        out.append(hx(sb.hmac_sha256(case["key"], case["msg"])))
    elif op == "compare":
        out.append(sb.compare_digest(case["a"], case["b"]))
    elif op == "model":
        slots = []
        r = sb.ModelReceiver(case["node"], case["key"], lambda: Slot(slots), case["max"], case["min"])
        res = []
        for msg in case["msgs"]:
            try:
                res.append(r.chunk(cbor.loads(msg)))
            except sb.SouthboundError as e:
                res.append(e.status)
        out.append({"res": res, "slots": [[hx(hashlib.sha256(bytes(s.buf)).digest()), len(s.buf), s.closed]
                                          for s in slots]})
    elif op == "config":
        try:
            cmd_id, version, data = sb.verify_config(cbor.loads(case["msg"]), case["node"], case["key"],
                                                     case["min"])
            out.append(["ok", cmd_id, version, cbor.loads(data)])
        except sb.SouthboundError as e:
            out.append([e.status])
    elif op == "time":
        # Ticks wrap at a period that depends on the port (2**30, or 2**62 on 64-bit unix):
        # t1 is placed just before the wrap, and t4 after it.
        t1 = ticks_add(0, -case["before_wrap"])
        t4 = ticks_add(t1, case["rtt_ticks"])
        clock = sb.WallClock(max_rtt_us=case["max_rtt"])
        clock._pending[t1] = True
        m = cbor.loads(case["msg"])
        m[60] = ticks_add(t1, m[60])  # the message carries t1 as an offset from ours
        try:
            rtt = clock.sync(m, case["node"], t4=t4)
            out.append(["ok", rtt, clock.now_us(t4), clock.now_us(ticks_add(t4, case["later"]))])
        except sb.SouthboundError as e:
            out.append([e.status])
    elif op == "ack":
        out.append(hx(cbor.dumps(sb.ack(case["node"], 7, case["cmd_id"], case["version"], case["status"],
                                        case["reason"]))))
print(json.dumps(out))
"""

Runner = Callable[[list[dict[str, Any]]], list[Any]]


def _stdin(cases: list[dict[str, Any]]) -> bytes:
    return cbor2.dumps(cases).hex().encode() + b"\n"


def _run_cpython(cases: list[dict[str, Any]]) -> list[Any]:
    env = dict(os.environ, PYTHONPATH=str(FIRMWARE))
    r = subprocess.run(
        [sys.executable, "-c", DRIVER], input=_stdin(cases), capture_output=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr.decode()
    result: list[Any] = json.loads(r.stdout)
    return result


def _run_micropython(cases: list[dict[str, Any]]) -> list[Any]:
    # A bounded heap, as on a board (the driver holds every case at once, and a 64-bit port's
    # objects are twice a microcontroller's).
    r = run_micropython(DRIVER, stdin=_stdin(cases), timeout=60, heapsize="256k")
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    result: list[Any] = json.loads(r.stdout)
    return result


@pytest.fixture(params=["cpython", pytest.param("micropython", marks=pytest.mark.micropython)])
def device(request: pytest.FixtureRequest) -> Runner:
    """Runs the device-side driver under one interpreter."""
    return _run_cpython if request.param == "cpython" else _run_micropython


# -- reference messages, made with cbor2 and hmac (independent of the code under test) -------
def ref_tag(key: bytes, sha: bytes, version: int, node: str) -> bytes:
    return hmac.new(key, sha + struct.pack(">I", version) + node.encode(), hashlib.sha256).digest()


def ref_chunks(
    model: bytes,
    *,
    node: str = NODE,
    key: bytes = KEY,
    version: int = 5,
    cmd_id: int = 77,
    chunk: int = 1000,
    sha: bytes | None = None,
    tag_node: str | None = None,
) -> list[bytes]:
    sha = sha if sha is not None else hashlib.sha256(model).digest()
    tag = ref_tag(key, sha, version, tag_node or node)
    total = -(-len(model) // chunk)
    return [
        cbor2.dumps(
            {
                0: 1,
                1: 7,
                2: node,
                3: 0,
                50: cmd_id,
                51: version,
                52: sha,
                53: tag,
                54: i,
                55: total,
                56: model[i * chunk : (i + 1) * chunk],
                57: len(model),
            }
        )
        for i in range(total)
    ]


MODEL = bytes((i * 37 + 11) & 0xFF for i in range(4321))
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
MORE, DONE, DUPLICATE, IGNORED = node_sb.MORE, node_sb.DONE, node_sb.DUPLICATE, node_sb.IGNORED


def model_case(
    msgs: list[bytes], *, key: bytes = KEY, max_size: int = 65536, min_version: int = 0
) -> dict[str, Any]:
    return {"op": "model", "node": NODE, "key": key, "max": max_size, "min": min_version, "msgs": msgs}


# -- HMAC and compare -----------------------------------------------------------------------
def test_hmac_matches_python_hmac(device: Runner) -> None:
    keys = [
        b"",
        b"k",
        bytes(16),
        KEY,
        bytes(range(63)),
        bytes(range(64)),
        bytes(range(65)),
        bytes(range(131)),
    ]
    msgs = [b"", b"a", bytes(55), bytes(56), bytes(range(64)), MODEL[:1000]]
    cases = [{"op": "hmac", "key": k, "msg": m} for k in keys for m in msgs]
    # RFC 4231 test case 2, spelled out.
    cases.append({"op": "hmac", "key": b"Jefe", "msg": b"what do ya want for nothing?"})
    got = device(cases)
    want = [hmac.new(c["key"], c["msg"], hashlib.sha256).hexdigest() for c in cases]
    assert got == want
    assert got[-1] == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_compare_digest(device: Runner) -> None:
    a = bytes(range(32))
    cases = [
        {"op": "compare", "a": a, "b": a},
        {"op": "compare", "a": a, "b": b"\x01" + a[1:]},
        {"op": "compare", "a": a, "b": a[:31] + b"\x00"},
        {"op": "compare", "a": a, "b": a[:31]},
        {"op": "compare", "a": b"", "b": b""},
    ]
    assert device(cases) == [True, False, False, False, True]


# -- model pushes -------------------------------------------------------------------------------
def test_model_with_good_tag_is_accepted(device: Runner) -> None:
    msgs = ref_chunks(MODEL)
    [got] = device([model_case(msgs)])
    assert got["res"] == [MORE, MORE, MORE, MORE, DONE]
    assert got["slots"] == [[MODEL_SHA, len(MODEL), True]]


def test_model_made_by_the_gateway_is_accepted(device: Runner) -> None:
    # The gateway's encoder (host/southbound.py) against the node's decoder.
    msgs = host_sb.model_messages(MODEL, node=NODE, key=KEY, version=9, cmd_id=2**32 - 1, max_chunk=2048)
    [got] = device([model_case(msgs, min_version=9)])
    assert got["res"] == [MORE, MORE, DONE]
    assert got["slots"] == [[MODEL_SHA, len(MODEL), True]]


def test_redelivered_chunks_are_duplicates_and_a_finished_push_is_ignored(device: Runner) -> None:
    m = ref_chunks(MODEL)
    [got] = device([model_case([m[0], m[0], m[1], m[2], m[1], m[3], m[4], m[4], m[0]])])
    assert got["res"] == [MORE, DUPLICATE, MORE, MORE, DUPLICATE, MORE, DONE, IGNORED, IGNORED]
    assert got["slots"] == [[MODEL_SHA, len(MODEL), True]]


def test_tampered_model_is_refused(device: Runner) -> None:
    bad = bytearray(MODEL)
    bad[2500] ^= 0x01
    # Authentic header (sha and tag of the real model), one flipped bit in chunk 2's data.
    msgs = ref_chunks(MODEL)
    msgs[2] = ref_chunks(bytes(bad), sha=hashlib.sha256(MODEL).digest())[2]
    [got] = device([model_case(msgs)])
    assert got["res"] == [MORE, MORE, MORE, MORE, "bad-sha"]
    assert got["slots"][0][2] is True  # closed; the caller never swaps to it


def test_truncated_or_padded_model_is_refused(device: Runner) -> None:
    # A last chunk shorter than announced cannot finish; a longer one runs past the size.
    short = ref_chunks(MODEL)
    short[-1] = cbor2.dumps(cbor2.loads(short[-1]) | {56: b"x"})
    long = ref_chunks(MODEL)
    long[-1] = cbor2.dumps(cbor2.loads(long[-1]) | {56: MODEL[4000:] + b"extra"})
    got = device([model_case(short), model_case(long)])
    assert got[0]["res"][-1] == "bad-chunk"
    assert got[1]["res"][-1] == "bad-chunk"


def test_wrong_key_is_refused_before_anything_is_written(device: Runner) -> None:
    msgs = ref_chunks(MODEL, key=OTHER_KEY)
    [got] = device([model_case(msgs)])
    assert got["res"] == ["bad-tag", IGNORED, IGNORED, IGNORED, IGNORED]
    assert got["slots"] == []  # the slot was never opened


def test_tag_for_another_node_is_refused(device: Runner) -> None:
    # Addressed to us but tagged for node-2 (with our key): the tag binds the target.
    retargeted = ref_chunks(MODEL, tag_node="node-2")
    # Addressed to node-2 with node-2's tag: not ours at all.
    elsewhere = ref_chunks(MODEL, node="node-2")
    got = device([model_case(retargeted), model_case(elsewhere[:1])])
    assert got[0]["res"][0] == "bad-tag" and got[0]["slots"] == []
    assert got[1]["res"] == ["wrong-node"]


def test_version_is_bound_and_older_versions_are_refused(device: Runner) -> None:
    # Tag computed for version 5, message claims version 6: refused.
    forged = [cbor2.dumps(cbor2.loads(m) | {51: 6}) for m in ref_chunks(MODEL, version=5)]
    got = device(
        [
            model_case(forged),
            model_case(ref_chunks(MODEL, version=5), min_version=6),
            model_case(ref_chunks(MODEL, version=6), min_version=6),  # same version: re-push allowed
        ]
    )
    assert got[0]["res"][0] == "bad-tag"
    assert got[1]["res"][0] == "stale-version"
    assert got[2]["res"][-1] == DONE


def test_too_large_gap_and_inconsistent_chunks_are_refused(device: Runner) -> None:
    m = ref_chunks(MODEL)
    mixed = ref_chunks(MODEL, cmd_id=77)[:2] + ref_chunks(MODEL[::-1], cmd_id=77)[2:]
    got = device(
        [
            model_case(m, max_size=4000),
            model_case([m[0], m[2], m[3]]),
            model_case(m[1:]),  # chunk 0 never came
            model_case(mixed),
        ]
    )
    assert got[0]["res"] == ["too-large", IGNORED, IGNORED, IGNORED, IGNORED]
    assert got[1]["res"] == [MORE, "bad-chunk", IGNORED]
    assert got[2]["res"] == ["bad-chunk", IGNORED, IGNORED, IGNORED]
    assert got[3]["res"] == [MORE, MORE, "bad-chunk", IGNORED, IGNORED]


def test_a_new_push_supersedes_one_in_progress(device: Runner) -> None:
    first = ref_chunks(MODEL, cmd_id=1)
    second = ref_chunks(MODEL[:1500], cmd_id=2, version=6)
    [got] = device([model_case(first[:2] + second)])
    assert got["res"] == [MORE, MORE, MORE, DONE]
    sha2 = hashlib.sha256(MODEL[:1500]).hexdigest()
    assert [s[:2] for s in got["slots"]] == [[hashlib.sha256(MODEL[:2000]).hexdigest(), 2000], [sha2, 1500]]
    assert all(s[2] for s in got["slots"])


def test_stray_chunks_do_not_disturb_a_push_in_progress(device: Runner) -> None:
    m = ref_chunks(MODEL, cmd_id=5)
    stray = ref_chunks(MODEL, cmd_id=6)  # chunks of a push whose chunk 0 this node never saw
    forged = ref_chunks(MODEL, cmd_id=7, key=OTHER_KEY)  # a new push that does not authenticate
    [got] = device([model_case([m[0], m[1], stray[2], stray[3], forged[0], m[2], m[3], m[4]])])
    assert got["res"] == [MORE, MORE, "bad-chunk", IGNORED, "bad-tag", MORE, MORE, DONE]
    assert got["slots"] == [[MODEL_SHA, len(MODEL), True]]


def test_malformed_command_is_refused_not_crashed(device: Runner) -> None:
    good = cbor2.loads(ref_chunks(MODEL)[0])
    msgs = [
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(good | {0: 2}),
        cbor2.dumps(good | {50: "seven"}),
        cbor2.dumps(good | {52: b"short"}),
        cbor2.dumps({k: v for k, v in good.items() if k != 53}),
    ]
    results = device([model_case([m]) for m in msgs])
    assert [r["res"] for r in results] == [["bad-message"]] * 5


# -- config pushes -------------------------------------------------------------------------
def ref_config(
    config: dict[str, Any], *, node: str = NODE, key: bytes = KEY, version: int = 3, data: bytes | None = None
) -> bytes:
    body = cbor2.dumps(config, canonical=True)
    sha = hashlib.sha256(body).digest()
    return cbor2.dumps(
        {
            0: 1,
            1: 8,
            2: node,
            3: 0,
            50: 12,
            51: version,
            52: sha,
            53: ref_tag(key, sha, version, node),
            56: body if data is None else data,
        }
    )


def test_config_push(device: Runner) -> None:
    cfg = {"window": {"period_ms": 250}, "spc": {"k_sigma": 3.5}}
    tampered = cbor2.dumps({"window": {"period_ms": 1}}, canonical=True)
    gateway_made = host_sb.config_message(cfg, node=NODE, key=KEY, version=4, cmd_id=99)
    cases = [
        {"op": "config", "node": NODE, "key": KEY, "min": 0, "msg": ref_config(cfg)},
        {"op": "config", "node": NODE, "key": KEY, "min": 0, "msg": ref_config(cfg, data=tampered)},
        {"op": "config", "node": NODE, "key": KEY, "min": 0, "msg": ref_config(cfg, key=OTHER_KEY)},
        {"op": "config", "node": NODE, "key": KEY, "min": 0, "msg": ref_config(cfg, node="node-2")},
        {"op": "config", "node": NODE, "key": KEY, "min": 4, "msg": ref_config(cfg, version=3)},
        {"op": "config", "node": NODE, "key": KEY, "min": 4, "msg": gateway_made},
    ]
    got = device(cases)
    assert got[0] == ["ok", 12, 3, cfg]
    assert got[1] == ["bad-sha"]
    assert got[2] == ["bad-tag"]
    assert got[3] == ["wrong-node"]
    assert got[4] == ["stale-version"]
    assert got[5] == ["ok", 99, 4, cfg]


# -- time sync and acks ----------------------------------------------------------------------
def time_resp(t1: int, t2: int, t3: int, node: str = NODE) -> bytes:
    return cbor2.dumps({0: 1, 1: 10, 2: node, 3: 0, 60: t1, 61: t2, 62: t3})


def test_time_sync(device: Runner) -> None:
    wall = 1_700_000_000_123_456
    t2, t3 = wall, wall + 1000  # the gateway held the request 1 ms
    # 4 ms round trip on the node's clock, across a ticks wrap; the clock read 2 s later.
    case = {"op": "time", "node": NODE, "before_wrap": 1500, "rtt_ticks": 4000, "later": 2_000_000}
    case["max_rtt"] = 500_000
    got = device(
        [
            case | {"msg": time_resp(0, t2, t3)},
            case | {"msg": time_resp(1, t2, t3)},  # not an answer to our request
            case | {"msg": time_resp(0, t2, t2 + 10_000)},  # gateway time > round trip: negative
            case | {"msg": time_resp(0, t2, t3, node="node-2")},
            case | {"msg": time_resp(0, t2, t3), "rtt_ticks": 600_000},  # too slow to trust
        ]
    )
    rtt = 4000 - 1000
    assert got[0] == ["ok", rtt, t3 + rtt // 2, t3 + rtt // 2 + 2_000_000]
    assert got[1] == ["bad-message"]
    assert got[2] == ["bad-message"]
    assert got[3] == ["wrong-node"]
    assert got[4] == ["bad-message"]


def test_ack_map_is_what_the_gateway_parses(device: Runner) -> None:
    [raw] = device(
        [{"op": "ack", "node": NODE, "cmd_id": 77, "version": 5, "status": "bad-tag", "reason": "x"}]
    )
    ack = host_sb.parse_ack(bytes.fromhex(raw), host_sb.parse_cmd_topic(f"edgeline/v1/s/{NODE}/cmd/ack"))
    assert (ack.node, ack.boot, ack.cmd_id, ack.version, ack.status, ack.reason) == (
        NODE,
        7,
        77,
        5,
        "bad-tag",
        "x",
    )
    assert not ack.ok


# -- fast in-process checks (CPython only) --------------------------------------------------
def test_command_tag_refuses_short_keys_and_bad_arguments() -> None:
    sha = bytes(32)
    with pytest.raises(ValueError, match="too short"):
        node_sb.command_tag(b"short", sha, 1, NODE)
    with pytest.raises(ValueError, match="32 bytes"):
        node_sb.command_tag(KEY, b"abc", 1, NODE)
    with pytest.raises(ValueError, match="out of range"):
        node_sb.command_tag(KEY, sha, 2**32, NODE)
    assert node_sb.command_tag(KEY, sha, 1, NODE) == ref_tag(KEY, sha, 1, NODE)


def test_load_key(tmp_path: Any) -> None:
    p = tmp_path / "model.key"
    p.write_text(KEY.hex() + "\n")
    assert node_sb.load_key(str(p)) == KEY
    p.write_text("zz")
    with pytest.raises(ValueError, match="not hex"):
        node_sb.load_key(str(p))
    p.write_text("abcd")
    with pytest.raises(ValueError, match="at least 16"):
        node_sb.load_key(str(p))


def test_wall_clock_rolls_over_ticks_wrap() -> None:
    clock = node_sb.WallClock()
    assert clock.now_us(0) == 0  # not synced yet
    req = clock.request(NODE, 1)
    t1 = req[node_sb.K_T1]
    clock.sync(cbor2.loads(time_resp(t1, 10**15, 10**15)), NODE, t4=t1)
    # Walk 40 minutes in 5-minute steps: more than two ticks periods (2**30 us ~ 17.9 min).
    t, wall = t1, 10**15
    for _ in range(8):
        t = (t + 300_000_000) % (1 << 30)
        wall += 300_000_000
        assert clock.now_us(t) == wall
    assert w.KIND_NAMES.get(node_sb.KIND_CMD_MODEL) in (None, "cmd/model")  # no clash with wire.py
