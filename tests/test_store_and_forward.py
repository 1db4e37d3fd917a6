"""Store and forward, end to end: the node loses nothing it measured across power cuts,
broker and gateway outages, and says exactly what it had to drop when its flash was full.

A virtual node (the real firmware under the MicroPython unix port) publishes to a real
broker; a real Gateway (host/gateway.py) dedupes on (node, boot, seq). The node logs a
`logged` line for every record once it is on flash: that is the list of what must arrive.
docs/store-and-forward.md describes the queue these tests exercise.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from edgeline.firmware.edgeline_node import wire as w
from edgeline.hil.mosquitto import MosquittoProcess
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.machine_state import MachineState
from edgeline.host.ports import free_tcp_port
from edgeline.host.virtual_node import VirtualNode
from edgeline.host.wire import Event

from wire_messages import Collector

SITE = "sf"
NODE = "sf-1"
KILLS = 50


def node_config(
    host: str, port: int, *, period_ms: int = 25, queue: dict[str, int] | None = None
) -> dict[str, Any]:
    return {
        "node_id": NODE,
        "site": SITE,
        "line": "l1",
        "machine": "m1",
        "broker": {"host": host, "port": port, "keepalive": 10},
        "hal": {"kind": "sim", "seed": 7, "rate_hz": 1000},
        "window": {"samples": 64, "period_ms": period_ms},
        "spc": {"calibration": 20, "k_sigma": 3.0, "run": 2},
        "telemetry_every": 10,
        "data_dir": "data",
        "queue": {"commit_every": 16, "commit_ms": 500, **(queue or {})},
    }


@dataclass
class Accepted:
    """Every event a gateway accepted (after its dedupe), in the order it processed them."""

    events: list[tuple[int, int, int, bool]] = field(default_factory=list)  # boot, seq, kind, anomaly

    def __call__(self, ev: Event, _m: MachineState, _t: int) -> None:
        if ev.node == NODE:
            self.events.append((ev.boot, ev.seq, ev.kind, ev.anomaly))

    def keys(self) -> list[tuple[int, int]]:
        return [(b, s) for b, s, _k, _a in self.events]


def gateway(host: str, port: int, acc: Accepted, state_dir: Path | None = None) -> Gateway:
    """A gateway (not started yet) that reports what it accepts to `acc`."""
    gw = Gateway(
        GatewayConfig(
            broker_host=host,
            broker_port=port,
            site=SITE,
            opcua_port=free_tcp_port(),
            state_dir=str(state_dir) if state_dir else None,
        )
    )
    gw.event_listeners.append(acc)
    return gw


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def status(vn: VirtualNode) -> dict[str, Any]:
    """Ask the node for a `status` line and return it."""
    n = len(vn.events("status"))
    vn.command("status")
    await wait_until(lambda: len(vn.events("status")) > n, 10, f"a status line from {vn.node_id}")
    return vn.events("status")[-1]


async def drained(
    vn: VirtualNode, acc: Accepted, logged: Callable[[], set[tuple[int, int]]] | None, timeout: float
) -> None:
    """Wait until every logged record was accepted (unless `logged` is None: some were
    dropped) and nothing waits in the node's queue but what is in flight: with windows
    still coming, the newest record is often sent and its PUBACK not yet back (a broker
    without TCP_NODELAY holds a PUBACK until the node's delayed ACK, up to 40 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        if logged is None or logged() <= set(acc.keys()):
            st = await status(vn)
            if st["queue"] <= st["inflight"] and st["gateway"]:
                return
        if time.monotonic() > deadline:
            missing = sorted(logged() - set(acc.keys())) if logged else []
            raise AssertionError(
                f"not drained within {timeout:.0f} s: {len(missing)} logged records never reached the "
                f"gateway (first {missing[:5]}); last status {vn.last('status')}; "
                f"stderr {vn.stderr_tail[-5:]}"
            )
        await asyncio.sleep(0.2)


def logged_keys(lives: list[VirtualNode]) -> set[tuple[int, int]]:
    return {(x["boot"], x["seq"]) for vn in lives for x in vn.events("logged")}


def check_exactly_once_in_order(acc: Accepted, lives: list[VirtualNode]) -> dict[str, int]:
    """Every logged record accepted exactly once, in seq order per boot; what was accepted
    without a `logged` line can only be a boot's last record (written, then the power went
    before the line was printed)."""
    keys = acc.keys()
    assert len(keys) == len(set(keys)), "the gateway accepted a record twice"
    logged = logged_keys(lives)
    missing = logged - set(keys)
    assert not missing, f"{len(missing)} logged records never reached the gateway: {sorted(missing)[:10]}"
    by_boot: dict[int, list[int]] = {}
    for b, s in keys:
        by_boot.setdefault(b, []).append(s)
    for b, seqs in by_boot.items():
        assert seqs == sorted(seqs), f"boot {b}: records accepted out of order"
    last_logged: dict[int, int] = {}
    for b, s in logged:
        last_logged[b] = max(last_logged.get(b, 0), s)
    unlogged = set(keys) - logged
    for b, s in unlogged:
        assert s == last_logged.get(b, 0) + 1, f"record {(b, s)} arrived, never logged, not last of its boot"
    return {"logged": len(logged), "accepted": len(keys), "unlogged_last_records": len(unlogged)}


# --- a torn write, as a power cut leaves it -------------------------------------------------


def frame(prio: int, kind: int, rseq: int, payload: bytes) -> bytes:
    # The record layout of docs/store-and-forward.md.
    body = struct.pack("<BHBBI", 1, len(payload), prio, kind, rseq)
    return b"\xeb" + body + struct.pack("<I", zlib.crc32(payload, zlib.crc32(body)) & 0xFFFFFFFF) + payload


def tear_newest_segment(queue_dir: Path, rng: random.Random) -> int:
    """Append the first bytes of a record to the newest segment, as a power cut in the middle
    of a flash write leaves it. SIGKILL alone cannot do this: a write() of a few hundred bytes
    to a regular file completes or does not happen. Returns the bytes added (0: no segment)."""
    segs = sorted(queue_dir.glob("q?_*.seg"), key=lambda p: p.name[3:])
    if not segs:
        return 0
    seg = segs[-1]
    whole = frame(int(seg.name[1]), w.KIND_EVT, 0x7FFFFFF0, os.urandom(rng.randint(20, 300)))
    torn = whole[: rng.randint(1, len(whole) - 1)]
    with open(seg, "ab") as f:
        f.write(torn)
    return len(torn)


# --- power cuts -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.micropython
def test_sigkill_50_times_loses_nothing_and_delivers_once(broker: Any, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("EDGELINE_KILL_SEED", "20261122")))
    cfg = node_config(broker.host, broker.port)
    workdir = tmp_path / "node"
    queue_dir = workdir / "data" / "queue"
    acc = Accepted()
    lives: list[VirtualNode] = []
    injected: list[tuple[int, int]] = []  # (life index that must find it, bytes)

    async def scenario() -> Gateway:
        gw = gateway(broker.host, broker.port, acc)
        await gw.start()
        try:
            for k in range(KILLS):
                vn = VirtualNode(cfg, workdir)
                vn.start()
                lives.append(vn)
                # Once it has booted and said what its recovery found (~0.1 s, longer on a
                # loaded machine), anywhere: measuring, replaying, committing, writing a record.
                await wait_until(lambda vn=vn: vn.last("recovered") is not None, 30, "recovery")
                await asyncio.sleep(rng.uniform(0.0, 1.05))
                await asyncio.to_thread(vn.kill)
                if rng.random() < 0.5:
                    n = tear_newest_segment(queue_dir, rng)
                    if n:
                        injected.append((k + 1, n))
            final = VirtualNode(cfg, workdir)
            final.start()
            lives.append(final)
            await drained(final, acc, lambda: logged_keys(lives), timeout=60)
            await asyncio.to_thread(final.stop)
            await gw.drain()
        finally:
            for vn in lives:
                if vn.alive():
                    await asyncio.to_thread(vn.kill)
            await gw.stop()
        return gw

    t0 = time.monotonic()
    gw = asyncio.run(scenario())
    counts = check_exactly_once_in_order(acc, lives)
    # Torn tails: each one injected was found by the next life that got as far as saying what
    # its recovery found (every life is killed only after it said so), and truncated to the byte.
    recovered = [vn.last("recovered") for vn in lives]
    assert all(r is not None for r in recovered), "a life was killed before it recovered"
    for life, n in injected:
        r = recovered[life]
        assert r is not None and r["torn_tails"] >= 1 and r["truncated"] >= n, (life, n, r)
    torn_found = sum(r["torn_tails"] for r in recovered if r)
    truncated = sum(r["truncated"] for r in recovered if r)
    assert torn_found >= len(injected)
    assert sum(r["corrupt"] for r in recovered if r) == 0
    # Never delivered as garbage, and nothing the dedupe window gave up on.
    assert gw.stats.malformed == 0, gw.stats.dead_reasons
    assert gw.dedupe.gaps == 0
    stopped = lives[-1].last("stopped")
    assert stopped is not None and stopped["queue"] == 0
    boots = {vn.last("boot")["boot"] for vn in lives if vn.last("boot")}
    assert len(boots) == KILLS + 1
    print(
        f"\nSIGKILL x{KILLS} on {broker.name} in {time.monotonic() - t0:.0f} s: {counts['logged']} records "
        f"logged, {counts['accepted']} accepted once ({counts['unlogged_last_records']} written but killed "
        f"before their log line), {gw.stats.duplicates} replayed duplicates dropped by the gateway; "
        f"torn tails found {torn_found} ({len(injected)} injected, {truncated} bytes truncated); "
        f"dead letters {gw.stats.malformed}"
    )


