"""The uplink outbox: FIFO order, ack, size and age bounds with persisted drop counters,
durability across SIGKILL of a writer process, and its put rate."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from edgeline.host.outbox import Outbox, OutboxError, measure_put_rate, record_size

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_fifo_order_peek_and_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as ob:
        ids = [ob.put(f"s/l/m{i % 3}", f"p{i}".encode(), TRACE) for i in range(10)]
        assert ids == list(range(1, 11))
        first = ob.peek_batch(4)
        assert [r.id for r in first] == [1, 2, 3, 4]
        assert [r.payload for r in first] == [b"p0", b"p1", b"p2", b"p3"]
        assert first[1].key == "s/l/m1" and first[1].trace_id == TRACE
        assert [r.id for r in ob.peek_batch(4, after_id=4)] == [5, 6, 7, 8]
        assert ob.peek_batch(4) == first, "peek does not remove"
        assert ob.ack(3) == 3
        assert [r.id for r in ob.peek_batch(3)] == [4, 5, 6]
        assert ob.ack(2) == 0, "acking below the head is a no-op"
        assert ob.ack(100) == 7
        assert ob.peek_batch(10) == [] and ob.depth == 0
        s = ob.stats()
        assert (s.put, s.acked, s.depth, s.bytes, s.head_id, s.last_id) == (10, 10, 0, 0, 0, 10)


def test_ids_never_reused_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as ob:
        for i in range(3):
            ob.put("s/l/m", bytes([i]), TRACE)
        ob.peek_batch(10)
        ob.ack(3)
    with Outbox(path) as ob:
        assert ob.put("s/l/m", b"x", TRACE) == 4
        assert [r.id for r in ob.peek_batch(10)] == [4]
        assert ob.stats().acked == 3


def test_unflushed_puts_are_visible_to_peek_and_flushed_by_close(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path, flush_every=1000) as ob:
        ob.put("s/l/m", b"a", TRACE)
        assert ob.depth == 1
        assert [r.payload for r in ob.peek_batch(5)] == [b"a"]  # peek flushes
        ob.put("s/l/m", b"b", TRACE)
    with Outbox(path) as ob:
        assert [r.payload for r in ob.peek_batch(5)] == [b"a", b"b"]


def test_size_bound_drops_oldest_and_counts_persist(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    size = record_size("s/l/m", bytes(68), TRACE)
    assert size == 68 + 5 + 32
    per = 10
    with Outbox(path, max_bytes=per * size, flush_every=3) as ob:
        for i in range(25):
            ob.put("s/l/m", i.to_bytes(68, "big"), TRACE)
        ob.flush()
        recs = ob.peek_batch(100)
        assert [int.from_bytes(r.payload, "big") for r in recs] == list(range(15, 25)), "newest kept, FIFO"
        s = ob.stats()
        assert (s.depth, s.bytes, s.dropped_size, s.dropped_age, s.put) == (10, 10 * size, 15, 0, 25)
    with Outbox(path, max_bytes=per * size, flush_every=1000) as ob:
        assert ob.stats().dropped_size == 15, "drop counters are persisted"
        # One flush carrying more than the whole bound: its own oldest records go too.
        for i in range(100, 125):
            ob.put("s/l/m", i.to_bytes(68, "big"), TRACE)
        ob.flush()
        recs = ob.peek_batch(100)
        assert [int.from_bytes(r.payload, "big") for r in recs] == list(range(115, 125))
        assert ob.stats().dropped_size == 15 + 10 + 15
        assert ob.stats().bytes <= per * size


def test_record_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", max_bytes=100) as ob:
        with pytest.raises(ValueError, match="max_bytes=100"):
            ob.put("s/l/m", bytes(200), TRACE)
        assert ob.stats().put == 0


@pytest.mark.parametrize(
    "args",
    [("", b"x", TRACE), (b"key", b"x", TRACE), ("s/l/m", "text", TRACE), ("s/l/m", b"x", b"trace")],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, args: tuple[object, object, object]) -> None:
    with Outbox(tmp_path / "o.sqlite3") as ob, pytest.raises(ValueError):
        ob.put(*args)  # type: ignore[arg-type]


def test_bad_settings_raise_value_error(tmp_path: Path) -> None:
    for kwargs in ({"max_bytes": 0}, {"max_age_s": 0}, {"flush_every": 0}, {"synchronous": "OFF"}):
        with pytest.raises(ValueError):
            Outbox(tmp_path / "o.sqlite3", **kwargs)


def test_age_bound_drops_expired_records_and_counts_persist(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    clock = FakeClock()
    with Outbox(path, max_age_s=100, clock=clock) as ob:
        for i in range(5):
            ob.put("s/l/m", bytes([i]), TRACE)
        clock.t += 50
        for i in range(5, 10):
            ob.put("s/l/m", bytes([i]), TRACE)
        assert len(ob.peek_batch(100)) == 10
        clock.t += 60  # the first five are 110 s old, the others 60 s
        assert [r.payload[0] for r in ob.peek_batch(100)] == [5, 6, 7, 8, 9]
        assert ob.stats().dropped_age == 5
        clock.t += 50
        assert ob.expire() == 5
        s = ob.stats()
        assert (s.depth, s.bytes, s.dropped_age, s.dropped_size) == (0, 0, 10, 0)
        # Records that waited unflushed past the bound are dropped as they would land.
        ob.put("s/l/m", b"late", TRACE)
        clock.t += 101
        ob.flush()
        assert ob.depth == 0 and ob.stats().dropped_age == 11
    with Outbox(path, max_age_s=100, clock=clock) as ob:
        assert ob.stats().dropped_age == 11, "drop counters are persisted"


def test_a_second_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as ob:
        ob.put("s/l/m", b"x", TRACE)
        with pytest.raises(OutboxError, match="in use"):
            Outbox(path)
    with Outbox(path) as ob:  # released on close
        assert ob.depth == 1


def test_concurrent_put_and_drain_keep_order(tmp_path: Path) -> None:
    """The gateway puts on its thread while the runner peeks and acks on another."""
    n = 20_000
    got: list[int] = []
    with Outbox(tmp_path / "o.sqlite3", flush_every=100) as ob:

        def drain() -> None:
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                batch = ob.peek_batch(500)
                got.extend(int.from_bytes(r.payload, "big") for r in batch)
                if batch:
                    ob.ack(batch[-1].id)

        t = threading.Thread(target=drain)
        t.start()
        for i in range(n):
            ob.put(f"s/l/m{i % 5}", i.to_bytes(4, "big"), TRACE)
        ob.flush()
        t.join(35)
        assert not t.is_alive()
        assert got == list(range(n))
        assert ob.stats().acked == n


# -- SIGKILL durability -----------------------------------------------------------------------
_WRITER = r"""
import sys
from edgeline.host.outbox import Outbox
ob = Outbox(sys.argv[1], flush_every=10**9)
i = ob.last_id
print("R", i, flush=True)
while True:
    for _ in range(200):
        i += 1
        rid = ob.put("s/l/m%d" % (i % 7), i.to_bytes(8, "big") * 8, "%032x" % i)
        assert rid == i, (rid, i)
    ob.flush()
    print("F", i, flush=True)
    if i % 1000 == 0:
        ob.ack(i - 1000)
        print("A", i - 1000, flush=True)
