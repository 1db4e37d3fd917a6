"""Host code. The uplink runner: drains the outbox into an uplink from an asyncio loop.

Each step (serve the uplink's callbacks, ack what it confirmed, hand over the next
records) runs on one worker thread of the runner's own, so neither SQLite nor a client
library ever holds up the loop; the coroutine only decides how long to wait before the
next step. paho and librdkafka do their network I/O on their own threads.

- Up to `max_in_flight` records are handed over and not yet confirmed; the outbox drops
  a record only once the uplink confirmed it and everything before it (`ack(upto_id)`).
- Uplink down (not connected, fatal error): steps back off exponentially up to
  `backoff_max_s`; the outbox keeps filling within its bounds and counts what they drop.
- A failed delivery: once every record in flight has an outcome, the uplink is reset and
  sending starts again after the last confirmed record (consumers dedupe the repeats).

    outbox = Outbox(state_dir / "outbox.sqlite3")
    runner = Uplinker(outbox, MqttUplink("broker.upstream", 8883, tls_ca=...))
    await runner.start()
    ... outbox.put(key, payload, trace_id); outbox.flush() ...
    await runner.stop()
    outbox.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.machine_state import MachineState
from edgeline.host.outbox import Outbox
from edgeline.host.uplink import (
    Uplink,
    UplinkBusy,
    UplinkConfig,
    build_uplink,
    encode_record,
    record_from_event,
)
from edgeline.host.wire import Event

log = logging.getLogger("edgeline.uplinker")


class _Step(enum.Enum):
    PROGRESS = 1  # something moved: step again at once
    IDLE = 2  # nothing to do: wait `idle_s`
    DOWN = 3  # uplink unavailable or failed: back off


@dataclass(frozen=True)
class UplinkerStats:
    """For metrics: counters since start(), outbox figures as persisted."""

    up: bool  # connected and confirming (not stalled for `stall_s` with records in flight)
    depth: int  # records in the outbox, in flight included
    bytes: int
    in_flight: int  # handed to the uplink, not yet confirmed
    sent: int  # hand-overs, resends included
    confirmed: int  # records confirmed by the uplink and removed from the outbox
    resent: int  # records handed over again after a failed delivery
    rejected: int  # records that can never be sent (logged, then skipped)
    dropped_size: int  # outbox bound drops (persisted across restarts)
    dropped_age: int
    failures: int  # failed-delivery rewinds


class Uplinker:
    """Drains `outbox` into `uplink`; see the module doc.

    :param batch: records taken from the outbox per step.
    :param max_in_flight: records handed over and not yet confirmed, at most.
    :param idle_s: wait between steps when there is nothing to do.
    :param backoff_min_s: first wait while the uplink is down; doubles up to `backoff_max_s`.
    :param stall_s: records in flight and no confirmation for this long: reported not `up`.
    :param expire_every_s: how often the outbox drops records past their age bound.
    """

    def __init__(
        self,
        outbox: Outbox,
        uplink: Uplink,
        *,
        batch: int = 256,
        max_in_flight: int = 1000,
        idle_s: float = 0.005,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 1.0,
        stall_s: float = 5.0,
        expire_every_s: float = 1.0,
    ) -> None:
        if batch < 1 or max_in_flight < 1:
            raise ValueError(f"batch ({batch}) and max_in_flight ({max_in_flight}) must be at least 1")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_min_s ({backoff_min_s}) <= backoff_max_s ({backoff_max_s})")
        self.outbox = outbox
        self.uplink = uplink
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.idle_s = idle_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stall_s = stall_s
        self.expire_every_s = expire_every_s
        self._cursor = 0  # id of the last record handed over (0: start at the outbox head)
        self._acked = 0
        self._sent = self._confirmed = self._resent = self._rejected = self._failures = 0
        self._last_progress = time.monotonic()
        self._next_expire = 0.0
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the uplink (connecting in the background) and the drain loop."""
        if self._task is not None:
            raise RuntimeError("Uplinker already started")
        self._stopping = False
        self._wake = asyncio.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"edgeline-uplink-{self.uplink.name}"
        )
        await asyncio.get_running_loop().run_in_executor(self._pool, self.uplink.start)
        self._task = asyncio.create_task(self._run(), name=f"edgeline-uplink-{self.uplink.name}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop sending, give records in flight `timeout` s to be confirmed, close the uplink.

        What is not confirmed by then stays in the outbox and is sent after the next start.
        The outbox stays open (its owner closes it).
        """
        if self._task is None or self._pool is None:
            return
        self._stopping = True
        self.notify()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._finish, timeout)
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def notify(self) -> None:
        """Wake the drain loop now (e.g. after the gateway flushed a batch). Loop thread only."""
        if self._wake is not None:
            self._wake.set()

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth == 0 and self.uplink.in_flight == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    def stats(self) -> UplinkerStats:
        o = self.outbox.stats()
        in_flight = self.uplink.in_flight
        stalled = in_flight > 0 and time.monotonic() - self._last_progress > self.stall_s
        return UplinkerStats(
            up=self.uplink.ready and not stalled,
            depth=o.depth,
            bytes=o.bytes,
            in_flight=in_flight,
            sent=self._sent,
            confirmed=self._confirmed,
            resent=self._resent,
            rejected=self._rejected,
            dropped_size=o.dropped_size,
            dropped_age=o.dropped_age,
            failures=self._failures,
        )

    # -- the loop (asyncio side) ------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None and self._pool is not None
        backoff = self.backoff_min_s
        while not self._stopping:
            try:
                step = await loop.run_in_executor(self._pool, self._step)
            except Exception:  # a bug or a disk error must not end the uplink for good
                log.exception("uplink step failed; retrying after %.2f s", backoff)
                step = _Step.DOWN
            if step is _Step.PROGRESS:
                backoff = self.backoff_min_s
                await asyncio.sleep(0)
                continue
            if step is _Step.IDLE:
                backoff = self.backoff_min_s
                wait = self.idle_s
            else:
                wait = backoff
                backoff = min(backoff * 2, self.backoff_max_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    # -- one step (the runner's worker thread) ---------------------------------------------------
    def _step(self) -> _Step:
        ob, up = self.outbox, self.uplink
        now = time.monotonic()
        progressed = False
        p = up.poll()
        if p.confirmed_upto > self._acked:
            self._confirmed += ob.ack(p.confirmed_upto)
            self._acked = p.confirmed_upto
            self._last_progress = now
            progressed = True
        if now >= self._next_expire:
            ob.expire()
            self._next_expire = now + self.expire_every_s
        if p.failed:
            if p.unsettled:
                return _Step.PROGRESS if progressed else _Step.IDLE  # wait for every outcome
            self._failures += 1
            self._resent += up.in_flight
            log.warning("uplink %s: delivery failed; resending from after record %d", up.name, self._acked)
            up.reset()
            self._cursor = self._acked
            return _Step.DOWN
        if not up.ready:
            return _Step.DOWN
        room = self.max_in_flight - up.in_flight
        if room <= 0 or ob.last_id <= self._cursor:
            return _Step.PROGRESS if progressed else _Step.IDLE
        for rec in ob.peek_batch(min(self.batch, room), self._cursor):
            try:
                up.send(rec)
            except UplinkBusy as e:
                log.debug("uplink %s busy: %s", up.name, e)
                break
            except ValueError as e:
                # Can never be sent: counted, logged, and confirmed as skipped so the
                # records behind it are not held up for ever.
                self._rejected += 1
                log.error("uplink %s rejected outbox record %d (key %r): %s", up.name, rec.id, rec.key, e)
                up.tracker.sent(rec.id, ("rejected", rec.id))
                up.tracker.done(("rejected", rec.id))
            else:
                self._sent += 1
            self._cursor = rec.id
            progressed = True
        return _Step.PROGRESS if progressed else _Step.IDLE

    def _finish(self, timeout: float) -> None:
        try:
            self.uplink.close(timeout)
        finally:
            p = self.uplink.poll()
            if p.confirmed_upto > self._acked:
                self._confirmed += self.outbox.ack(p.confirmed_upto)
                self._acked = p.confirmed_upto


def open_uplinker(cfg: UplinkConfig, state_dir: str | Path | None) -> Uplinker | None:
    """The outbox (`<state_dir>/outbox.sqlite3`, in memory without a state_dir) and the runner
    for a gateway's `uplink` configuration; None when the configuration has no uplink.

    :raises ValueError, UplinkError: from `build_uplink`.
    :raises OutboxError: if the outbox file is in use or unreadable.
    """
    uplink = build_uplink(cfg)
    if uplink is None:
        return None
    path = Path(state_dir) / "outbox.sqlite3" if state_dir else ":memory:"
    outbox = Outbox(path, max_bytes=cfg.max_bytes, max_age_s=cfg.max_age_s)
    return Uplinker(outbox, uplink)


def uplink_listener(outbox: Outbox, gateway_id: str) -> Callable[[Event, MachineState, int], None]:
    """A gateway event listener (`Gateway.event_listeners`) that puts one uplink record per
    accepted window event (`evt`; telemetry is not forwarded) into `outbox`.

    The records become durable at the next `outbox.flush()`, which the gateway calls once per
    ingest batch before it commits and acknowledges the batch (docs/uplink.md).
    """

    def on_event(ev: Event, m: MachineState, t_recv_us: int) -> None:
        if ev.kind == w.KIND_EVT:
            rec = record_from_event(ev, m.key, gateway_id, t_recv_us)
            outbox.put(m.key, encode_record(rec), ev.trace_hex)

    return on_event