# --- outages --------------------------------------------------------------------------------

OUTAGE_S = 60.0


async def _run_steady(vn: VirtualNode, seconds: float) -> None:
    await asyncio.sleep(seconds)
    assert vn.alive(), f"node died: {vn.stderr_tail[-5:]}"


async def _start_for_outage(
    mosquitto: MosquittoProcess, tmp_path: Path, acc: Accepted, lives: list[VirtualNode]
) -> tuple[Gateway, VirtualNode]:
    """The outage tests' start: a gateway (state in tmp_path/gw) reporting to `acc`, and a
    node (one more of `lives`) measuring every 50 ms with 1 MiB of flash for its queue."""
    gw = gateway(mosquitto.host, mosquitto.port, acc, tmp_path / "gw")
    await gw.start()
    cfg = node_config(mosquitto.host, mosquitto.port, period_ms=50, queue={"capacity_bytes": 1048576})
    vn = VirtualNode(cfg, tmp_path / "node")
    vn.start()
    lives.append(vn)
    return gw, vn


@pytest.mark.slow
@pytest.mark.micropython
def test_broker_down_60_s_nothing_lost(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    # Mosquitto only: the test restarts the broker process on the same port (stop/start),
    # which the embedded amqtt broker thread does not offer.
    acc = Accepted()
    lives: list[VirtualNode] = []

    async def scenario() -> tuple[Gateway, dict[str, Any]]:
        gw, vn = await _start_for_outage(mosquitto, tmp_path, acc, lives)
        try:
            await wait_until(lambda: vn.last("gateway") is not None, 15, "the node to see the gateway")
            await _run_steady(vn, 3)
            await asyncio.to_thread(mosquitto.stop)
            n0 = len(vn.events("logged"))
            await _run_steady(vn, OUTAGE_S)
            during = len(vn.events("logged")) - n0
            held = await status(vn)
            await asyncio.to_thread(mosquitto.start)
            t_back = time.monotonic()
            await drained(vn, acc, lambda: logged_keys(lives), timeout=120)
            info = {"logged_during": during, "held": held["queue"], "drain_s": time.monotonic() - t_back}
            await asyncio.to_thread(vn.stop)
            await gw.drain()
        finally:
            if vn.alive():
                await asyncio.to_thread(vn.kill)
            await gw.stop()
        return gw, info

    gw, info = asyncio.run(scenario())
    counts = check_exactly_once_in_order(acc, lives)
    assert info["logged_during"] > 0.8 * OUTAGE_S * 1000 / 50, info  # it kept measuring
    assert info["held"] >= info["logged_during"] * 0.9, info  # ... and kept it all on flash
    assert counts["unlogged_last_records"] == 0
    stopped = lives[0].last("stopped")
    assert stopped is not None and stopped["queue"] == 0 and stopped["drops"] == {"0": 0, "1": 0, "2": 0}
    assert gw.stats.malformed == 0
    print(
        f"\nbroker down {OUTAGE_S:.0f} s: {info['logged_during']} records measured meanwhile, "
        f"{counts['accepted']} accepted once, queue drained {info['drain_s']:.1f} s after the broker "
        f"came back; duplicates dropped {gw.stats.duplicates}; write amplification "
        f"{stopped['write_amplification']:.3f} ({stopped['bytes_written']} bytes written for "
        f"{stopped['payload_bytes']} payload bytes)"
    )


@pytest.mark.slow
@pytest.mark.micropython
def test_gateway_down_60_s_nothing_lost(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    # Mosquitto only: the gateway's persistent session (what nodes publish before they learn
    # it is gone is kept for it by the broker) is what amqtt does not keep for anonymous
    # clients (DESIGN.md, measured facts).
    acc = Accepted()
    lives: list[VirtualNode] = []

    async def scenario() -> tuple[list[Gateway], dict[str, Any]]:
        gw, vn = await _start_for_outage(mosquitto, tmp_path, acc, lives)
        gws = [gw]
        try:
            await wait_until(lambda: vn.last("gateway") is not None, 15, "the node to see the gateway")
            await _run_steady(vn, 3)
            await gw.stop()  # publishes its offline state; the broker stays up
            await wait_until(lambda: vn.last("gateway")["online"] is False, 10, "the node to see it offline")
            n0 = len(vn.events("logged"))
            await _run_steady(vn, OUTAGE_S)
            held = await status(vn)
            during = len(vn.events("logged")) - n0
            gw2 = gateway(mosquitto.host, mosquitto.port, acc, tmp_path / "gw")  # same id, same state
            gws.append(gw2)
            await gw2.start()
            t_back = time.monotonic()
            await drained(vn, acc, lambda: logged_keys(lives), timeout=120)
            info = {
                "logged_during": during,
                "held": held["queue"],
                "drain_s": time.monotonic() - t_back,
                "connected": held["connected"],
            }
            await asyncio.to_thread(vn.stop)
            await gw2.drain()
        finally:
            if vn.alive():
                await asyncio.to_thread(vn.kill)
            for g in gws[1:]:
                await g.stop()
        return gws, info

    gws, info = asyncio.run(scenario())
    counts = check_exactly_once_in_order(acc, lives)
    # The broker was up all along: the node stayed connected and held its queue anyway.
    assert info["connected"] is True
    assert info["logged_during"] > 0.8 * OUTAGE_S * 1000 / 50, info
    assert info["held"] >= info["logged_during"], info
    stopped = lives[0].last("stopped")
    assert stopped is not None and stopped["queue"] == 0 and stopped["drops"] == {"0": 0, "1": 0, "2": 0}
    assert all(g.stats.malformed == 0 for g in gws)
    print(
        f"\ngateway down {OUTAGE_S:.0f} s: {info['held']} records held on the node, {counts['accepted']} "
        f"accepted once, drained {info['drain_s']:.1f} s after the gateway came back; write amplification "
        f"{stopped['write_amplification']:.3f}"
    )


# --- a full queue ---------------------------------------------------------------------------


@pytest.mark.micropython
def test_full_queue_drops_telemetry_and_normal_windows_before_anomalies(broker: Any, tmp_path: Path) -> None:
    # 16 KiB of flash in 4 KiB segments: about 57 records. No gateway at first, so the node
    # holds everything: normal traffic overflows the queue, then a burst of anomalies (a
    # bearing fault, switched off again), then more normal traffic; then the gateway comes.
    cfg = node_config(
        broker.host, broker.port, period_ms=30, queue={"capacity_bytes": 16384, "segment_bytes": 4096}
    )
    acc = Accepted()
    # Every birth the node publishes (drop counters inside).
    births = Collector(broker.host, broker.port, "sf-births", w.topic(SITE, NODE, w.KIND_BIRTH), cbor2.loads)
    vn = VirtualNode(cfg, tmp_path / "node")

    def prio_logged(p: int) -> int:
        return sum(1 for x in vn.events("logged") if x["prio"] == p)

    def dropped(p: int) -> int:
        d = vn.last("drops")
        return 0 if d is None else int(d["drops"][str(p)])

    async def scenario() -> Gateway:
        vn.start()
        gw = gateway(broker.host, broker.port, acc)
        try:
            await wait_until(lambda: vn.last("connected") is not None, 15, "the node to connect")
            await wait_until(
                lambda: dropped(0) > 0 and dropped(1) > 0, 30, "telemetry and normal windows to be dropped"
            )
            vn.command("fault bearing")
            await wait_until(lambda: prio_logged(2) >= 8, 15, "anomalies")
            vn.command("fault none")
            n = len(vn.events("window"))
            await wait_until(lambda: len(vn.events("window")) >= n + 60, 15, "more normal windows")
            assert vn.last("gateway") is None, "no gateway yet: the node must not have seen one"
            await gw.start()
            await wait_until(lambda: len(births.messages) >= 2, 15, "a birth for the gateway")
            await drained(vn, acc, None, timeout=30)
            await asyncio.to_thread(vn.stop)
            await gw.drain()
        finally:
            if vn.alive():
                await asyncio.to_thread(vn.kill)
            await gw.stop()
            births.close()
        return gw

    gw = asyncio.run(scenario())
    stopped = vn.last("stopped")
    assert stopped is not None
    final = {int(k): v for k, v in stopped["drops"].items()}
    # The birth the gateway got when it came online carries the counters as they were then,
    # and nothing was dropped after it (the queue was draining).
    birth = births.messages[-1]
    assert birth[w.K_DROPS] == final
    assert final[0] > 0 and final[1] > 0 and final[2] == 0
    # Exact: what was logged and never arrived, plus what was refused at the door, per priority.
    got = set(acc.keys())
    lost = Counter(x["prio"] for x in vn.events("logged") if (x["boot"], x["seq"]) not in got)
    refused = Counter(x["prio"] for x in vn.events("dropped"))
    assert {p: lost[p] + refused[p] for p in range(3)} == final
    # Every anomaly arrived.
    anomalies = {(x["boot"], x["seq"]) for x in vn.events("logged") if x["prio"] == 2}
    assert anomalies and anomalies <= got
    # Lowest priority first: no normal window went while telemetry waited, no anomaly while
    # anything else did.
    for d in vn.events("drops"):
        assert d["drops"]["2"] == 0
    prev = {"0": 0, "1": 0, "2": 0}
    for d in vn.events("drops"):
        if d["drops"]["1"] > prev["1"]:
            assert d["pending"][0] == 0, d
        prev = d["drops"]
    first_tel = next(i for i, d in enumerate(vn.events("drops")) if d["drops"]["0"] > 0)
    first_evt = next(i for i, d in enumerate(vn.events("drops")) if d["drops"]["1"] > 0)
    assert first_tel <= first_evt
    assert gw.stats.malformed == 0
    print(
        f"\nfull queue on {broker.name}: drops {final} (telemetry, normal, anomaly), "
        f"{len(anomalies)} anomalies all delivered; birth carried {birth[w.K_DROPS]}"
    )