"""


def test_sigkill_mid_stream_loses_nothing_flushed_and_resurrects_nothing_acked(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    rng = random.Random(7)
    last_seen = 0
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            start = proc.stdout.readline().split()
            assert start[0] == "R", [*start, proc.stderr.read() if proc.stderr else ""]
            assert int(start[1]) >= last_seen, "a restarted writer continues after every id it flushed"
            flushed = acked = 0
            target = int(start[1]) + rng.randrange(3000, 9000)
            deadline = time.monotonic() + 30
            while flushed < target and time.monotonic() < deadline:
                tag, value = proc.stdout.readline().split()
                if tag == "F":
                    flushed = int(value)
                elif tag == "A":
                    acked = int(value)
            assert flushed >= target, "the writer did not reach its target in 30 s"
            time.sleep(rng.uniform(0, 0.02))  # land somewhere inside the next batch or commit
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()
        with Outbox(path) as ob:
            s = ob.stats()
            recs = ob.peek_batch(10**6)
        ids = [r.id for r in recs]
        assert ids == list(range(s.head_id, s.last_id + 1)), "FIFO with no hole"
        assert s.last_id >= flushed, "every record whose flush returned is still there"
        assert s.head_id - 1 >= acked, "no acknowledged record came back"
        assert (s.head_id - 1) % 1000 == 0 and s.head_id - 1 <= max(0, s.last_id - 1000)
        for r in recs:
            assert (r.payload, r.trace_id, r.key) == (
                r.id.to_bytes(8, "big") * 8,
                f"{r.id:032x}",
                f"s/l/m{r.id % 7}",
            )
        assert (s.put, s.acked, s.depth) == (s.last_id, s.head_id - 1, len(recs))
        last_seen = s.last_id


def test_put_rate(tmp_path: Path) -> None:
    """Target: >= 20,000 records/s put (batched commits); drain measured too."""
    r = measure_put_rate(tmp_path / "rate.sqlite3", records=50_000, payload_bytes=200)
    print(
        f"\noutbox: put {r['put_per_s']:,.0f} records/s, peek+ack drain {r['drain_per_s']:,.0f} records/s, "
        f"{r['file_bytes_per_record']:.0f} file bytes/record"
    )
    assert r["put_per_s"] >= 20_000
