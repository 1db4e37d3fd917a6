"""Host code. The gateway's OPC-UA face: Site/Line/Machine/Sensor values, anomaly events, alarms.

Address space (namespace ``urn:edgeline:gateway``), built from object types:

    Objects/<Site> (Folder)/<Line> (Folder)/<Machine> (MachineType)
        Online, Anomaly, Score, LastTraceId, Health, Anomalies     (variables)
        AnomalyAlarm (AnomalyAlarmType; the machine HasCondition it)
        <Sensor> (SensorType): Unit (property), Score, one variable per feature

NodeIds are stable strings built from the hierarchy (``ns=<idx>;s=<site>/<line>/<machine>/
<sensor>/<feature>``, the condition's members below ``.../AnomalyAlarm/``) so a SCADA tag list
survives a gateway restart. Instances are made from the types by `_instantiate` (asyncua's
`instantiate` would name children ``parent.child``).

Value status is never a silently stale Good: a variable reads BadWaitingForInitialData until its
first value, UncertainLastUsableValue (value kept) while its node is offline, and Good again
with the first value after the node is back. SourceTimestamp is the sample time of the reading.

Writes are coalesced: `update` only records the latest value of each variable (cheap and
synchronous in effect, so the gateway's ingest never waits on OPC-UA); a task writes what
changed every `flush_interval` seconds, yielding to the event loop every `flush_chunk` writes
or `slice_s` seconds of work, whichever comes first. A write costs ~8 us with no subscriber and
~35 us with one (see `SealedDataValue` for what made it 150 us), so the task also paces itself:
it spends at most `max_duty` of the loop's time writing values, waiting longer between flushes
when they get expensive, and coalescing more meanwhile.
Events go out at once through a second task: the per-window AnomalyEventType (a journal of
anomalous windows) and the alarm condition's state changes (`opcua_alarms`). Both are emitted
on the Server object, where asyncua delivers events to its subscribers, and on the machine
object, with SourceNode = the machine.

Security (`opcua_security`): Basic256Sha256 Sign&Encrypt with a trust list and user accounts
when a `SecurityConfig` is given; without one, the unsecured demo mode, logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import Node, Server, ua
from asyncua.common import events
from edgeline.host.machine_state import MachineState
from edgeline.host.opcua_alarms import CONDITION_NAME, AlarmConfig, AlarmManager, Condition
from edgeline.host.opcua_security import SecurityConfig, apply_security
from edgeline.host.wire import Event

NAMESPACE = "urn:edgeline:gateway"
log = logging.getLogger("edgeline.opcua")


def _ns0(i: int) -> ua.NodeId:
    """A standard (namespace 0) NodeId; asyncua types the identifier as a NewType."""
    return ua.NodeId(ua.Int32(i))


def _sid(ident: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(ident), ua.Int16(ns))


GOOD = ua.StatusCode(ua.UInt32(ua.StatusCodes.Good))
WAITING = ua.StatusCode(ua.UInt32(ua.StatusCodes.BadWaitingForInitialData))
STALE = ua.StatusCode(ua.UInt32(ua.StatusCodes.UncertainLastUsableValue))
NO_COMM = ua.StatusCode(ua.UInt32(ua.StatusCodes.BadNoCommunication))

VT = ua.VariantType
_NULL = ua.Variant(None, VT.Null)  # ua.Variant() guesses its type: ~0.3 ms through enum's miss path
# MachineType members: name -> (type, measured?). Measured values wait for data and go stale
# when the machine's nodes are offline; the others are the gateway's own knowledge.
MACHINE_VARS: dict[str, tuple[ua.VariantType, bool]] = {
    "Online": (VT.Boolean, False),
    "Anomaly": (VT.Boolean, True),
    "Score": (VT.Double, True),
    "LastTraceId": (VT.String, False),  # of the last anomaly ("" before the first)
    "Health": (VT.String, False),  # Unknown | Normal | Alarm | Offline
    "Anomalies": (VT.UInt64, False),
}
SENSOR_MEMBERS = ("Unit", "Score")
ANOMALY_EVENT_FIELDS = (
    ("TraceId", VT.String, ""),
    ("Score", VT.Double, 0.0),
    ("SensorNode", VT.String, ""),
    ("Boot", VT.UInt32, 0),
    ("Seq", VT.UInt64, 0),
    ("Causes", VT.String, ""),
)


def _dt(us: int) -> ua.DateTime:
    # ua.DateTime is datetime under another name for the type checker.
    return cast(ua.DateTime, datetime.fromtimestamp(us / 1e6, tz=UTC))


def _utcnow() -> ua.DateTime:
    return cast(ua.DateTime, datetime.now(UTC))


def _now_us() -> int:
    return time.time_ns() // 1000


class SealedDataValue(ua.DataValue):
    """A DataValue nobody mutates after it is made (this module makes a fresh one per write),
    so its deep copy is itself. asyncua deep-copies every written DataValue once per client
    monitoring the variable (66 us each on this machine, most of a write's cost with one
    subscriber); for these it costs nothing. Encoded exactly like a DataValue."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> SealedDataValue:
        return self


