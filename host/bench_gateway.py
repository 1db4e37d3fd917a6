"""`edgeline bench gateway`: how fast the gateway is, beside a naive gateway, in one run.

Measured on this machine, medians where repeated, JSON out:

- pipeline: events/s through decode + validate + dedupe + gateway model (batched LiteRT) +
  machine state + OPC-UA (coalesced writes, alarms, events) + durable commit, fed in batches
  as paho would hand them over, with an OPC-UA client subscribed (in its own process, as
  SCADA would be). Baseline: a naive gateway in the same process and run: JSON payloads,
  one inference per message, one OPC-UA write per value.
- mqtt: the same, end to end through Mosquitto from a publisher process (QoS1).
- latency: MQTT receive at the gateway -> anomaly event at the subscribed OPC-UA client,
  with the publisher paced at a fixed rate (default 5,000 events/s).
- inference: gateway-model rows/s batched (4,096 rows per invoke) vs one row per invoke.

Targets (DESIGN.md / issue 5): >= 20,000 events/s through the whole gateway path;
>= 100,000 batched inferences/s; p99 <= 5 ms receive -> OPC-UA event at 5,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from edgeline.firmware.edgeline_node import features as node_features
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import Gateway, GatewayConfig, Inbound
from edgeline.host.ports import free_tcp_port
from edgeline.host.stats import percentiles

SENSORS = ("vibration", "temperature", "current")
TARGETS = {"events_per_s": 20_000, "batched_inferences_per_s": 100_000, "latency_p99_ms": 5.0}


def _demo_model() -> Path:
    from edgeline.host.demo import DEMO_MODEL

    return DEMO_MODEL


# -- synthetic traffic ---------------------------------------------------------------------
def _features(rng: np.random.Generator) -> dict[str, list[float]]:
    # Around the demo model's training centre, so the gateway model scores realistic rows.
    base = {
        "vibration": [0.0, 0.39, 0.39, 0.69, 1.77],
        "temperature": [39.5, 0.05, 39.5, 39.64, 1.0],
        "current": [0.0, 9.5, 9.5, 13.6, 1.44],
    }
    return {s: [float(v * (1 + 0.01 * rng.standard_normal())) for v in vals] for s, vals in base.items()}


def births(machines: int, site: str = "bench") -> list[tuple[str, bytes]]:
    out = []
    for i in range(machines):
        node = f"n{i}"
        out.append(
            (
                f"edgeline/v1/{site}/{node}/birth",
                cbor2.dumps(
                    {
                        w.K_V: 1,
                        w.K_KIND: w.KIND_BIRTH,
                        w.K_NODE: node,
                        w.K_BOOT: 1,
                        w.K_FW: "bench",
                        w.K_MODEL_SHA: None,
                        w.K_SENSORS: [[s, "u", list(node_features.FEATURE_NAMES)] for s in SENSORS],
                        w.K_SITE: site,
                        w.K_LINE: "line",
                        w.K_MACHINE: f"m{i}",
                    }
                ),
            )
        )
    return out


def events(
    n: int, machines: int, anomaly_every: int = 100, site: str = "bench", seed: int = 1, as_json: bool = False
) -> list[tuple[str, bytes]]:
    """n window events round-robin over the machines; every `anomaly_every`-th is anomalous."""
    rng = np.random.default_rng(seed)
    pool = [_features(rng) for _ in range(64)]
    out = []
    for k in range(n):
        i = k % machines
        seq = k // machines + 1
        anomalous = k % anomaly_every == anomaly_every - 1
        m: dict[Any, Any] = {
            w.K_V: 1,
            w.K_KIND: w.KIND_EVT,
            w.K_NODE: f"n{i}",
            w.K_BOOT: 1,
            w.K_SEQ: seq,
            w.K_TRACE: k.to_bytes(16, "big") or b"\x01",
            w.K_SPAN: b"\x01" * 8,
            w.K_T_WALL: 0,
            w.K_T_MONO: seq,
            w.K_FEATURES: pool[k % 64],
            w.K_SCORES: {"vibration": 9.0 if anomalous else 0.5, "temperature": 0.4, "current": 0.3},
            w.K_ANOMALY: anomalous,
            w.K_CAUSES: ["vibration"] if anomalous else [],
            w.K_DETECTOR: "spc",
        }
        if k == 0:
            m[w.K_TRACE] = b"\x00" * 15 + b"\xff"
        payload = (
            json.dumps({str(a): (b.hex() if isinstance(b, bytes) else b) for a, b in m.items()}).encode()
            if as_json
            else cbor2.dumps(m)
        )
        out.append((f"edgeline/v1/{site}/n{i}/evt", payload))
    return out


# -- the OPC-UA client, in its own process ---------------------------------------------------
async def _client(endpoint: str, seconds: float, machines: int) -> None:
    from asyncua import Client, ua
    from edgeline.host.opcua_server import NAMESPACE

    got: list[tuple[str, int]] = []
    changes = [0]

    class H:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            changes[0] += 1

        def event_notification(self, event: Any) -> None:
            tid = getattr(event, "TraceId", None)
            if tid:
                got.append((str(tid), time.time_ns() // 1000))

    c = Client(endpoint, timeout=30)
    await c.connect()
    try:
        idx = await c.get_namespace_index(NAMESPACE)
        h = H()
        esub = await c.create_subscription(0, h)
        etype = await c.nodes.base_event_type.get_child(f"{idx}:AnomalyEventType")
        await esub.subscribe_events(c.nodes.server, etype)
        vsub = await c.create_subscription(0, h)
        nodes = [
            c.get_node(ua.NodeId(ua.String(f"bench/line/m{i}/Score"), ua.Int16(idx))) for i in range(machines)
        ]
        await vsub.subscribe_data_change(nodes, queuesize=1)
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "stop":
                break
        await asyncio.sleep(0.5)
        print(json.dumps({"events": got, "changes": changes[0]}), flush=True)
    finally:
        await c.disconnect()


class _ClientProc:
    """The subscribed OPC-UA client in a process of its own; its I/O is awaited, never
    blocked on, because the server it talks to runs on this event loop."""

    def __init__(self, endpoint: str, machines: int) -> None:
        me = "edgeline.host.bench_gateway"
        argv = [sys.executable, "-m", me, "--client", endpoint, "900", str(machines)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"bench OPC-UA client did not start: {line!r}")

    async def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        await asyncio.to_thread(self.proc.wait, 15)
        return json.loads(out) if out.strip() else {"events": [], "changes": 0}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- pipeline (in process, no broker) --------------------------------------------------------
async def bench_pipeline(n: int, machines: int, batch: int, state_dir: Path) -> dict[str, Any]:
    gw = Gateway(
        GatewayConfig(
            site="bench",
            opcua_port=free_tcp_port(),
            model_path=str(_demo_model()),
            state_dir=str(state_dir),
            max_batch=batch,
        )
    )
    await gw.start(connect=False)
    try:
        now = time.time_ns() // 1000
        await gw.process([Inbound(t, p, now) for t, p in births(machines)])
        client = _ClientProc(gw.opcua.endpoint, machines)
        try:
            await client.ready()
            msgs = [Inbound(t, p, now) for t, p in events(n, machines)]
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                await gw.process(msgs[i : i + batch])
                await asyncio.sleep(0)  # let the OPC-UA tasks run, as the consume loop does
            with contextlib.suppress(AttributeError):
                await gw.opcua.flush()
            dt = time.perf_counter() - t0
            seen = await client.finish()
        finally:
            client.kill()
    finally:
        await gw.stop()
    return {
        "events": n,
        "seconds": round(dt, 3),
        "events_per_s": round(n / dt),
        "accepted": gw.stats.accepted,
        "opcua_anomaly_events_seen": len(seen["events"]),
        "opcua_data_changes_seen": seen["changes"],
    }


async def bench_naive(n: int, machines: int) -> dict[str, Any]:
    """JSON payloads, one inference per message, one OPC-UA write per value."""
    from asyncua import Server, ua
    from edgeline.host.model_scorer import ModelScorer

    scorer = ModelScorer(str(_demo_model()))
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{free_tcp_port()}/naive/")
    idx = await server.register_namespace("urn:naive")
    values: dict[tuple[int, str, int], Any] = {}
    for i in range(machines):
        obj = await server.nodes.objects.add_object(idx, f"m{i}")
        for s in SENSORS:
            for f in range(len(node_features.FEATURE_NAMES)):
                values[(i, s, f)] = await obj.add_variable(idx, f"{s}.{f}", 0.0)
    gen = await server.get_event_generator()
    await server.start()
    try:
        msgs = events(n, machines, as_json=True)
        seen: set[tuple[str, int]] = set()
        t0 = time.perf_counter()
        for _topic, payload in msgs:
            m = json.loads(payload)
            key = (m[str(w.K_NODE)], m[str(w.K_SEQ)])
            if key in seen:
                continue
            seen.add(key)
            feats = m[str(w.K_FEATURES)]
            row = np.asarray([[v for s in SENSORS for v in feats[s]]], dtype=np.float64)
            scorer.scores(row)  # one inference per message
            i = int(m[str(w.K_NODE)][1:])
            for s in SENSORS:
                for f, v in enumerate(feats[s]):
                    await values[(i, s, f)].write_value(ua.Variant(v, ua.VariantType.Double))
            if m[str(w.K_ANOMALY)]:
                await gen.trigger(message="anomaly")
        dt = time.perf_counter() - t0
    finally:
        await server.stop()
    return {"events": n, "seconds": round(dt, 3), "events_per_s": round(n / dt)}


# -- through Mosquitto --------------------------------------------------------------------
_PUBLISHER = r"""
import sys, time, json, cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from edgeline.host.bench_gateway import births, events
port, n, machines, rate, anomaly_every = (int(x) for x in sys.argv[1:6])
c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub")
c.max_inflight_messages_set(0)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", port)
c.loop_start()
for t, p in births(machines):
    c.publish(t, p, qos=1, retain=True).wait_for_publish(10)
