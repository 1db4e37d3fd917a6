"""Host code. How fast the OPC-UA face is, seen by a subscribed client in another process.

    python -m edgeline.host.opcua_bench [--seconds S] [--machines N] [--publishing-ms P] [--json PATH]

Two measurements against one gateway `OpcuaServer`, machines with sensors and features as the
nodes send them, driven through `OpcuaServer.update` (what the gateway calls per event):

- throughput: events pushed as fast as the loop allows (yielding every 64) while a client
  subscribes to every variable: events/s accepted by `update`, variable writes/s the flush
  task applied (after coalescing), data-change notifications/s the client received;
- latency: per-window anomaly events (AnomalyEventType) from the sample time the event
  carries to their arrival at the client, idle and under a background load of events/s.

The client runs in a subprocess (its own interpreter and event loop), as SCADA would.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from edgeline.host.machine_state import MachineState
from edgeline.host.opcua_server import NAMESPACE, OpcuaServer
from edgeline.host.ports import free_tcp_port
from edgeline.host.wire import Event


def _sid(ident: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(ident), ua.Int16(ns))


def _pct(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 2)

    return {"n": len(s), "p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": round(s[-1], 2)}


# -- the client (subprocess) ----------------------------------------------------------------------
class _Client:
    def __init__(self) -> None:
        self.changes = 0
        self.per_100ms: dict[int, int] = {}
        self.event_lat: list[float] = []
        self.value_lat: list[tuple[float, float]] = []  # (received, latency ms)

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        now = time.time()
        self.changes += 1
        b = int(now * 10)
        self.per_100ms[b] = self.per_100ms.get(b, 0) + 1
        src = data.monitored_item.Value.SourceTimestamp
        if src is not None and self.changes % 20 == 0:
            self.value_lat.append((now, (now - src.timestamp()) * 1000))

    def event_notification(self, event: Any) -> None:
        now = time.time()
        t = event.Time
        if t is not None:
            self.event_lat.append((now - t.timestamp()) * 1000)


async def _client_main(
    endpoint: str, paths: list[str], publishing_ms: float, seconds: float, values: bool = True
) -> None:
    client = Client(endpoint, timeout=30)
    await client.connect()
    try:
        idx = await client.get_namespace_index(NAMESPACE)
        h = _Client()
        sub = await client.create_subscription(publishing_ms, h)
        nodes = [client.get_node(_sid(p, idx)) for p in paths]
        for i in range(0, len(nodes) if values else 0, 500):
            await sub.subscribe_data_change(nodes[i : i + 500], queuesize=1)
        esub = await client.create_subscription(0, h)
        await esub.subscribe_events(client.nodes.server, client.get_node(_sid("AnomalyEventType", idx)))
        print("ready", flush=True)
        await asyncio.sleep(seconds)
        out = {
            "changes": h.changes,
            "per_100ms": h.per_100ms,
            "event_latency_ms": h.event_lat,
            "value_latency_ms": h.value_lat,
        }
        print(json.dumps(out), flush=True)
    finally:
        await client.disconnect()


# -- the server side ------------------------------------------------------------------------------
def _event(m: int, seq: int, sensors: int, features: int, anomaly: bool = False) -> Event:
    return Event(
        kind=1,
        node=f"n{m}",
        boot=1,
        seq=seq,
        trace_id=seq.to_bytes(16, "big"),
        span_id=b"\x01" * 8,
        t_wall_us=time.time_ns() // 1000,
        t_mono_us=seq,
        features={f"s{i}": [float(seq % 97)] * features for i in range(sensors)},
        scores={f"s{i}": 0.5 for i in range(sensors)},
        anomaly=anomaly,
        causes=["s0"] if anomaly else [],
    )


async def run(
    machines: int = 20,
    sensors: int = 3,
    features: int = 6,
    seconds: float = 5.0,
    loads: tuple[int, ...] = (0, 5000),
    publishing_ms: float = 0.0,
    flush_interval: float = 0.02,
    subscribe_values: bool = True,
    freeze_gc: bool = True,
) -> dict[str, Any]:
    op = OpcuaServer("127.0.0.1", free_tcp_port(), flush_interval=flush_interval)
    await op.start()
    try:
        ms: list[MachineState] = []
        for i in range(machines):
            m = MachineState(
                "site",
                "line",
                f"m{i}",
                sensors={f"s{j}": ("u", [f"f{k}" for k in range(features)]) for j in range(sensors)},
            )
            await op.ensure_machine(m)
            await op.set_online(m.key, True)
            ms.append(m)
        await op.flush()
        if freeze_gc:
            # The standard address space is ~500k long-lived objects: a full collection over them
            # stalls the loop 100-200 ms. What a gateway process does after start-up.
            gc.collect()
            gc.freeze()
        paths = [f"{m.key}/{v}" for m in ms for v in ("Score", "Anomaly")]
        paths += [
            f"{m.key}/s{j}/{f}"
            for m in ms
            for j in range(sensors)
            for f in [*(f"f{k}" for k in range(features)), "Score"]
        ]
        total = seconds * (1 + len(loads)) + 10
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(paths, f)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeline.host.opcua_bench",
            "client",
            op.endpoint,
            f.name,
            str(publishing_ms),
            str(total),
            "values" if subscribe_values else "events",
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"benchmark client did not start: {ready!r}")

        # Latency of anomaly events, idle and under background load.
        seq = 0
        lat_phases: list[dict[str, Any]] = []
        for load in loads:
            t0, w_start = time.perf_counter(), time.time()
            sent = 0
            anomalies = 0
            while (now := time.perf_counter() - t0) < seconds:
                due = int(now * load)
                while sent < due:
                    seq += 1
                    sent += 1
                    await op.update(ms[seq % machines], _event(seq % machines, seq, sensors, features))
                    if sent % 256 == 0:
                        await asyncio.sleep(0)
                if anomalies < now * 20:  # 20 anomaly events/s on machine 0
                    seq += 1
                    anomalies += 1
                    ev = _event(0, seq, sensors, features, anomaly=True)
                    await op.update(ms[0], ev)
                    await op.emit_anomaly(ms[0], ev)
                await asyncio.sleep(0.001)
            lat_phases.append(
                {
                    "background_events_per_s": load,
                    "background_sent": sent,
                    "anomaly_events": anomalies,
                    "window": (w_start, time.time()),
                }
            )
        # Throughput: as fast as the loop allows.
        n = 0
        wall0 = time.time()
        w0, t0 = op.writes, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(64):
                seq += 1
                m = ms[seq % machines]
                await op.update(m, _event(seq % machines, seq, sensors, features))
                n += 1
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - t0
        wall1 = time.time()
        await asyncio.sleep(0.5)
        throughput: dict[str, Any] = {
            "events_per_s": round(n / elapsed),
            "variable_updates_per_s": round(n * (sensors * (features + 1) + 2) / elapsed),
            "writes_per_s": round((op.writes - w0) / (elapsed + 0.5)),
            "variables": len(paths),
        }

        out, _ = await asyncio.wait_for(proc.communicate(), total + 30)
        res = json.loads(out.decode().strip().splitlines()[-1])
        os.unlink(f.name)
    finally:
        await op.stop()
        if freeze_gc:
            gc.unfreeze()
    # Split the client's event latencies by phase, in order.
    lats = res["event_latency_ms"]
    i = 0
    for ph in lat_phases:
        k = int(ph["anomaly_events"])
        ph["anomaly_event_latency_ms"] = _pct(lats[i : i + k])
        i += k
        w0_, w1_ = ph.pop("window")
        ph["value_notification_latency_ms"] = _pct(
            [lat for t, lat in res["value_latency_ms"] if w0_ <= t < w1_]
        )
    buckets = {int(k): v for k, v in res["per_100ms"].items()}
    during = sum(v for k, v in buckets.items() if wall0 * 10 <= k < wall1 * 10)
    after = [k for k in buckets if k >= wall1 * 10]
    throughput["client_notifications_per_s"] = round(during / (wall1 - wall0))
    throughput["client_behind_s_at_end"] = round((max(after) / 10 - wall1), 2) if after else 0.0
    return {
        "machines": machines,
        "variables_subscribed": len(paths),
        "publishing_interval_ms": publishing_ms,
        "client_subscribes_values": subscribe_values,
        "gc_frozen_after_start": freeze_gc,
        "flush_interval_ms": flush_interval * 1000,
        "throughput": throughput,
        "latency": lat_phases,
        "value_notification_latency_ms_during_throughput": _pct(
            [lat for t, lat in res["value_latency_ms"] if wall0 <= t < wall1 + 1]
        ),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        endpoint, paths_file, pub, secs, what = argv[1:6]
        paths = json.loads(Path(paths_file).read_text())
        asyncio.run(_client_main(endpoint, paths, float(pub), float(secs), what == "values"))
        return 0
    ap = argparse.ArgumentParser(prog="python -m edgeline.host.opcua_bench")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--publishing-ms", type=float, default=0.0)
    ap.add_argument("--flush-ms", type=float, default=20.0)
    ap.add_argument("--events-only", action="store_true", help="the client subscribes to events, not values")
    ap.add_argument("--no-gc-freeze", action="store_true", help="leave the start-up heap to the collector")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    res = asyncio.run(
        run(
            machines=a.machines,
            seconds=a.seconds,
            publishing_ms=a.publishing_ms,
            flush_interval=a.flush_ms / 1000,
            subscribe_values=not a.events_only,
            freeze_gc=not a.no_gc_freeze,
        )
    )
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
