"""`edgeline demo`: the whole pipeline on one machine.

Embedded broker (unless --broker is given) -> N virtual nodes (the real firmware under the
MicroPython unix port, one process each) -> gateway -> OPC-UA server -> an OPC-UA client
subscribed to anomaly events. Partway through, a bearing fault is switched on in one
machine. At the end a JSON summary accounts for every event: sent by the nodes (their own
log), received by the gateway, lost, duplicated, anomalies, OPC-UA events, latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgeline.firmware.edgeline_node import VERSION
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.embedded_broker import EmbeddedBroker
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.machine_state import MachineState
from edgeline.host.opcua_watch import AnomalyWatcher
from edgeline.host.ports import free_tcp_port
from edgeline.host.stats import percentiles
from edgeline.host.virtual_node import VirtualNode
from edgeline.host.wire import Event
from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger("edgeline.demo")

SITE = "plant-a"
LINE = "line-1"
CALIBRATION_WINDOWS = 20
DEMO_MODEL_NAME = "demo-rotating-machine"


def _demo_model() -> tuple[Path, str]:
    """The committed demo detector and its sha256, from models/manifest.json."""
    import edgeline.models

    models = Path(edgeline.models.__file__).resolve().parent
    entry = json.loads((models / "manifest.json").read_text())["models"][DEMO_MODEL_NAME]
    return models / entry["file"], entry["sha256"]


DEMO_MODEL, DEMO_MODEL_SHA256 = _demo_model()


@dataclass
class DemoOptions:
    duration: float = 60.0  # seconds; 0 = until Ctrl-C
    nodes: int = 3
    broker: str | None = None  # mqtt://host:port; None = embedded amqtt broker
    json_path: Path | None = None
    window_ms: int = 500
    fault_node: int = 2  # 1-based index of the node whose machine gets the fault
    fault: str = "bearing"
    fault_at: float | None = None  # seconds after start; default: after calibration
    opcua_port: int = 0  # 0 = pick a free port
    live: bool = True
    workdir: Path | None = None


@dataclass
class _Received:
    """What the gateway processed, per node, for the accounting."""

    seqs: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)  # machine key -> anomalous events
    anomaly_traces: set[str] = field(default_factory=set)
    gateway_latency_ms: list[float] = field(default_factory=list)

    def on_event(self, ev: Event, m: MachineState, t_recv_us: int) -> None:
        self.seqs.setdefault((ev.node, ev.boot), []).append(ev.seq)
        if ev.kind == w.KIND_EVT:
            if ev.t_wall_us:
                self.gateway_latency_ms.append((t_recv_us - ev.t_wall_us) / 1000.0)
            if ev.anomaly:
                self.anomalies[m.key] = self.anomalies.get(m.key, 0) + 1
                self.anomaly_traces.add(ev.trace_hex)


def parse_broker_url(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme != "mqtt" or not u.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port")
    return u.hostname, u.port or 1883


def node_config(i: int, host: str, port: int, window_ms: int) -> dict[str, Any]:
    return {
        "node_id": f"node-{i}",
        "site": SITE,
        "line": LINE,
        "machine": f"pump-{i:02d}",
        "broker": {"host": host, "port": port, "keepalive": 30},
        "hal": {"kind": "sim", "seed": i, "rate_hz": 1000},
        "window": {"samples": 256, "period_ms": window_ms},
        "spc": {"calibration": CALIBRATION_WINDOWS, "k_sigma": 3.0, "run": 2},
        "telemetry_every": 10,
        "data_dir": "data",
        "model": {"path": str(DEMO_MODEL), "sha256": DEMO_MODEL_SHA256},
    }


class Demo:
    def __init__(self, opts: DemoOptions, console: Console | None = None) -> None:
        if opts.nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if not 1 <= opts.fault_node <= opts.nodes:
            opts.fault_node = min(2, opts.nodes)
        self.opts = opts
        self.console = console or Console(stderr=True)
        self.received = _Received()
        self.nodes: list[VirtualNode] = []
        self.fault_started: float | None = None
        self.t0 = 0.0

    def fault_time(self) -> float:
        if self.opts.fault_at is not None:
            return self.opts.fault_at
        calibrated = CALIBRATION_WINDOWS * self.opts.window_ms / 1000.0 + 2.0
        if self.opts.duration <= 0:
            return calibrated + 10.0
        return max(calibrated, 0.4 * self.opts.duration)

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        tmp = None
        if opts.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="edgeline-demo-")
            workdir = Path(tmp.name)
        else:
            workdir = opts.workdir
        broker: EmbeddedBroker | None = None
        gateway: Gateway | None = None
        watcher: AnomalyWatcher | None = None
        try:
            if opts.broker:
                host, port = parse_broker_url(opts.broker)
                broker_name = opts.broker
            else:
                broker = EmbeddedBroker()
                await broker.start()
                host, port = parse_broker_url(broker.url)
                broker_name = f"embedded amqtt at {broker.url}"
            gateway = Gateway(
                GatewayConfig(
                    broker_host=host,
                    broker_port=port,
                    site=SITE,
                    opcua_port=opts.opcua_port or free_tcp_port(),
                    model_path=str(DEMO_MODEL),  # the gateway scores each machine again
                    opcua_security=None,  # the demo's explicit opt-out: it says so when it starts
                )
            )
            gateway.event_listeners.append(self.received.on_event)
            await gateway.start()
            watcher = AnomalyWatcher(gateway.opcua.endpoint)
            await watcher.start()
            self.console.print(f"[bold]edgeline demo[/] {VERSION}: broker {broker_name}")
            self.console.print(
                f"OPC-UA endpoint: [bold cyan]{gateway.opcua.endpoint}[/] "
                "(security None: demo only; connect any OPC-UA client, events on Objects/Server)"
            )
            for i in range(1, opts.nodes + 1):
                vn = VirtualNode(node_config(i, host, port, opts.window_ms), workdir / f"node-{i}")
                vn.start()
                self.nodes.append(vn)
            self.t0 = time.monotonic()
            await self._watch(stop, gateway, watcher)
            # Stop the nodes: each flushes its queue before it says goodbye.
            await asyncio.gather(*(asyncio.to_thread(vn.stop) for vn in self.nodes))
            await self._settle(gateway)
            await asyncio.sleep(0.5)  # OPC-UA notifications still on the wire
            summary = self.summary(broker_name, gateway, watcher)
        finally:
            for vn in self.nodes:
                if vn.alive():
                    await asyncio.to_thread(vn.stop)
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
            if gateway is not None:
                await gateway.stop()
            if broker is not None:
                await broker.stop()
            if tmp is not None:
                tmp.cleanup()
        if opts.json_path:
            opts.json_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    async def _settle(self, gateway: Gateway, timeout: float = 10.0) -> None:
        """Wait until the gateway has everything the nodes say they handed to the broker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acked = sum((vn.last("stopped") or {}).get("sent", 0) for vn in self.nodes)
            if gateway.stats.accepted >= acked:
                break
            await asyncio.sleep(0.05)
        await gateway.drain()

    async def _watch(self, stop: asyncio.Event, gateway: Gateway, watcher: AnomalyWatcher) -> None:
        fault_at = self.fault_time()
        interactive = self.opts.live and self.console.is_terminal
        live = (
            Live(
                self._table(gateway, watcher),
                console=self.console,
                refresh_per_second=4,
                transient=False,
            )
            if interactive
            else None
        )
        last_line = 0.0
        with live or contextlib.nullcontext():
            while not stop.is_set():
                elapsed = time.monotonic() - self.t0
                if self.opts.duration > 0 and elapsed >= self.opts.duration:
                    break
                for vn in self.nodes:
                    if not vn.alive():
                        code = vn.proc.returncode if vn.proc else None
                        tail = " | ".join(vn.stderr_tail[-8:])
                        raise RuntimeError(f"virtual node {vn.node_id} exited (code {code}): {tail}")
                if self.fault_started is None and elapsed >= fault_at:
                    target = self.nodes[self.opts.fault_node - 1]
                    target.command(f"fault {self.opts.fault}")
                    self.fault_started = elapsed
                    self.console.print(
                        f"t={elapsed:5.1f}s: {self.opts.fault} fault switched on in "
                        f"{target.config['machine']} ({target.node_id})"
                    )
                if live is not None:
                    live.update(self._table(gateway, watcher))
                elif self.opts.live and elapsed - last_line >= 10.0:
                    last_line = elapsed
                    self.console.print(self._line(gateway, watcher, elapsed))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

    def _line(self, gateway: Gateway, watcher: AnomalyWatcher, elapsed: float) -> str:
        return (
            f"t={elapsed:5.1f}s events received {gateway.stats.accepted}, "
            f"anomalies {sum(self.received.anomalies.values())}, OPC-UA events seen {len(watcher.seen)}, "
            f"dead letters {gateway.stats.malformed}"
        )

    def _table(self, gateway: Gateway, watcher: AnomalyWatcher) -> Table:
        elapsed = time.monotonic() - self.t0 if self.t0 else 0.0
        t = Table(
            title=f"edgeline demo  t={elapsed:5.1f}s  OPC-UA events seen: {len(watcher.seen)}  "
            f"dead letters: {gateway.stats.malformed}"
        )
        for col in (
            "node",
            "machine",
            "fault",
            "seq",
            "queued on node",
            "at gateway",
            "anomalies",
            "online",
        ):
            t.add_column(col)
        for vn in self.nodes:
            key = f"{SITE}/{LINE}/{vn.config['machine']}"
            got = sum(len(v) for (n, _b), v in self.received.seqs.items() if n == vn.node_id)
            info = gateway.state.nodes.get(vn.node_id)
            fault = (
                self.opts.fault
                if (self.fault_started is not None and vn is self.nodes[self.opts.fault_node - 1])
                else "-"
            )
            last = vn.last("window") or {}
            t.add_row(
                vn.node_id,
                vn.config["machine"],
                fault,
                str(last.get("seq", 0)),
                str(last.get("queue", 0)),
                str(got),
                str(self.received.anomalies.get(key, 0)),
                "yes" if info and info.online else "no",
            )
        return t

    def summary(self, broker_name: str, gateway: Gateway, watcher: AnomalyWatcher) -> dict[str, Any]:
        per_node = []
        sent_total = lost_total = dup_total = received_total = 0
        anomaly_traces_node: set[str] = set()
        for vn in self.nodes:
            logged = vn.events("window") + vn.events("telemetry")
            boot = (vn.last("boot") or {}).get("boot", 0)
            sent = {x["seq"] for x in logged}
            anomaly_traces_node |= {x["trace"] for x in vn.events("window") if x.get("anomaly")}
            got = self.received.seqs.get((vn.node_id, boot), [])
            dups = len(got) - len(set(got))
            lost = len(sent - set(got))
            stopped = vn.last("stopped") or {}
            sent_total += len(sent)
            lost_total += lost
            dup_total += dups
            received_total += len(set(got))
            key = f"{SITE}/{LINE}/{vn.config['machine']}"
            per_node.append(
                {
                    "node": vn.node_id,
                    "machine": key,
                    "boot": boot,
                    "sent": len(sent),
                    "acked_by_broker": stopped.get("sent"),
                    "left_in_queue": stopped.get("queue"),
                    "received": len(set(got)),
                    "lost": lost,
                    "duplicated": dups,
                    "anomalies": self.received.anomalies.get(key, 0),
                    "exit_code": vn.proc.returncode if vn.proc else None,
                }
            )
        fault_vn = self.nodes[self.opts.fault_node - 1]
        fault_key = f"{SITE}/{LINE}/{fault_vn.config['machine']}"
        seen = watcher.seen
        matched = [e for e in seen if e.trace_id in anomaly_traces_node]
        by_machine_opcua: dict[str, int] = {}
        for e in seen:
            by_machine_opcua[e.source] = by_machine_opcua.get(e.source, 0) + 1
        others_anomalous = {k: v for k, v in self.received.anomalies.items() if k != fault_key and v}
        checks = {
            "all_nodes_sent": all(p["sent"] > 0 for p in per_node),
            "nothing_lost": lost_total == 0,
            "nothing_duplicated": dup_total == 0,
            "fault_machine_raised_anomaly": self.received.anomalies.get(fault_key, 0) > 0,
            "no_anomaly_on_other_machines": not others_anomalous,
            "opcua_event_trace_matches_node_event": bool(matched) and len(matched) == len(seen),
        }
        lat_client = [x for x in (e.latency_ms for e in seen) if x is not None]
        return {
            "edgeline_version": VERSION,
            "ok": all(checks.values()),
            "checks": checks,
            "duration_s": round(time.monotonic() - self.t0, 2),
            "broker": broker_name,
            "opcua_endpoint": gateway.opcua.endpoint,
            "nodes": len(self.nodes),
            "window_ms": self.opts.window_ms,
            "fault": {
                "kind": self.opts.fault,
                "node": fault_vn.node_id,
                "machine": fault_key,
                "at_s": None if self.fault_started is None else round(self.fault_started, 2),
            },
            "events": {
                "sent": sent_total,
                "received": received_total,
                "lost": lost_total,
                "duplicated": dup_total,
                "duplicates_dropped_by_gateway": gateway.stats.duplicates,
                "dead_letters": gateway.stats.malformed,
            },
            "anomalies": {
                "raised": sum(self.received.anomalies.values()),
                "by_machine": dict(sorted(self.received.anomalies.items())),
            },
            "opcua": {
                "events_seen": len(seen),
                "by_source": by_machine_opcua,
                "trace_ids_matched": len(matched),
                "example": None
                if not matched
                else {
                    "trace_id": matched[0].trace_id,
                    "source": matched[0].source,
                    "node": matched[0].node,
                    "seq": matched[0].seq,
                },
            },
            "latency_ms": {
                "window_to_gateway": percentiles(self.received.gateway_latency_ms),
                "window_to_opcua_client": percentiles(lat_client),
            },
            "per_node": per_node,
        }


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    return asyncio.run(Demo(opts).run())