class _Var:
    """One variable's latest value, written by the flush task when it changed."""

    __slots__ = ("measured", "nodeid", "src_us", "status", "value", "vtype")

    def __init__(self, nodeid: ua.NodeId, vtype: ua.VariantType, measured: bool) -> None:
        self.nodeid = nodeid
        self.vtype = vtype
        self.measured = measured
        self.value: Any = None
        self.src_us = 0
        self.status = WAITING  # until the first value, measured or not


@dataclass
class _Sensor:
    obj: Node
    score: _Var
    features: dict[str, _Var]
    order: list[_Var | None]  # aligned with the birth's feature names


@dataclass
class _Machine:
    key: str
    obj: Node
    vars: dict[str, _Var]
    condition: Condition
    sensors: dict[str, _Sensor] = field(default_factory=dict)
    node_sensors: dict[str, set[str]] = field(default_factory=dict)  # node id -> its sensors
    online_nodes: set[str] = field(default_factory=set)
    online: bool = False  # until a birth (set_online) or an event says otherwise
    has_data: bool = False


# What an instance copies from its declaration in the type.
_VARIABLE_ATTRS = (
    "DisplayName",
    "Description",
    "DataType",
    "ValueRank",
    "ArrayDimensions",
    "AccessLevel",
    "UserAccessLevel",
    "Value",
    "MinimumSamplingInterval",
)
_OBJECT_ATTRS = ("DisplayName", "Description", "EventNotifier")


@dataclass
class _Decl:
    """A child of a type's instance declaration, ready to be copied into an instance."""

    path: str  # relative path below the instance, "ActiveState/Id"
    parent: str  # relative path of its parent ("" = the instance itself)
    decl: ua.NodeId
    nodeclass: ua.NodeClass
    bname: ua.QualifiedName
    ref: ua.NodeId
    typedef: ua.NodeId
    attrs: Any  # VariableAttributes | ObjectAttributes | None (a method: referenced, not copied)


class OpcuaServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4840,
        name: str = "edgeline gateway",
        *,
        security: SecurityConfig | None = None,
        alarms: AlarmConfig | None = None,
        flush_interval: float = 0.02,
        flush_chunk: int = 500,
        slice_s: float = 0.002,
        max_duty: float = 0.3,
    ) -> None:
        if flush_interval < 0 or flush_chunk < 1 or slice_s <= 0 or not 0 < max_duty <= 1:
            raise ValueError(
                "flush_interval must be >= 0, flush_chunk >= 1, slice_s > 0 and 0 < max_duty <= 1; got "
                f"{flush_interval}, {flush_chunk}, {slice_s}, {max_duty}"
            )
        self.endpoint = f"opc.tcp://{host}:{port}/edgeline/"
        self.host = host
        self.name = name
        self.security = security
        self.alarm_config = alarms or AlarmConfig()
        self.flush_interval = flush_interval
        self.flush_chunk = flush_chunk
        self.slice_s = slice_s
        self.max_duty = max_duty
        self.last_flush_busy_s = 0.0
        self.application_uri = f"urn:{socket.gethostname()}:edgeline:gateway"
        self.server = Server()
        self.idx = 0
        self._folders: dict[str, Node] = {}
        self._machines: dict[str, _Machine] = {}
        self._decls: dict[ua.NodeId, list[_Decl]] = {}
        self._dirty: set[_Var] = set()
        self._events: list[tuple[Any, Condition | None]] = []
        self._values_wake = asyncio.Event()
        self._events_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.alarms: AlarmManager | None = None
        # Counters: anomaly events emitted (per-window journal), alarm state events, value writes.
        self.events_emitted = 0
        self.alarm_events_emitted = 0
        self.writes = 0
        self.flushes = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.server
        await s.init()
        s.set_endpoint(self.endpoint)
        s.set_server_name(self.name)
        await s.set_application_uri(self.application_uri)
        perms = await apply_security(s, self.security, app_uri=self.application_uri, host=self.host)
        self.idx = await s.register_namespace(NAMESPACE)
        await self._make_types()
        self.alarms = AlarmManager(s, self.idx, self.alarm_config, self._enqueue, enforce_roles=perms.enforce)
        self.alarm_type = await self.alarms.install()
        await s.start()
        self._tasks = [
            asyncio.create_task(self._values_loop(), name="edgeline-opcua-values"),
            asyncio.create_task(self._events_loop(), name="edgeline-opcua-events"),
        ]
        mode = "Basic256Sha256 Sign&Encrypt" if self.security else "security None (demo)"
        log.info("OPC-UA server listening at %s (%s)", self.endpoint, mode)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.server.stop()

    # -- types ----------------------------------------------------------------------------
    def _nid(self, path: str) -> ua.NodeId:
        return _sid(path, self.idx)

    def _qn(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.idx)

    async def _make_types(self) -> None:
        base = self.server.get_node(_ns0(ua.ObjectIds.BaseObjectType))
        mt = await base.add_object_type(self._nid("MachineType"), self._qn("MachineType"))
        for name, (vt, _m) in MACHINE_VARS.items():
            default = {VT.Boolean: False, VT.Double: 0.0, VT.String: "", VT.UInt64: 0}[vt]
            v = await mt.add_variable(self._nid(f"MachineType/{name}"), self._qn(name), default, vt)
            await v.set_modelling_rule(True)
        st = await base.add_object_type(self._nid("SensorType"), self._qn("SensorType"))
        p = await st.add_property(self._nid("SensorType/Unit"), self._qn("Unit"), "", VT.String)
        await p.set_modelling_rule(True)
        v = await st.add_variable(self._nid("SensorType/Score"), self._qn("Score"), 0.0, VT.Double)
        await v.set_modelling_rule(True)
        self.machine_type, self.sensor_type = mt, st
        # The per-window anomaly event (kept from the first gateway: the demo and SCADA event
        # journals read it), with a stable NodeId.
        bet = self.server.get_node(_ns0(ua.ObjectIds.BaseEventType))
        et = await bet.add_object_type(self._nid("AnomalyEventType"), self._qn("AnomalyEventType"))
        for fname, vt, default in ANOMALY_EVENT_FIELDS:
            p = await et.add_property(self._nid(f"AnomalyEventType/{fname}"), self._qn(fname), default, vt)
            await p.set_modelling_rule(True)
        self.anomaly_type = et
        self._anomaly_template: Any = await events.get_event_obj_from_type_node(et)

    async def _declarations(self, type_id: ua.NodeId) -> list[_Decl]:
        """The mandatory instance declarations of a type and its supertypes (most derived wins)."""
        if type_id in self._decls:
            return self._decls[type_id]
        chain: list[Node] = []
        node = self.server.get_node(type_id)
        while node.nodeid != _ns0(ua.ObjectIds.BaseObjectType):
            chain.append(node)
            parents = await node.get_referenced_nodes(ua.ObjectIds.HasSubtype, ua.BrowseDirection.Inverse)
            if len(parents) != 1:
                break
            node = parents[0]
        out: list[_Decl] = []
        seen: set[str] = set()
        for t in chain:
            await self._collect(t, "", out, seen)
        self._decls[type_id] = out
        return out

    async def _collect(self, node: Node, prefix: str, out: list[_Decl], seen: set[str]) -> None:
        for rd in await node.get_children_descriptions(refs=ua.ObjectIds.HierarchicalReferences):
            if rd.NodeClass not in (ua.NodeClass.Variable, ua.NodeClass.Object, ua.NodeClass.Method):
                continue
            child = self.server.get_node(rd.NodeId)
            rules = await child.get_referenced_nodes(ua.ObjectIds.HasModellingRule)
            if not rules or rules[0].nodeid != _ns0(ua.ObjectIds.ModellingRule_Mandatory):
                continue
            path = f"{prefix}{rd.BrowseName.Name}"
            if path in seen:
                continue
            seen.add(path)
            attrs: Any = None
            names: tuple[str, ...] = ()
            if rd.NodeClass == ua.NodeClass.Variable:
                attrs, names = ua.VariableAttributes(), _VARIABLE_ATTRS
            elif rd.NodeClass == ua.NodeClass.Object:
                attrs, names = ua.ObjectAttributes(), _OBJECT_ATTRS
            if names:
                dvs = await child.read_attributes([getattr(ua.AttributeIds, n) for n in names])
                for n, dv in zip(names, dvs, strict=True):
                    if dv.StatusCode is not None and dv.StatusCode.is_good() and dv.Value is not None:
                        setattr(attrs, n, dv.Value if n == "Value" else dv.Value.Value)
            out.append(
                _Decl(
                    path=path,
                    parent=prefix.rstrip("/"),
                    decl=rd.NodeId,
                    nodeclass=rd.NodeClass,
                    bname=rd.BrowseName,
                    ref=rd.ReferenceTypeId,
                    typedef=ua.NodeId(rd.TypeDefinition.Identifier, rd.TypeDefinition.NamespaceIndex),
                    attrs=attrs,
                )
            )
            if rd.NodeClass != ua.NodeClass.Method:
                await self._collect(child, path + "/", out, seen)

    async def _instantiate(
        self,
        parent: ua.NodeId,
        type_id: ua.NodeId,
        path: str,
        name: str,
        ref: int = ua.ObjectIds.HasComponent,
    ) -> dict[str, ua.NodeId]:
        """An object of `type_id` at NodeId `path`, its members at `path/<member>`: relative
        member path -> NodeId ("" is the object itself). Methods are referenced, not copied."""
        isession = self.server.iserver.isession
        top = ua.AddNodesItem(
            ParentNodeId=parent,
            ReferenceTypeId=_ns0(ref),
            RequestedNewNodeId=self._nid(path),
            BrowseName=self._qn(name),
            NodeClass=ua.NodeClass.Object,
            NodeAttributes=ua.ObjectAttributes(DisplayName=ua.LocalizedText(name)),
            TypeDefinition=type_id,
        )
        items = [top]
        refs: list[ua.AddReferencesItem] = []
        ids = {"": self._nid(path)}
        for d in await self._declarations(type_id):
            parent_id = ids[d.parent]
            if d.nodeclass == ua.NodeClass.Method:
                refs.append(
                    ua.AddReferencesItem(
                        SourceNodeId=parent_id,
                        ReferenceTypeId=d.ref,
                        IsForward=True,
                        TargetNodeId=d.decl,
                        TargetNodeClass=ua.NodeClass.Method,
                    )
                )
                continue
            nid = self._nid(f"{path}/{d.path}")
            ids[d.path] = nid
            items.append(
                ua.AddNodesItem(
                    ParentNodeId=parent_id,
                    ReferenceTypeId=d.ref,
                    RequestedNewNodeId=nid,
                    BrowseName=d.bname,
                    NodeClass=d.nodeclass,
                    NodeAttributes=d.attrs,
                    TypeDefinition=d.typedef,
                )
            )
        for res in await isession.add_nodes(items):
            res.StatusCode.check()
        if refs:
            for st in await isession.add_references(refs):
                st.check()
        return ids

    # -- address space from births --------------------------------------------------------
    async def _folder(self, parent: Node, path: str, name: str) -> Node:
        f = self._folders.get(path)
        if f is None:
            f = self._folders[path] = await parent.add_folder(self._nid(path), self._qn(name))
        return f

    async def ensure_machine(self, m: MachineState) -> None:
        """Create (or extend with new sensors and features) the machine's part of the address space."""
        site = await self._folder(self.server.nodes.objects, m.site, m.site)
        line = await self._folder(site, f"{m.site}/{m.line}", m.line)
        base = m.key
        mn = self._machines.get(m.key)
        if mn is None:
            assert self.alarms is not None, "start() the server first"
            ids = await self._instantiate(
                line.nodeid, self.machine_type.nodeid, base, m.machine, ua.ObjectIds.Organizes
            )
            obj = self.server.get_node(ids[""])
            vars_ = {n: _Var(ids[n], vt, measured) for n, (vt, measured) in MACHINE_VARS.items()}
            # The alarm: a component of the machine, which HasCondition it.
            cids = await self._instantiate(
                obj.nodeid, self.alarm_type.nodeid, f"{base}/{CONDITION_NAME}", CONDITION_NAME
            )
            await obj.add_reference(cids[""], ua.ObjectIds.HasCondition)
            cond = self.alarms.register(
                cids[""], obj.nodeid, base, {k: v for k, v in cids.items() if k}, ids["Score"]
            )
            mn = _Machine(m.key, obj, vars_, cond)
            self._machines[m.key] = mn
            # Clients may subscribe to this machine's events alone; Server is its notifier.
            await obj.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
            await self.server.nodes.server.add_reference(obj.nodeid, ua.ObjectIds.HasNotifier)
            await self._write_now(self.alarms.instance_values(cond, self.alarms.snapshot(cond)))
            self._set(vars_["Anomalies"], m.anomalies, _now_us())
            self._set(vars_["Health"], "Unknown", _now_us())
            self._set(vars_["LastTraceId"], m.last_trace, _now_us())
            for v in vars_.values():
                self._dirty.add(v)  # the initial statuses (BadWaitingForInitialData)
        reserved = set(MACHINE_VARS) | {CONDITION_NAME}
        for sensor, (unit, feats) in m.sensors.items():
            if sensor in reserved:
                log.error(
                    "sensor %r of %s has the name of a machine member: not shown in OPC-UA", sensor, m.key
                )
                continue
            sn = mn.sensors.get(sensor)
            spath = f"{base}/{sensor}"
            if sn is None:
                ids = await self._instantiate(mn.obj.nodeid, self.sensor_type.nodeid, spath, sensor)
                unit_var = _Var(ids["Unit"], VT.String, False)
                self._set(unit_var, unit, _now_us())
                sn = _Sensor(self.server.get_node(ids[""]), _Var(ids["Score"], VT.Double, True), {}, [])
                self._dirty.add(sn.score)
                mn.sensors[sensor] = sn
            for f in feats:
                if f in sn.features or f in SENSOR_MEMBERS:
                    if f in SENSOR_MEMBERS:
                        log.warning(
                            "feature %r of %s/%s clashes with a SensorType member: skipped", f, base, sensor
                        )
                    continue
                node = await sn.obj.add_variable(self._nid(f"{spath}/{f}"), self._qn(f), 0.0, VT.Double)
                var = sn.features[f] = _Var(node.nodeid, VT.Double, True)
                self._dirty.add(var)
            sn.order = [sn.features.get(f) for f in feats]
        self._values_wake.set()

    # -- values -----------------------------------------------------------------------------
    def _set(self, var: _Var, value: Any, src_us: int) -> None:
        var.value, var.src_us, var.status = value, src_us, GOOD
        self._dirty.add(var)

    async def set_online(
        self, machine_key: str, online: bool, node: str | None = None, sensors: Iterable[str] = ()
    ) -> None:
        """A node of the machine was born (online) or died. Without `node`, the whole machine.

        Offline: the values the node fed (the `sensors` its birth named, and those its events
        carried) read UncertainLastUsableValue, or BadNoCommunication if they never had one;
        the alarm's Quality goes bad. Online and Health follow the machine, online while any of
        its nodes is. A value is Good again with its next reading."""
        mn = self._machines.get(machine_key)
        if mn is not None:
            if node is not None and sensors:
                mn.node_sensors.setdefault(node, set()).update(sensors)
            self._set_online(mn, online, node)

    def _set_online(self, mn: _Machine, online: bool, node: str | None) -> None:
        if node is None:
            mn.online_nodes.clear()
            machine_online = online
        else:
            (mn.online_nodes.add if online else mn.online_nodes.discard)(node)
            machine_online = bool(mn.online_nodes)
        now = _now_us()
        if not online:
            if machine_online:  # other nodes still feed this machine: only this one's sensors
                names = mn.node_sensors.get(node, set()) if node is not None else set()
            else:
                names = set(mn.sensors)
            affected = [
                v for s in names if (sn := mn.sensors.get(s)) for v in (sn.score, *sn.features.values())
            ]
            if not machine_online:
                affected += [v for v in mn.vars.values() if v.measured]
            for v in affected:
                v.status = STALE if v.value is not None else NO_COMM
                self._dirty.add(v)
        else:
            for v in [
                *mn.vars.values(),
                *(x for sn in mn.sensors.values() for x in (sn.score, *sn.features.values())),
            ]:
                if v.value is None and v.measured and v.status is NO_COMM:
                    v.status = WAITING
                    self._dirty.add(v)
        if machine_online != mn.online or mn.vars["Online"].value is None:
            mn.online = machine_online
            self._set(mn.vars["Online"], machine_online, now)
            assert self.alarms is not None
            self.alarms.set_quality(mn.condition, GOOD if machine_online else NO_COMM)
        self._health(mn, now)
        self._values_wake.set()

    def _health(self, mn: _Machine, now_us: int) -> None:
        if not mn.online:
            h = "Offline"
        elif mn.condition.active:
            h = "Alarm"
        elif mn.has_data:
            h = "Normal"
        else:
            h = "Unknown"
        hv = mn.vars["Health"]
        if hv.value != h:
            self._set(hv, h, now_us)

    async def update(self, m: MachineState, ev: Event, score: float | None = None) -> None:
        """Record the event's values (SourceTimestamp = the sample time) and feed the alarm.

        Nothing is written here: the flush task writes the latest value of each variable, and
        the event task emits alarm state changes. `score` overrides the alarm's input (default:
        the highest sensor score of the event)."""
        mn = self._machines.get(m.key)
        if mn is None:
            return
        t = ev.t_wall_us or _now_us()
        dirty = self._dirty
        for sensor, vals in ev.features.items():
            sn = mn.sensors.get(sensor)
            if sn is None:
                continue
            for var, v in zip(sn.order, vals, strict=False):
                if var is not None:
                    var.value, var.src_us, var.status = v, t, GOOD
                    dirty.add(var)
            sc = ev.scores.get(sensor)
            if sc is not None:
                var = sn.score
                var.value, var.src_us, var.status = sc, t, GOOD
                dirty.add(var)
        known = mn.node_sensors.get(ev.node)
        if known is None or not known.issuperset(ev.features):
            mn.node_sensors.setdefault(ev.node, set()).update(ev.features)
        if not mn.online or (mn.online_nodes and ev.node not in mn.online_nodes):
            # An event is proof of life, even without a birth seen since the death.
            self._set_online(mn, True, ev.node)
        top = max(ev.scores.values(), default=0.0)
        mv = mn.vars
        self._set(mv["Score"], top, t)
        self._set(mv["Anomaly"], ev.anomaly, t)
        if ev.anomaly:
            self._set(mv["LastTraceId"], ev.trace_hex, t)
            self._set(mv["Anomalies"], m.anomalies, t)
        assert self.alarms is not None
        changed = self.alarms.observe(mn.condition, top if score is None else score, ev)
        if changed or not mn.has_data:
            mn.has_data = True
            self._health(mn, t)
        self._values_wake.set()

    async def emit_anomaly(self, m: MachineState, ev: Event) -> None:
        """Queue the per-window AnomalyEventType event (emitted at once by the event task)."""
        mn = self._machines.get(m.key)
        if mn is None:
            return
        e: Any = copy.copy(self._anomaly_template)
        now = _utcnow()
        e.EventId = uuid.uuid4().bytes
        e.SourceNode = mn.obj.nodeid
        e.SourceName = m.key
        e.Severity = self.alarm_config.severity
        # Time is when the anomalous window was sampled, so clients can measure latency.
        e.Time = _dt(ev.t_wall_us) if ev.t_wall_us else now
        e.ReceiveTime = now
        e.Message = ua.LocalizedText(
            f"anomaly on {m.machine}: {', '.join(ev.causes) or 'model'} (node {ev.node} seq {ev.seq})"
        )
        e.TraceId = ev.trace_hex
        e.Score = max(ev.scores.values(), default=0.0)
        e.SensorNode = ev.node
        e.Boot = ev.boot
        e.Seq = ev.seq
        e.Causes = ",".join(ev.causes)
        self._enqueue(e, None)

    def _enqueue(self, ev: Any, cond: Condition | None) -> None:
        self._events.append((ev, cond))
        self._events_wake.set()

    # -- the two writer tasks -----------------------------------------------------------------
    async def _values_loop(self) -> None:
        while True:
            await self._values_wake.wait()
            self._values_wake.clear()
            try:
                await self._flush_values()
            except Exception:  # a write that fails must not stop the others, now or later
                log.exception("OPC-UA value flush failed")
            # What changes meanwhile is coalesced. An expensive flush buys a longer pause, so
            # writing values never takes more than max_duty of the loop.
            pause = max(self.flush_interval, self.last_flush_busy_s * (1 - self.max_duty) / self.max_duty)
            if pause:
                await asyncio.sleep(pause)

    async def _flush_values(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        aspace = self.server.iserver.aspace
        server_ts = _utcnow()
        value_attr = ua.AttributeIds.Value
        busy = 0.0
        t0 = time.perf_counter()
        n_slice = 0
        for var in dirty:
            dv = SealedDataValue(
                ua.Variant(var.value, var.vtype) if var.value is not None else _NULL,
                StatusCode=var.status,
                SourceTimestamp=_dt(var.src_us) if var.src_us else server_ts,
                ServerTimestamp=server_ts,
            )
            await aspace.write_attribute_value(var.nodeid, value_attr, dv)
            n_slice += 1
            if n_slice >= self.flush_chunk or time.perf_counter() - t0 >= self.slice_s:
                busy += time.perf_counter() - t0
                await asyncio.sleep(0)  # let the network, the events and the gateway run
                server_ts = _utcnow()
                t0, n_slice = time.perf_counter(), 0
        self.last_flush_busy_s = busy + time.perf_counter() - t0
        self.writes += len(dirty)
        self.flushes += 1

    async def flush(self) -> None:
        """Write every recorded value and emit every queued event now (tests, shutdown)."""
        await self._flush_values()
        await self._flush_events()

    async def _events_loop(self) -> None:
        while True:
            await self._events_wake.wait()
            self._events_wake.clear()
            try:
                await self._flush_events()
            except Exception:
                log.exception("OPC-UA event emission failed")

    async def _flush_events(self) -> None:
        assert self.alarms is not None
        subsvc = self.server.iserver.subscription_service
        while self._events:
            batch, self._events = self._events, []
            for i, (ev, cond) in enumerate(batch, 1):
                await subsvc.trigger_event(ev)  # on Server
                await subsvc.trigger_event(self.alarms.on_machine(ev))
                if cond is None:
                    self.events_emitted += 1
                else:
                    self.alarm_events_emitted += 1
                    await self._write_now(self.alarms.instance_values(cond, ev))
                if i % self.flush_chunk == 0:
                    await asyncio.sleep(0)

    async def _write_now(self, values: list[tuple[ua.NodeId, ua.Variant]]) -> None:
        aspace = self.server.iserver.aspace
        now = _utcnow()
        for nid, var in values:
            await aspace.write_attribute_value(
                nid, ua.AttributeIds.Value, SealedDataValue(var, ServerTimestamp=now)
            )

    # -- introspection (tests, demo) --------------------------------------------------------------
    def condition_of(self, machine_key: str) -> Condition | None:
        mn = self._machines.get(machine_key)
        return mn.condition if mn else None

    def node_id(self, path: str) -> str:
        """The NodeId string of an address-space path, e.g. ``s1/l1/m1/Score``."""
        return self._nid(path).to_string()
