"""The gateway's OPC-UA face: Site/Line/Machine/Sensor values and anomaly events.

The address space grows from node births. NodeIds are stable strings built from the
hierarchy (`ns=<idx>;s=<site>/<line>/<machine>/<sensor>/<feature>`) so a SCADA tag list
survives a gateway restart. Anomaly events are emitted on the Server object with
SourceNode = the machine, because asyncua only delivers events to subscribers of the node
that emits them and SCADA clients subscribe to Server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from asyncua import Node, Server, ua
from edgeline.host.machine_state import MachineState
from edgeline.host.wire import Event

NAMESPACE = "urn:edgeline:gateway"
log = logging.getLogger("edgeline.opcua")


@dataclass
class _MachineNodes:
    obj: Node
    anomaly: Node
    score: Node
    last_trace: Node
    online: Node
    sensors: dict[str, dict[str, Node]]


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def _uadt(dt: datetime) -> ua.DateTime:
    # ua.DateTime is datetime under another name for the type checker.
    return cast(ua.DateTime, dt)


def _now() -> ua.DateTime:
    return _uadt(datetime.now(UTC))


class OpcuaServer:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 4840, name: str = "edgeline gateway"
    ) -> None:
        self.endpoint = f"opc.tcp://{host}:{port}/edgeline/"
        self.name = name
        self.server = Server()
        self.idx = 0
        self._sites: dict[str, Node] = {}
        self._lines: dict[tuple[str, str], Node] = {}
        self._machines: dict[str, _MachineNodes] = {}
        self.events_emitted = 0

    async def start(self) -> None:
        s = self.server
        await s.init()
        s.set_endpoint(self.endpoint)
        s.set_server_name(self.name)
        # First cut: no security. The secure configuration (Basic256Sha256, trust list,
        # user accounts) comes with the production gateway; the demo says so when it starts.
        s.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.idx = await s.register_namespace(NAMESPACE)
        self.anomaly_type = await s.create_custom_event_type(
            self.idx,
            "AnomalyEventType",
            ua.ObjectIds.BaseEventType,
            [
                ("TraceId", ua.VariantType.String),
                ("Score", ua.VariantType.Double),
                ("SensorNode", ua.VariantType.String),
                ("Boot", ua.VariantType.UInt32),
                ("Seq", ua.VariantType.UInt64),
                ("Causes", ua.VariantType.String),
            ],
        )
        self._gen = await s.get_event_generator(self.anomaly_type, s.nodes.server.nodeid)
        await s.start()
        log.info("OPC-UA server listening at %s", self.endpoint)

    async def stop(self) -> None:
        await self.server.stop()

    def _nid(self, path: str) -> ua.NodeId:
        return ua.NodeId(ua.String(path), ua.Int16(self.idx))

    async def _folder(self, parent: Node, path: str, name: str) -> Node:
        return await parent.add_object(self._nid(path), ua.QualifiedName(name, self.idx))

    async def ensure_machine(self, m: MachineState) -> None:
        """Create (or extend with new sensors) the machine's part of the address space."""
        site = self._sites.get(m.site)
        if site is None:
            site = self._sites[m.site] = await self._folder(
                self.server.nodes.objects, m.site, m.site
            )
        line_key = (m.site, m.line)
        line = self._lines.get(line_key)
        if line is None:
            line = self._lines[line_key] = await self._folder(site, f"{m.site}/{m.line}", m.line)
        base = f"{m.site}/{m.line}/{m.machine}"
        mn = self._machines.get(m.key)
        if mn is None:
            obj = await self._folder(line, base, m.machine)
            mn = _MachineNodes(
                obj=obj,
                anomaly=await obj.add_variable(
                    self._nid(base + "/Anomaly"), ua.QualifiedName("Anomaly", self.idx), False
                ),
                score=await obj.add_variable(
                    self._nid(base + "/Score"), ua.QualifiedName("Score", self.idx), 0.0
                ),
                last_trace=await obj.add_variable(
                    self._nid(base + "/LastTraceId"), ua.QualifiedName("LastTraceId", self.idx), ""
                ),
                online=await obj.add_variable(
                    self._nid(base + "/Online"), ua.QualifiedName("Online", self.idx), True
                ),
                sensors={},
            )
            # SCADA can subscribe to events of this machine alone.
            await obj.write_attribute(
                ua.AttributeIds.EventNotifier, ua.DataValue(ua.Variant(1, ua.VariantType.Byte))
            )
            self._machines[m.key] = mn
        for sensor, (unit, feats) in m.sensors.items():
            if sensor in mn.sensors:
                continue
            spath = f"{base}/{sensor}"
            sobj = await self._folder(mn.obj, spath, sensor)
            await sobj.add_property(
                self._nid(spath + "/Unit"), ua.QualifiedName("Unit", self.idx), unit
            )
            vars_: dict[str, Node] = {}
            for f in [*feats, "Score"]:
                vars_[f] = await sobj.add_variable(
                    self._nid(f"{spath}/{f}"), ua.QualifiedName(f, self.idx), 0.0
                )
            mn.sensors[sensor] = vars_

    async def set_online(self, machine_key: str, online: bool) -> None:
        mn = self._machines.get(machine_key)
        if mn is not None:
            await mn.online.write_value(online)

    async def update(self, m: MachineState, ev: Event) -> None:
        """Write the event's values with the sample's timestamp as SourceTimestamp."""
        mn = self._machines.get(m.key)
        if mn is None:
            return
        src = _uadt(_dt(ev.t_wall_us)) if ev.t_wall_us else _now()
        writes: list[tuple[Node, ua.Variant]] = []
        for sensor, vals in ev.features.items():
            sv = mn.sensors.get(sensor)
            if sv is None:
                continue
            names = m.sensors[sensor][1]
            for name, v in zip(names, vals, strict=False):
                node = sv.get(name)
                if node is not None:
                    writes.append((node, ua.Variant(v, ua.VariantType.Double)))
            if sensor in ev.scores:
                writes.append((sv["Score"], ua.Variant(ev.scores[sensor], ua.VariantType.Double)))
        top = max(ev.scores.values(), default=0.0)
        writes.append((mn.score, ua.Variant(top, ua.VariantType.Double)))
        writes.append((mn.anomaly, ua.Variant(ev.anomaly, ua.VariantType.Boolean)))
        for node, var in writes:
            await self.server.write_attribute_value(
                node.nodeid, ua.DataValue(var, SourceTimestamp=src, ServerTimestamp=_now())
            )

    async def emit_anomaly(self, m: MachineState, ev: Event) -> None:
        mn = self._machines[m.key]
        await mn.last_trace.write_value(ev.trace_hex)
        e = self._gen.event
        e.SourceNode = mn.obj.nodeid
        e.SourceName = f"{m.site}/{m.line}/{m.machine}"
        e.Severity = 700
        e.TraceId = ev.trace_hex
        e.Score = max(ev.scores.values(), default=0.0)
        e.SensorNode = ev.node
        e.Boot = ev.boot
        e.Seq = ev.seq
        e.Causes = ",".join(ev.causes)
        msg = f"anomaly on {m.machine}: {', '.join(ev.causes) or 'model'} (node {ev.node} seq {ev.seq})"
        # Time is when the anomalous window was sampled, so clients can measure latency.
        await self._gen.trigger(time_attr=_dt(ev.t_wall_us) if ev.t_wall_us else None, message=msg)
        self.events_emitted += 1
