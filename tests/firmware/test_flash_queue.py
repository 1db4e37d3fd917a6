"""The node's flash queue (firmware/edgeline_node/flash_queue.py), under CPython and MicroPython.

The scenarios below run unchanged in both interpreters: under MicroPython their source is
sent to one `micropython` process per scenario, which prints the results as JSON; the test
asserts the same expectations on both. Faults are made the way flash makes them: a file cut
short (a torn write), a byte flipped (decay), a pointer slot half written. The record and
slot layouts are re-implemented here from docs/store-and-forward.md, independently of the
queue's own code, so a format change shows up as a failing test.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from edgeline.firmware.edgeline_node.config import ConfigError, validate
from edgeline.firmware.edgeline_node.flash_queue import (
    HEADER,
    POINTER_FILE,
    SLOT,
    SLOTS,
    FlashQueue,
    segment_name,
)

from micropython_runner import run_micropython

INTERPRETERS = ["cpython", pytest.param("micropython", marks=pytest.mark.micropython)]


# --- code that runs in both interpreters (keep it MicroPython-compatible) ---------------


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _copydir(src, dst):
    try:  # noqa: SIM105 - no contextlib in MicroPython
        os.mkdir(dst)
    except OSError:
        pass
    for name in os.listdir(src):
        _write(dst + "/" + name, _read(src + "/" + name))


def _payload(i, n):
    # Record i: its index in the first two bytes, then a pattern, n bytes in all.
    return bytes([i >> 8, i & 0xFF]) + bytes([(i * 7 + k) & 0xFF for k in range(n - 2)])


def _drain(q, limit=1000000):
    # Pop up to `limit` records: [(index, kind, payload intact)].
    out = []
    while len(out) < limit:
        it = q.peek()
        if it is None:
            break
        kind, mv = it
        p = bytes(mv)
        i = (p[0] << 8) | p[1]
        out.append([i, kind, p == _payload(i, len(p))])
        q.pop()
    return out


def _ids(recs):
    return [r[0] for r in recs]


def _seg_bytes(d):
    # Sum of the segment files' sizes, as the filesystem sees it.
    total = 0
    for name in os.listdir(d):
        if name.endswith(".seg"):
            total += os.stat(d + "/" + name)[6]
    return total


def _slots(d):
    # [(slot index, generation, valid)] read straight from the pointer file.
    raw = _read(d + "/" + POINTER_FILE)
    out = []
    for i in range(SLOTS):
        s = raw[i * SLOT:(i + 1) * SLOT]
        gen = s[4] | (s[5] << 8) | (s[6] << 16) | (s[7] << 24)
        crc = s[28] | (s[29] << 8) | (s[30] << 16) | (s[31] << 24)
        from binascii import crc32

        out.append([i, gen, s[0] == 0xEB and s[1] == 0x50 and crc32(s[:28]) & 0xFFFFFFFF == crc])
    return out


def _open(d, **kw):
    args = {"capacity_bytes": 16384, "segment_bytes": 2048, "commit_every": 4, "commit_ms": 0,
            "max_record": 200}
    for k in kw:
        args[k] = kw[k]
    return FlashQueue(d, args["capacity_bytes"], args["segment_bytes"], args["commit_every"],
                      args["commit_ms"], args["max_record"])


def scenario_replay(d):
    # Replay is in append order across priorities, with the original bytes and kinds; the
    # pointer is committed lazily, so a crash replays the uncommitted acks again.
    q = _open(d, segment_bytes=1024)
    kinds = []
    for i in range(40):
        prio = 2 if i % 5 == 0 else i % 2
        kinds.append(1 if prio else 2)
        q.append(prio, kinds[-1], _payload(i, 20 + i))
    first = _drain(q, 10)
    q.close()
    q = _open(d, segment_bytes=1024)
    depth_reopened = q.depth
    before_crash = _ids(_drain(q, 3))  # 3 acks, commit_every 4: not committed
    committed_at_crash = q.committed
    q = None  # power cut: no close()
    q = _open(d, segment_bytes=1024)
    rest = _drain(q)
    q.close()
    return {
        "first": _ids(first),
        "depth_reopened": depth_reopened,
        "before_crash": before_crash,
        "committed_at_crash": committed_at_crash,
        "rest": _ids(rest),
        "kinds_ok": all(r[1] == kinds[r[0]] for r in first + rest),
        "bytes_ok": all(r[2] for r in first + rest),
    }


def scenario_torn(d):
    # A power cut while the last record was being written: every length it could have.
    base = d + "/base"
    q = _open(base)
    for i in range(6):
        q.append(1, 1, _payload(i, 50))
    q.close()
    seg = segment_name(1, 1)
    full = _read(base + "/" + seg)
    frame = HEADER + 50
    keep = len(full) - frame
    out = []
    for cut in range(frame + 1):
        w = d + f"/w{cut}"
        _copydir(base, w)
        _write(w + "/" + seg, full[:keep + cut])
        q = _open(w)
        r = {"cut": cut, "torn": q.torn_tails, "torn_bytes": q.torn_bytes, "corrupt": q.corrupt_bytes,
             "size": os.stat(w + "/" + seg)[6]}
        r["ids"] = _ids(_drain(q))
        q.append(1, 1, _payload(99, 50))  # appending after the truncation is clean
        q.close()
        q = _open(w)
        r["torn_again"] = q.torn_tails
        r["ids_again"] = _ids(_drain(q))
        q.close()
        out.append(r)
    # The only record of a segment torn: the segment goes.
    w = d + "/single"
    q = _open(w)
    q.append(0, 2, _payload(1, 40))
    q.close()
    name = w + "/" + segment_name(0, 1)
    _write(name, _read(name)[:7])
    q = _open(w)
    single = {"torn": q.torn_tails, "depth": q.depth, "files": sorted(os.listdir(w))}
    q.close()
    return {"frame": frame, "cuts": out, "single": single}


def scenario_corrupt(d):
    # One byte flipped in the middle of a segment: that record is skipped, the rest replays.
    base = d + "/base"
    q = _open(base)
    for i in range(10):
        q.append(1, 1, _payload(i, 60))
    q.close()
    seg = segment_name(1, 1)
    full = _read(base + "/" + seg)
    frame = HEADER + 60
    out = {}
    where = {"magic": 0, "length": 2, "prio": 4, "rseq": 7, "crc": 11, "payload": HEADER + 30}
    for what in where:
        w = d + "/" + what
        _copydir(base, w)
        b = bytearray(full)
        b[5 * frame + where[what]] ^= 0x5A
        _write(w + "/" + seg, b)
        q = _open(w)
        out[what] = {"corrupt": q.corrupt_bytes, "torn": q.torn_tails, "depth": q.depth,
                     "ids": _ids(_drain(q))}
        q.close()
    return {"frame": frame, "cases": out}


def scenario_pointer(d):
    # The newest pointer slot decayed or half written: the previous slot stands in.
    base = d + "/base"
    q = _open(base, commit_every=1)
    for i in range(20):
        q.append(1, 1, _payload(i, 30))
    _drain(q, 12)  # 12 commits
    q.close()
    slots = _slots(base)
    newest = max(slots, key=lambda s: s[1])
    raw = _read(base + "/" + POINTER_FILE)
    out = {"newest_gen": newest[1], "valid": sum(1 for s in slots if s[2])}
    for what in ("flip", "torn", "all"):
        w = d + "/" + what
        _copydir(base, w)
        b = bytearray(raw)
        at = newest[0] * SLOT
        if what == "flip":
            b[at + 9] ^= 0x01
        elif what == "torn":
            for k in range(16, SLOT):  # the second half never made it
                b[at + k] = 0
        else:
            for i in range(SLOTS):
                b[i * SLOT + 20] ^= 0xFF
        _write(w + "/" + POINTER_FILE, b)
        q = _open(w, commit_every=1)
        out[what] = {"bad_slots": q.bad_slots, "committed": q.committed, "first": _ids(_drain(q, 1))}
        q.close()
    return out


def scenario_capacity(d):
    # Bounded bytes; lowest priority, oldest first, whole segments; exact drop counters.
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100)
    frame = 100
    appended = [[], [], []]
    delivered = [[], [], []]
    prios = {}
    violations = []
    n = 0

    def add(prio):
        before = list(q.drops)
        r = q.append(prio, 1, _payload(n, frame - HEADER))
        prios[n] = prio
        appended[prio].append(n)
        used = _seg_bytes(d)
        if used != q.used_bytes or used > 2048:
            violations.append(f"bytes {used}/{q.used_bytes} after record {n}")
        for p in range(3):
            if q.drops[p] > before[p]:
                for lower in range(p):
                    if q.pending(lower):
                        violations.append(f"dropped priority {p} while {lower} waited")
        return r

    for _ in range(60):  # mixed traffic
        add(2 if n % 7 == 0 else (0 if n % 5 == 0 else 1))
        n += 1
        if n == 30:
            for i in _ids(_drain(q, 5)):
                delivered[prios[i]].append(i)
    drops_mixed = list(q.drops)
    for _ in range(30):  # anomalies only: they push everything else out, then each other
        add(2)
        n += 1
    while q.used_bytes + frame <= 2048:  # top up: not one more byte fits
        add(2)
        n += 1
    last_tel = add(0)  # only anomalies left: the new telemetry record itself is dropped
    n += 1
    final = [[], [], []]
    for i in _ids(_drain(q)):
        delivered[prios[i]].append(i)
        final[prios[i]].append(i)
    lost = [len(appended[p]) - len(delivered[p]) for p in range(3)]
    drops_final = list(q.drops)
    evictions = q.evictions
    q.close()
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100)
    return {"violations": violations, "drops_mixed": drops_mixed, "drops": drops_final, "lost": lost,
            "last_tel": last_tel, "evictions": evictions, "drops_reopened": list(q.drops),
            "depth_reopened": q.depth, "final": final, "appended": appended}


def scenario_evict_intent(d):
    # Power cut after an eviction was counted but before its segment was deleted.
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100)
    for i in range(20):  # 20 frames of 100 bytes: 2000 of 2048 bytes, 4 segments
        q.append(0, 2, _payload(i, 100 - HEADER))
    saved = {}
    for name in os.listdir(d):
        saved[name] = _read(d + "/" + name)
    q.append(1, 1, _payload(20, 100 - HEADER))  # evicts the oldest telemetry segment
    drops_then = list(q.drops)
    gone = [name for name in saved if name.endswith(".seg") and name not in os.listdir(d)]
    q = None
    for name in gone:  # the delete never reached the flash
        _write(d + "/" + name, saved[name])
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100)
    r = {"drops_then": drops_then, "gone": gone, "drops_reopened": list(q.drops), "depth": q.depth,
         "still_there": [name for name in gone if name in os.listdir(d)], "ids": _ids(_drain(q))}
    q.close()
    return r


def scenario_inflight(d):
    # take()/ack(token): several records out at once (a resilience layer's in-flight
    # window), acknowledged in order or not; eviction of records that are out.
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100, commit_every=100)
    q2 = None
    for i in range(12):
        q.append(1, 1, _payload(i, 100 - HEADER))
    out = []
    while True:
        it = q.take()
        if it is None:
            break
        out.append([(it[1][0] << 8) | it[1][1], it[2]])  # index, token
    full = q.inflight
    tokens = [t for _, t in out]
    r = {"taken": [i for i, _ in out], "full": full, "depth_out": q.depth}
    r["ack_late_first"] = q.ack(tokens[2])  # out of order: nothing delivered yet
    r["delivered_1"] = q.delivered
    r["ack_twice"] = q.ack(tokens[2])
    r["ack_unknown"] = q.ack(999)
    q.ack(tokens[0])
    q.ack(tokens[1])  # now 0, 1, 2 delivered
    r["delivered_2"] = q.delivered
    r["depth_2"] = q.depth
    # Fill up: the oldest segment (records 0-4, of which 3 and 4 are still out) is evicted.
    for i in range(12, 22):
        q.append(1, 1, _payload(i, 100 - HEADER))
    r["drops_evicted"] = list(q.drops)
    q.ack(tokens[3])  # its PUBACK came after all: delivered, not dropped
    r["drops_after_ack"] = list(q.drops)
    q.ack(tokens[4])
    for t in tokens[5:]:
        q.ack(t)
    rest = []
    while True:
        it = q.take()
        if it is None:
            break
        rest.append((it[1][0] << 8) | it[1][1])
        q.ack(it[2])
    r["rest"] = rest
    r["depth_end"] = q.depth
    r["drops_end"] = list(q.drops)
    q.close()
    q2 = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100, commit_every=100)
    r["drops_reopened"] = list(q2.drops)
    r["depth_reopened"] = q2.depth
    return r


def scenario_fetch_and_skip(d):
    # fetch(token): a record that is out read again for each (re)send, as ResilientMQTT's
    # fetch mode asks; None once it cannot go (evicted, or its CRC fails), then skip(token).
    q = _open(d, capacity_bytes=2048, segment_bytes=512, max_record=100, commit_every=100)
    for i in range(6):
        q.append(1, 1, _payload(i, 100 - HEADER))
    tokens = [q.take()[2] for _ in range(4)]
    r = {}
    got = []
    for t in (tokens[2], tokens[0], tokens[0], tokens[3]):  # any order, twice in a row
        mv = q.fetch(t)
        p = bytes(mv)
        got.append([(p[0] << 8) | p[1], p == _payload((p[0] << 8) | p[1], len(p))])
    r["fetched"] = got
    r["fetch_unknown"] = q.fetch(999)
    # Decay after take(): flip a payload byte of record 1 on flash.
    name = next(n for n in os.listdir(d) if n.endswith(".seg"))
    raw = bytearray(_read(d + "/" + name))
    raw[100 + HEADER + 5] ^= 0xFF
    _write(d + "/" + name, bytes(raw))
    q._close_reader()  # a fresh read from flash
    q._buf_rseq = 0  # ... not the copy in the read buffer
    r["fetch_decayed"] = q.fetch(tokens[1])
    r["skip"] = q.skip(tokens[1])
    r["skip_again"] = q.skip(tokens[1])
    r["corrupt_lost"] = q.corrupt_lost
    q.ack(tokens[0])
    r["delivered_1"] = q.delivered  # 0 and the skipped 1 are done
    r["depth_1"] = q.depth
    # Eviction while out: record 2 and 3 still out when their segment goes.
    for i in range(6, 24):
        q.append(1, 1, _payload(i, 100 - HEADER))
    r["drops_evicted"] = list(q.drops)
    r["fetch_evicted"] = q.fetch(tokens[2])
    q.skip(tokens[2])  # never sent: stays counted as dropped
    q.ack(tokens[3])  # its PUBACK came after all: un-counted
    r["drops_end"] = list(q.drops)
    rest = []
    while True:
        it = q.take()
        if it is None:
            break
        rest.append((it[1][0] << 8) | it[1][1])
        q.ack(it[2])
    r["rest_first"] = rest[0]
    r["depth_end"] = q.depth
    q.close()
    return r


def scenario_write_amplification(d):
    # Realistic traffic: ~270-byte events, each delivered right after it was written.
    q = FlashQueue(d, 262144, 16384, 32, 0, 2048)
    for i in range(2000):
        q.append(1, 1, _payload(i, 270))
        q.peek()
        q.pop()
    q.close()
    return {"wa": q.write_amplification(), "written": q.bytes_written, "payload": q.payload_bytes,
            "commits": q.commits, "segments_left": q.segments()}


def scenario_heap(d):
    # Heap bounded over a long run (MicroPython only: gc.mem_alloc).
    import gc

    q = FlashQueue(d, 65536, 4096, 16, 0, 512)
    p = _payload(1, 270)
    for _ in range(200):
        q.append(1, 1, p)
        q.peek()
        q.pop()
    gc.collect()
    a = gc.mem_alloc()
    for i in range(3000):
        q.append(i % 3, 1, p)
        q.peek()
        q.pop()
    gc.collect()
    b = gc.mem_alloc()
    q.close()
    return {"growth": b - a, "segments": q.segments()}


# --- the two ways to run a scenario -------------------------------------------------------

_HELPERS = (_read, _write, _copydir, _payload, _drain, _ids, _seg_bytes, _slots, _open)

MICROPYTHON_MAIN = """
import json, os
from edgeline_node.flash_queue import FlashQueue, HEADER, SLOT, SLOTS, POINTER_FILE, segment_name
{functions}
print(json.dumps({name}({path!r})))
"""


def run(interp: str, scenario: Any, path: Path) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    if interp == "cpython":
        return json.loads(json.dumps(scenario(str(path))))
    functions = "\n".join(inspect.getsource(f) for f in (*_HELPERS, scenario))
    script = MICROPYTHON_MAIN.format(functions=functions, name=scenario.__name__, path=str(path))
    r = run_micropython(script, timeout=120)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_replay_in_order_and_after_a_crash(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_replay, tmp_path)
    assert r["first"] == list(range(10))
    assert r["depth_reopened"] == 30
    assert r["before_crash"] == [10, 11, 12]
    assert r["committed_at_crash"] == 10
    # The three acks were not committed: they come again, then everything else, in order.
    assert r["rest"] == list(range(10, 40))
    assert r["kinds_ok"] and r["bytes_ok"]


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_torn_tail_at_every_byte_of_the_last_record(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_torn, tmp_path)
    frame = r["frame"]
    assert len(r["cuts"]) == frame + 1
    for c in r["cuts"]:
        cut = c["cut"]
        torn = 0 < cut < frame
        assert c["torn"] == (1 if torn else 0), c
        assert c["torn_bytes"] == (cut if torn else 0), c
        assert c["corrupt"] == 0, c
        assert c["ids"] == (list(range(6)) if cut == frame else list(range(5))), c
        assert c["size"] == 6 * frame if cut == frame else 5 * frame, c
        assert c["torn_again"] == 0 and c["ids_again"] == [99], c
    assert r["single"] == {"torn": 1, "depth": 0, "files": [POINTER_FILE]}


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_crc_corruption_in_the_middle_of_a_segment(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_corrupt, tmp_path)
    for what, c in r["cases"].items():
        assert c["torn"] == 0, (what, c)
        assert c["corrupt"] == r["frame"], (what, c)
        assert c["depth"] == 9, (what, c)
        assert c["ids"] == [0, 1, 2, 3, 4, 6, 7, 8, 9], (what, c)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_pointer_slot_corruption_falls_back_to_the_previous_slot(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_pointer, tmp_path)
    assert r["newest_gen"] == 12 and r["valid"] == SLOTS
    for what in ("flip", "torn"):
        assert r[what] == {"bad_slots": 1, "committed": 11, "first": [11]}, what
    # Every slot unreadable: nothing is known delivered, so everything is sent again.
    assert r["all"] == {"bad_slots": SLOTS, "committed": 0, "first": [0]}


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_capacity_drops_lowest_priority_oldest_first_and_counts_exactly(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_capacity, tmp_path)
    assert r["violations"] == []
    # Exact: every record appended and never delivered is counted, per priority.
    assert r["drops"] == r["lost"]
    assert r["drops_reopened"] == r["drops"] and r["depth_reopened"] == 0
    # Mixed traffic: telemetry and normal windows went, anomalies stayed.
    assert r["drops_mixed"][0] > 0 and r["drops_mixed"][1] > 0 and r["drops_mixed"][2] == 0
    assert r["last_tel"] == 0 and r["drops"][0] == r["drops_mixed"][0] + 1
    # Oldest first: the records that survived to the end are the newest of their priority
    # (for telemetry, before the one refused at the door).
    final, appended = r["final"], r["appended"]
    assert final[0] == [] and final[1] == [] and len(final[2]) > 0
    assert final[2] == appended[2][len(appended[2]) - len(final[2]):]
    assert r["evictions"] >= 3


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_eviction_interrupted_by_a_power_cut_is_counted_once(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_evict_intent, tmp_path)
    assert r["drops_then"] == [5, 0, 0] and len(r["gone"]) == 1
    assert r["drops_reopened"] == [5, 0, 0]
    assert r["still_there"] == []
    assert r["ids"] == [*range(5, 20), 20]


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_in_flight_window_take_and_ack(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_inflight, tmp_path)
    assert r["taken"] == list(range(8)) and r["full"] == 8  # max_inflight
    assert r["depth_out"] == 12  # handed out is not delivered
    assert r["ack_late_first"] is True and r["delivered_1"] == 0
    assert r["ack_twice"] is False and r["ack_unknown"] is False
    assert r["delivered_2"] == 3 and r["depth_2"] == 9
    # Records 3 and 4 were out when their segment went: counted, then un-counted as their
    # PUBACKs came; nothing else of that segment was waiting.
    assert r["drops_evicted"] == [0, 2, 0]
    assert r["drops_after_ack"] == [0, 1, 0]
    assert r["drops_end"] == [0, 0, 0]
    assert r["rest"] == list(range(8, 22)) and r["depth_end"] == 0
    assert r["drops_reopened"] == [0, 0, 0] and r["depth_reopened"] == 0


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_fetch_reads_out_records_again_and_skip_accounts_for_the_lost(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_fetch_and_skip, tmp_path)
    assert r["fetched"] == [[2, True], [0, True], [0, True], [3, True]]
    assert r["fetch_unknown"] is None
    assert r["fetch_decayed"] is None and r["skip"] is True and r["skip_again"] is False
    assert r["corrupt_lost"] == 1
    assert r["delivered_1"] == 2 and r["depth_1"] == 4  # records 2-5 wait
    # The segment holding records 0-4 went with 2, 3 (out) and 4 (waiting) in it.
    assert r["drops_evicted"] == [0, 3, 0]
    assert r["fetch_evicted"] is None
    assert r["drops_end"] == [0, 2, 0]  # 2 and 4 lost; 3 delivered after all
    assert r["depth_end"] == 0 and r["rest_first"] > 4


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_write_amplification(interp: str, tmp_path: Path) -> None:
    r = run(interp, scenario_write_amplification, tmp_path)
    frames = 2000 * (HEADER + 270)
    assert r["written"] == SLOT * SLOTS + frames + SLOT * r["commits"]
    assert r["commits"] == 63  # every 32 acks, and the 16 left at close
    assert r["payload"] == 2000 * 270
    assert 1.05 < r["wa"] < 1.06, r
    # Delivered sealed segments are deleted at the next commit: only the active one is left.
    assert r["segments_left"] == 1


@pytest.mark.micropython
def test_heap_stays_bounded_under_micropython(tmp_path: Path) -> None:
    r = run("micropython", scenario_heap, tmp_path)
    assert r["growth"] < 2048, r


def test_cpython_written_queue_replays_under_micropython(tmp_path: Path) -> None:
    d = tmp_path / "q"
    q = FlashQueue(str(d), 16384, 2048, 4, 0, 200)
    for i in range(25):
        q.append(i % 3, 1, _payload(i, 30 + i))
    q.close()
    script = (
        "import json\nfrom edgeline_node.flash_queue import FlashQueue\n"
        + inspect.getsource(_payload) + inspect.getsource(_drain) + inspect.getsource(_ids)
        + f"q = FlashQueue({str(d)!r}, 16384, 2048, 4, 0, 200)\nr = _drain(q)\nq.close()\n"
        "print(json.dumps([_ids(r), all(x[2] for x in r)]))\n"
    )
    out = run_micropython(script, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    ids, intact = json.loads(out.stdout.decode().splitlines()[-1])
    assert ids == list(range(25)) and intact


# --- CPython only: the format as documented, timing, argument errors -------------------------


def _frame(prio: int, kind: int, rseq: int, payload: bytes) -> bytes:
    # docs/store-and-forward.md, written out independently of flash_queue.py.
    body = struct.pack("<BHBBI", 1, len(payload), prio, kind, rseq)
    crc = zlib.crc32(payload, zlib.crc32(body)) & 0xFFFFFFFF
    return b"\xeb" + body + struct.pack("<I", crc) + payload


def test_on_flash_format_matches_the_documentation(tmp_path: Path) -> None:
    q = FlashQueue(str(tmp_path), 16384, 2048, 2, 0, 200)
    assert q.append(2, 1, b"anomaly") == 1
    assert q.append(0, 2, b"tel") == 2
    assert q.append(2, 1, b"again") == 3
    q.peek()
    q.pop()
    q.peek()
    q.pop()  # commit_every=2: the pointer now says 2 delivered
    q.close()
    anomalies = _frame(2, 1, 1, b"anomaly") + _frame(2, 1, 3, b"again")
    assert (tmp_path / segment_name(2, 1)).read_bytes() == anomalies
    assert (tmp_path / segment_name(0, 2)).read_bytes() == _frame(0, 2, 2, b"tel")
    raw = (tmp_path / POINTER_FILE).read_bytes()
    assert len(raw) == SLOT * SLOTS
    slot = raw[SLOT : 2 * SLOT]  # generation 1 lives in slot 1 % 8
    head = struct.pack("<BBBBIIIIII", 0xEB, 0x50, 1, 0, 1, 2, 0, 0, 0, 0)
    assert slot == head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def test_a_frame_written_by_another_implementation_replays(tmp_path: Path) -> None:
    (tmp_path / segment_name(1, 7)).write_bytes(_frame(1, 1, 41, b"x" * 10) + _frame(1, 2, 42, b"y" * 5))
    q = FlashQueue(str(tmp_path), 16384, 2048, 4, 0, 200)
    assert q.depth == 2 and q.recovered_records == 2
    got = []
    while (it := q.peek()) is not None:
        got.append((it[0], bytes(it[1])))
        q.pop()
    assert got == [(1, b"x" * 10), (2, b"y" * 5)]
    assert q.append(1, 1, b"z") == 43  # numbering continues after what is on flash


def test_pointer_commits_after_commit_ms(tmp_path: Path) -> None:
    q = FlashQueue(str(tmp_path), 16384, 2048, 1000, 50, 200)
    for i in range(3):
        q.append(1, 1, _payload(i, 20))
    q.peek()
    q.pop()
    q.tick()
    assert q.committed == 0 and q.delivered == 1
    time.sleep(0.07)
    q.tick()
    assert q.committed == 1
    q.close()


def test_interrupted_truncation_leaves_a_tmp_file_that_recovery_removes(tmp_path: Path) -> None:
    q = FlashQueue(str(tmp_path), 16384, 2048, 4, 0, 200)
    q.append(1, 1, _payload(1, 40))
    q.close()
    seg = tmp_path / segment_name(1, 1)
    seg.write_bytes(seg.read_bytes() + b"\xeb\x01\x10")  # torn
    (tmp_path / (segment_name(1, 1) + ".tmp")).write_bytes(b"half a copy")  # cut mid-copy
    q = FlashQueue(str(tmp_path), 16384, 2048, 4, 0, 200)
    assert q.torn_tails == 1 and q.torn_bytes == 3 and q.depth == 1
    assert sorted(os.listdir(tmp_path)) == [POINTER_FILE, segment_name(1, 1)]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_record": 0}, "max_record"),
        ({"segment_bytes": 100}, "segment_bytes"),
        ({"capacity_bytes": 3000}, "capacity_bytes"),
        ({"commit_every": 0}, "commit_every"),
        ({"commit_ms": -1}, "commit_ms"),
    ],
)
def test_bad_parameters_are_refused_by_name(tmp_path: Path, kwargs: dict[str, int], name: str) -> None:
    args = {"capacity_bytes": 16384, "segment_bytes": 2048, "commit_every": 4, "commit_ms": 0}
    args = {**args, "max_record": 200, **kwargs}
    with pytest.raises(ValueError, match=name):
        FlashQueue(str(tmp_path), **args)


def test_bad_records_are_refused(tmp_path: Path) -> None:
    q = FlashQueue(str(tmp_path), 16384, 2048, 4, 0, 200)
    with pytest.raises(ValueError, match="max_record"):
        q.append(1, 1, b"x" * 201)
    with pytest.raises(ValueError, match="priority"):
        q.append(3, 1, b"x")
    with pytest.raises(ValueError, match="kind"):
        q.append(1, 0, b"x")
    assert q.depth == 0 and q.used_bytes == 0


GOOD = {"node_id": "node-1", "machine": "pump-01"}


@pytest.mark.parametrize(
    ("queue", "key"),
    [
        ({"dir": ""}, "queue.dir"),
        ({"segment_bytes": 1000}, "queue.segment_bytes"),
        ({"capacity_bytes": 10000, "segment_bytes": 8192}, "queue.capacity_bytes"),
        ({"commit_every": 0}, "queue.commit_every"),
        ({"commit_ms": -5}, "queue.commit_ms"),
        ({"capacity": 5}, "queue.capacity"),
    ],
)
def test_queue_config_errors_name_the_key(queue: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(GOOD | {"queue": queue})


def test_queue_config_defaults_and_the_old_key() -> None:
    cfg = validate(GOOD | {"queue": {"max_messages": 1024}})  # configs from the RAM-queue days load
    q = cfg["queue"]
    assert (q["dir"], q["capacity_bytes"], q["segment_bytes"], q["commit_every"], q["commit_ms"]) == (
        "queue", 262144, 16384, 32, 5000)
