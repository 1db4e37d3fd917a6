"""The gateway's durable state: dedupe marks and processed counters, in SQLite (WAL).

Exactly-once processing needs the dedupe marks of a batch and the state it produced
(counters) to be committed in ONE transaction, and the MQTT acknowledgements to go out only
after that commit: a crash before the commit means the broker redelivers and nothing was
recorded; a crash after it means the redelivered copies are recognised as duplicates.
Uplink records live in the outbox (its own file) and are flushed just before this commit,
so upstream sees each record at least once and dedupes on (node, boot, seq).
WAL mode lets readers (metrics, tests) look while the gateway writes, and makes each
commit a single append to the log.
"""

from __future__ import annotations

import sqlite3
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from edgeline.host.dedupe import Deduper

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dedupe (
    node TEXT NOT NULL, boot INTEGER NOT NULL, floor INTEGER NOT NULL, above BLOB NOT NULL,
    PRIMARY KEY (node, boot)
);
CREATE TABLE IF NOT EXISTS births (
    node TEXT PRIMARY KEY, payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS processed (
    machine TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (machine, kind)
);
"""


def _pack(seqs: list[int]) -> bytes:
    return struct.pack(f"<{len(seqs)}Q", *seqs)


def _unpack(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 8}Q", blob))


class GatewayStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        # The gateway commits from its one asyncio thread; tests may read from others.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a process kill (the WAL is written before commit
        # returns); only an OS crash or power cut may lose the last commits.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def load_deduper(self, window: int = 4096) -> Deduper:
        d = Deduper(window)
        for node, boot, floor, above in self.db.execute("SELECT node, boot, floor, above FROM dedupe"):
            d.restore((node, boot), floor, _unpack(above))
        return d

    def save_birth(self, node: str, payload: bytes) -> None:
        """The node's latest birth certificate, so a restarted gateway knows its nodes."""
        self.db.execute(
            "INSERT INTO births (node, payload) VALUES (?, ?) "
            "ON CONFLICT (node) DO UPDATE SET payload = excluded.payload",
            (node, payload),
        )

    def births(self) -> list[tuple[str, bytes]]:
        return [(n, bytes(p)) for n, p in self.db.execute("SELECT node, payload FROM births ORDER BY node")]

    def processed(self) -> dict[tuple[str, str], int]:
        return {(m, k): c for m, k, c in self.db.execute("SELECT machine, kind, count FROM processed")}

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def write_batch(self, deduper: Deduper, counts: Counter[tuple[str, str]]) -> None:
        """Within an open transaction: the changed dedupe streams and counter increments."""
        rows = []
        for key in deduper.dirty:
            floor, above = deduper.export(key)
            rows.append((key[0], key[1], floor, _pack(above)))
        deduper.dirty.clear()
        self.db.executemany(
            "INSERT INTO dedupe (node, boot, floor, above) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (node, boot) DO UPDATE SET floor = excluded.floor, above = excluded.above",
            rows,
        )
        self._add_counts(counts.items())

    def _add_counts(self, items: Iterable[tuple[tuple[str, str], int]]) -> None:
        self.db.executemany(
            "INSERT INTO processed (machine, kind, count) VALUES (?, ?, ?) "
            "ON CONFLICT (machine, kind) DO UPDATE SET count = count + excluded.count",
            [(m, k, c) for (m, k), c in items],
        )

    def close(self) -> None:
        self.db.close()
