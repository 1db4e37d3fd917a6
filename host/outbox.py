"""Host code. The gateway's durable outbox for uplink records, in SQLite (WAL mode).

Records wait here, in FIFO order, until an uplink has confirmed them (MQTT PUBACK, Kafka
delivery report); then `ack(upto_id)` removes them. The outbox is bounded by total record
bytes and by record age; what a bound throws away is counted by reason (`size`, `age`), and
the counters live in the same file, written in the same transaction as the change they count.

Why SQLite in WAL mode rather than an append-only segment log:

- A commit is atomic and survives a process kill (SIGKILL): in WAL mode the commit is a
  single append to the `-wal` file, written before COMMIT returns, and a torn tail is
  ignored at the next open. A segment log needs its own record CRCs, torn-tail recovery and
  an ack-offset file kept consistent with the segments; SQLite has done that for decades.
- The bounds need deletes at the head (ack, age) and an exact byte total, and the drop
  counters must agree with the rows after any crash: one transaction does all of it. In a
  segment log, "drop the oldest 3 MB" or "drop everything older than 7 days" means either
  rewriting segments or a second index kept in sync by hand.
- It is the stdlib, and the gateway's own state (gateway_store.py) already lives in SQLite.
- The cost is per-row overhead, which batching hides: put() only appends to a list in
  memory and flush() writes the batch in one transaction (measured well above the
  20,000 records/s target; see tests/host/test_outbox.py::test_put_rate).

Durability contract (docs/uplink.md says the same):

- A record is durable once `flush()` has returned after its `put()`. flush() runs
  automatically every `flush_every` records and whenever `peek_batch()` is called; the gateway
  calls it once per ingest batch, *before* it acknowledges that batch to its MQTT broker,
  so a SIGKILL loses no record whose source event was acknowledged.
- `ack(upto_id)` is durable when it returns. A kill before that means the records are sent
  again after the restart: uplinks are at-least-once, and consumers dedupe on
  (node, boot, seq), which every uplink record carries.
- `synchronous="NORMAL"` (default) survives a process kill, not a power cut: the last
  commits since the most recent checkpoint may be lost on power loss. `"FULL"` also
  survives a power cut, at the cost of an fsync per commit.

Ids are assigned at put() time, strictly increasing, and never reused, not even after
every record was acked and the process restarted (the high-water mark is persisted).

Thread safety: one lock guards the connection, so the gateway may put() on its asyncio
thread while the uplink runner peeks and acks in its own executor thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_FORMAT_VERSION = 1  # PRAGMA user_version of an outbox file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,       -- assigned by the outbox: FIFO order, never reused
    t_put INTEGER NOT NULL,       -- wall clock at put(), microseconds since the epoch
    size INTEGER NOT NULL,        -- bytes this record counts against max_bytes
    key TEXT NOT NULL,
    trace TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COUNTERS = ("last_id", "put", "acked", "dropped_size", "dropped_age")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0


class OutboxError(RuntimeError):
    """The outbox file cannot be used: locked by another process, or of a newer format."""


@dataclass(frozen=True)
class OutboxRecord:
    id: int
    key: str  # the uplink's routing key: the machine key (Kafka partition key, MQTT topic)
    payload: bytes
    trace_id: str  # W3C trace id, hex
    t_put_us: int  # wall clock at put()


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # records waiting (committed and not yet flushed)
    bytes: int  # their size as counted against max_bytes
    put: int  # records ever put (persisted)
    acked: int  # records ever acknowledged by an uplink (persisted)
    dropped_size: int  # records dropped to stay under max_bytes (persisted)
    dropped_age: int  # records dropped for being older than max_age_s (persisted)
    head_id: int  # id of the oldest waiting record, 0 when empty
    last_id: int  # id of the newest record ever put


def record_size(key: str, payload: bytes, trace_id: str) -> int:
    """Bytes a record counts against `max_bytes`: payload, key and trace id.

    The file on disk is larger by SQLite's per-row and per-page overhead (about 40 bytes a
    row) plus the WAL, which is checkpointed back every ~4 MB.
    """
    return len(payload) + len(key.encode()) + len(trace_id)


class Outbox:
    """A durable FIFO of uplink records.

    :param path: the SQLite file (created with its folder); ":memory:" for a non-durable one.
    :param max_bytes: bound on the records' total `record_size`; the oldest are dropped
        (counted as `size`) to make room for new ones.
    :param max_age_s: records older than this (since put) are dropped, counted as `age`.
    :param flush_every: put() commits by itself once this many records are pending.
    :param synchronous: "NORMAL" (survives a process kill) or "FULL" (survives a power cut).
    :param clock: wall clock in seconds (tests pass a fake one).
    :raises ValueError: for a bound or mode out of range.
    :raises OutboxError: if another process has the file open, or it has a newer format.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        flush_every: int = 1000,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = str(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.flush_every = flush_every
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int, int, str, str, bytes]] = []
        self._pending_bytes = 0
        self._closed = False
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=1.0)
        try:
            self._open(synchronous.upper())
        except sqlite3.OperationalError as e:
            self._db.close()
            if "locked" in str(e):
                raise OutboxError(
                    f"outbox {self.path} is in use by another process ({e}): one gateway per state folder"
                ) from e
            raise
        except BaseException:
            self._db.close()
            raise

    def _open(self, synchronous: str) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _FORMAT_VERSION:
            raise OutboxError(
                f"outbox {self.path} has format {version}; this gateway reads up to {_FORMAT_VERSION}"
            )
        # One process owns an outbox: two gateways draining one file would send everything
        # twice. EXCLUSIVE locking also keeps the WAL index in process memory (no -shm file).
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode not in ("wal", "memory"):
            raise OutboxError(f"outbox {self.path}: SQLite refused WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first put
        try:
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={_FORMAT_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        stored = dict(db.execute("SELECT name, value FROM meta").fetchall())
        self._c = {name: int(stored.get(name, 0)) for name in _COUNTERS}
        depth, total, head, last = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MIN(id), 0), COALESCE(MAX(id), 0) FROM outbox"
        ).fetchone()
        self._depth, self._bytes, self._head = int(depth), int(total), int(head)
        self._c["last_id"] = max(self._c["last_id"], int(last))
        self._next_id = self._c["last_id"] + 1

    # -- writing --------------------------------------------------------------------------
    def put(self, key: str, payload: bytes, trace_id: str) -> int:
        """Queue a record; returns its id. Durable after the next flush() (see the module doc).

        :raises ValueError: for a wrong type, an empty key, or a record larger than max_bytes.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"outbox key must be a non-empty str, got {key!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ValueError(f"outbox payload must be bytes, got {type(payload).__name__}")
        if not isinstance(trace_id, str):
            raise ValueError(f"trace id must be a hex str, got {type(trace_id).__name__}")
        payload = bytes(payload)
        size = record_size(key, payload, trace_id)
        if size > self.max_bytes:
            raise ValueError(
                f"record for {key!r} is {size} bytes, more than the outbox's whole max_bytes={self.max_bytes}"
            )
        t_us = int(self._clock() * 1_000_000)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._pending.append((rid, t_us, size, key, trace_id, payload))
            self._pending_bytes += size
            if len(self._pending) >= self.flush_every:
                self._flush_locked()
        return rid

    def flush(self) -> int:
        """Commit pending records (one transaction), enforcing both bounds; returns how many."""
        with self._lock:
            return self._flush_locked()

    def expire(self) -> int:
        """Drop records older than max_age_s now; returns how many (also done by flush/peek)."""
        with self._lock:
            before = self._c["dropped_age"]
            if self._pending:
                self._flush_locked()
            else:
                self._maybe_expire_locked()
            return self._c["dropped_age"] - before

    def ack(self, upto_id: int) -> int:
        """Remove every record with id <= upto_id (the uplink confirmed them); returns how many."""
        with self._lock:
            if self._depth == 0 or upto_id < self._head:
                return 0
            upto_id = min(upto_id, self._c["last_id"])
            n, nbytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id <= ?", (upto_id,)
            ).fetchone()
            if n == 0:
                return 0
            with self._transaction() as c:
                self._db.execute("DELETE FROM outbox WHERE id <= ?", (upto_id,))
                c["acked"] += n
                self._depth -= n
                self._bytes -= nbytes
            return int(n)

    # -- reading --------------------------------------------------------------------------
    def peek_batch(self, n: int, after_id: int = 0) -> list[OutboxRecord]:
        """The oldest `n` waiting records with id > after_id, in FIFO order, without removing them.

        Flushes pending records first (so it sees every put) and drops expired ones.
        """
        if n < 1:
            return []
        with self._lock:
            if not self._flush_locked():
                self._maybe_expire_locked()
            rows = self._db.execute(
                "SELECT id, key, payload, trace, t_put FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, n),
            ).fetchall()
        return [OutboxRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    @property
    def depth(self) -> int:
        with self._lock:
            return self._depth + len(self._pending)

    @property
    def last_id(self) -> int:
        """Id of the newest record put (flushed or not): nothing new if a reader is past it."""
        return self._next_id - 1

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                depth=self._depth + len(self._pending),
                bytes=self._bytes + self._pending_bytes,
                put=self._c["put"] + len(self._pending),
                acked=self._c["acked"],
                dropped_size=self._c["dropped_size"],
                dropped_age=self._c["dropped_age"],
                head_id=self._head or (self._pending[0][0] if self._pending else 0),
                last_id=self._next_id - 1,
            )

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Flush what is pending, checkpoint the WAL into the file, and close."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked()
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                self._closed = True

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals (lock held) ------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, int]]:
        """BEGIN ... COMMIT with the counters; in-memory state changes only if it commits."""
        c = dict(self._c)
        depth, nbytes, head = self._depth, self._bytes, self._head
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield c
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", [(k, c[k]) for k in _COUNTERS]
            )
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            self._depth, self._bytes, self._head = depth, nbytes, head
            raise
        self._c = c
        if self._depth == 0:
            self._head = 0
        else:
            row = self._db.execute("SELECT MIN(id) FROM outbox").fetchone()
            self._head = int(row[0]) if row[0] is not None else 0

    def _maybe_expire_locked(self) -> None:
        """Expire in a transaction of its own, only when the head record is too old."""
        if not self._head:
            return
        row = self._db.execute("SELECT t_put FROM outbox WHERE id = ?", (self._head,)).fetchone()
        if row is not None and row[0] < int((self._clock() - self.max_age_s) * 1_000_000):
            with self._transaction() as c:
                self._expire_locked(c)

    def _flush_locked(self) -> int:
        rows = self._pending
        if not rows:
            return 0
        cutoff_us = int((self._clock() - self.max_age_s) * 1_000_000)
        # On an error nothing is committed and the records stay pending for the next attempt.
        with self._transaction() as c:
            c["put"] += len(rows)
            c["last_id"] = rows[-1][0]
            # Records that waited in memory past max_age are dropped before they land.
            fresh = [r for r in rows if r[1] >= cutoff_us]
            c["dropped_age"] += len(rows) - len(fresh)
            incoming = sum(r[2] for r in fresh)
            excess = self._bytes + incoming - self.max_bytes
            if excess > 0:
                excess -= self._drop_oldest_locked(c, excess)
            if excess > 0:  # the batch alone is over the bound: its oldest go too
                k = 0
                while excess > 0:
                    excess -= fresh[k][2]
                    incoming -= fresh[k][2]
                    k += 1
                c["dropped_size"] += k
                fresh = fresh[k:]
            self._db.executemany(
                "INSERT INTO outbox (id, t_put, size, key, trace, payload) VALUES (?, ?, ?, ?, ?, ?)",
                fresh,
            )
            self._depth += len(fresh)
            self._bytes += incoming
            self._expire_locked(c, cutoff_us)
        self._pending = []
        self._pending_bytes = 0
        return len(rows)

    def _drop_oldest_locked(self, c: dict[str, int], need: int) -> int:
        """Delete the oldest committed records until `need` bytes are freed; returns bytes freed."""
        freed = n = 0
        upto = 0
        cur = self._db.execute("SELECT id, size FROM outbox ORDER BY id")
        for rid, size in cur:
            freed += size
            n += 1
            upto = rid
            if freed >= need:
                break
        cur.close()
        if n:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (upto,))
            c["dropped_size"] += n
            self._depth -= n
            self._bytes -= freed
        return freed

    def _expire_locked(self, c: dict[str, int], cutoff_us: int | None = None) -> None:
        """Drop the run of records at the head put before the cutoff.

        Records are in put order, which is time order unless the wall clock stepped back;
        a record that looks old behind a fresh one is dropped when it reaches the head.
        """
        if cutoff_us is None:
            cutoff_us = int((self._clock() - self.max_age_s) * 1_000_000)
        n = nbytes = 0
        upto = 0
        cur = self._db.execute("SELECT id, t_put, size FROM outbox ORDER BY id")
        for rid, t_put, size in cur:
            if t_put >= cutoff_us:
                break
            n += 1
            nbytes += size
            upto = rid
        cur.close()
        if n:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (upto,))
            c["dropped_age"] += n
            self._depth -= n
            self._bytes -= nbytes


def measure_put_rate(path: str | Path, records: int = 100_000, payload_bytes: int = 200) -> dict[str, float]:
    """Put `records` records of `payload_bytes` into a fresh outbox at `path` and flush.

    Returns records/s for put+flush, for a peek+ack drain of the same records, and the
    file's bytes per record (`edgeline bench outbox` material).
    """
    payload = bytes(range(256)) * (payload_bytes // 256 + 1)
    payload = payload[:payload_bytes]
    trace = "0af7651916cd43dd8448eb211c80319c"
    with Outbox(path, flush_every=1000) as ob:
        t0 = time.perf_counter()
        for i in range(records):
            ob.put(f"site/line/m{i % 16}", payload, trace)
        ob.flush()
        t_put = time.perf_counter() - t0
        file_bytes = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))
        t0 = time.perf_counter()
        drained = 0
        while True:
            batch = ob.peek_batch(1000)
            if not batch:
                break
            drained += ob.ack(batch[-1].id)
        t_drain = time.perf_counter() - t0
    return {
        "records": float(records),
        "put_per_s": records / t_put,
        "drain_per_s": drained / t_drain,
        "file_bytes_per_record": file_bytes / records,
    }