msgs = events(n, machines, anomaly_every=anomaly_every)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
last = None
for k, (t, p) in enumerate(msgs):
    if rate:
        due = t0 + k / rate
        while time.perf_counter() < due:
            pass
    last = c.publish(t, p, qos=1)
last.wait_for_publish(120)
print(json.dumps({"published": n, "seconds": time.perf_counter() - t0}), flush=True)
c.loop_stop()
c.disconnect()
"""


async def bench_mqtt(n: int, machines: int, rate: int, anomaly_every: int, state_dir: Path) -> dict[str, Any]:
    from edgeline.hil.mosquitto import MosquittoProcess

    with MosquittoProcess() as mosq:
        gw = Gateway(
            GatewayConfig(
                site="bench",
                broker_port=mosq.port,
                opcua_port=free_tcp_port(),
                model_path=str(_demo_model()),
                state_dir=str(state_dir),
            )
        )
        recv: dict[str, int] = {}
        first_last = [0, 0]

        def listener(ev: Any, m: Any, t_recv_us: int) -> None:
            if ev.anomaly:
                recv[ev.trace_hex] = t_recv_us
            if not first_last[0]:
                first_last[0] = t_recv_us
            first_last[1] = time.time_ns() // 1000

        gw.event_listeners.append(listener)
        await gw.start()
        pub = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PUBLISHER,
                str(mosq.port),
                str(n),
                str(machines),
                str(rate),
                str(anomaly_every),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        client = None
        try:
            assert pub.stdout is not None and pub.stdin is not None
            if pub.stdout.readline().strip() != "ready":
                raise RuntimeError("bench publisher did not start")
            deadline = time.monotonic() + 15
            while gw.stats.by_kind["birth"] < machines and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            client = _ClientProc(gw.opcua.endpoint, machines)
            await client.ready()
            pub.stdin.write("go\n")
            pub.stdin.flush()
            deadline = time.monotonic() + max(60, 4 * n / max(rate, 5000))
            while gw.stats.accepted < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            accepted = gw.stats.accepted
            seen = await client.finish()
            out = await asyncio.to_thread(pub.stdout.readline)
        finally:
            if client is not None:
                client.kill()
            with contextlib.suppress(ProcessLookupError):
                pub.kill()
            pub.wait()
            await gw.stop()
    span_s = max((first_last[1] - first_last[0]) / 1e6, 1e-9)
    lat = [(t_client - recv[tid]) / 1000.0 for tid, t_client in seen["events"] if tid in recv]
    return {
        "events": n,
        "rate_offered": rate or "max",
        "accepted": accepted,
        "events_per_s": round(accepted / span_s),
        "publisher": json.loads(out) if out.strip() else None,
        "receive_to_opcua_event_ms": percentiles(lat),
    }


# -- inference --------------------------------------------------------------------------------
def bench_inference(rows: int = 4096, repeats: int = 7) -> dict[str, Any]:
    from edgeline.host.inference import load_backend

    be = load_backend(_demo_model().read_bytes())
    x = np.random.default_rng(3).integers(-128, 128, size=(rows, be.in_features), dtype=np.int8)
    be.invoke_batch(x)
    batched = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        be.invoke_batch(x)
        batched.append(rows / (time.perf_counter() - t0))
    one = []
    single = x[:1]
    be.invoke_batch(single)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(500):
            be.invoke_batch(x[i : i + 1])
        one.append(500 / (time.perf_counter() - t0))
    b, s = statistics.median(batched), statistics.median(one)
    return {
        "backend": be.name,
        "batch_rows": rows,
        "batched_per_s": round(b),
        "single_row_per_s": round(s),
        "ratio": round(b / s, 1),
    }


async def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 60_000
    machines = 20
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-") as tmp:
        pipe = [await bench_pipeline(n, machines, 512, Path(tmp) / f"p{i}") for i in range(1 if quick else 3)]
        naive = await bench_naive(1000 if quick else 3000, machines)
        mqtt_max = await bench_mqtt(n, machines, 0, 100, Path(tmp) / "m")
        lat = await bench_mqtt(10_000 if quick else 25_000, machines, 5000, 10, Path(tmp) / "l")
    inf = bench_inference()
    p_eps = statistics.median(x["events_per_s"] for x in pipe)
    p99 = lat["receive_to_opcua_event_ms"]["p99"]
    return {
        "machine": {"cpus": os.cpu_count()},
        "targets": TARGETS,
        "pipeline": {"runs": pipe, "median_events_per_s": p_eps},
        "naive_baseline": naive,
        "pipeline_vs_naive": round(p_eps / naive["events_per_s"], 1),
        "mqtt_end_to_end": mqtt_max,
        "latency_at_5000_per_s": lat,
        "inference": inf,
        "met": {
            "events_per_s_in_process": p_eps >= TARGETS["events_per_s"],
            "events_per_s_through_mosquitto": mqtt_max["events_per_s"] >= TARGETS["events_per_s"],
            "batched_inferences_per_s": inf["batched_per_s"] >= TARGETS["batched_inferences_per_s"],
            "latency_p99_ms": p99 is not None and p99 <= TARGETS["latency_p99_ms"],
        },
    }


def _cmd(args: argparse.Namespace) -> int:
    result = asyncio.run(run(quick=args.quick))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def add_gateway_bench(bench_sub: Any) -> argparse.ArgumentParser:
    b = bench_sub.add_parser(
        "gateway", help="gateway events/s, latency and batched inference, vs a naive gateway"
    )
    b.add_argument("--json", type=Path, default=None, help="write the results here")
    b.add_argument(
        "--quick", action="store_true", help="smaller runs (a smoke test, not the numbers to quote)"
    )
    b.set_defaults(func=_cmd)
    return b


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--client":
        asyncio.run(_client(sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
    else:
        p = argparse.ArgumentParser(prog="bench_gateway")
        p.add_argument("--json", type=Path)
        p.add_argument("--quick", action="store_true")
        sys.exit(_cmd(p.parse_args()))
