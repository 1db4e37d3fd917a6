"""Host code. The gateway's anomaly alarms as OPC-UA Alarms & Conditions (Part 9).

asyncua 2.1 has the Alarms & Conditions types but no condition state machine, and its
Acknowledge answers BadNothingToDo. This module is the condition manager:

- ``AnomalyAlarmType``, a subtype of AlarmConditionType with ``TraceId`` and ``Score``;
- one condition per machine (the machine HasCondition it; SourceNode = the machine);
- raise: the machine's anomaly score at or above `AlarmConfig.raise_threshold` for
  `raise_count` events in a row -> ActiveState True, AckedState False, Retain True, with the
  Severity, a Message, the TraceId of the event that raised it and its Score;
- clear, with hysteresis: below `clear_threshold` (lower than the raise threshold) for
  `clear_count` events in a row -> ActiveState False;
- Retain stays True until the condition is both inactive and acknowledged;
- Acknowledge(EventId, Comment) and AddComment(EventId, Comment) check the EventId against
  the condition's latest one (BadEventIdUnknown otherwise); acknowledging twice answers
  BadConditionBranchAlreadyAcked; only the operator role may call them (BadUserAccessDenied);
  Enable/Disable too;
- ConditionRefresh / ConditionRefresh2 replay the retained conditions between RefreshStart and
  RefreshEnd events, to the calling session's own subscription only.

Every state change is one event, emitted on the Server object (where asyncua delivers events to
subscribers) and on the machine object, with SourceNode = machine and ConditionId = the
condition's NodeId; the condition's own variables in the address space follow it.

The state machine (`observe`) is synchronous and cheap: the OPC-UA server queues the events it
produces and a task of its own emits them, so the gateway's ingest never waits on OPC-UA.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from asyncua import Node, Server, ua
from asyncua.common import events
from asyncua.common.event_objects import AlarmCondition
from edgeline.host import opcua_security as sec
from edgeline.host.wire import Event

log = logging.getLogger("edgeline.opcua.alarms")


def _ns0(i: int) -> ua.NodeId:
    """A standard (namespace 0) NodeId; asyncua types the identifier as a NewType."""
    return ua.NodeId(ua.Int32(i))


def _sid(ident: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(ident), ua.Int16(ns))


ALARM_TYPE_NAME = "AnomalyAlarmType"
CONDITION_NAME = "AnomalyAlarm"

_GOOD = ua.StatusCode(ua.UInt32(ua.StatusCodes.Good))
_M = ua.ObjectIds
ACKNOWLEDGE = _ns0(_M.AcknowledgeableConditionType_Acknowledge)
ADD_COMMENT = _ns0(_M.ConditionType_AddComment)
ENABLE = _ns0(_M.ConditionType_Enable)
DISABLE = _ns0(_M.ConditionType_Disable)
REFRESH = _ns0(_M.ConditionType_ConditionRefresh)
REFRESH2 = _ns0(_M.ConditionType_ConditionRefresh2)
# Event fields whose declared type asyncua keeps as a DataType NodeId (UtcTime): events carry
# them as DateTime.
_TIME_FIELDS = (
    "EnabledState/TransitionTime",
    "ActiveState/TransitionTime",
    "AckedState/TransitionTime",
    "Quality/SourceTimestamp",
    "LastSeverity/SourceTimestamp",
    "Comment/SourceTimestamp",
)

# (event, condition or None): what the server's event task emits.
Enqueue = Callable[[Any, "Condition | None"], None]


def _now() -> datetime:
    return datetime.now(UTC)


def _sample_time(ev: Event) -> datetime | None:
    return datetime.fromtimestamp(ev.t_wall_us / 1e6, tz=UTC) if ev.t_wall_us else None


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


@dataclass(frozen=True)
class AlarmConfig:
    """Raise/clear rule of the anomaly alarm, in the units of the event scores (|z| for the
    nodes' control charts, whose own limit is 3)."""

    raise_threshold: float = 3.0
    clear_threshold: float = 2.0
    raise_count: int = 2
    clear_count: int = 3
    severity: int = 700  # 1..1000; 700 is "high" in most SCADA severity bands

    def __post_init__(self) -> None:
        if not self.clear_threshold <= self.raise_threshold:
            raise ValueError(
                f"alarm clear_threshold ({self.clear_threshold}) must not be above "
                f"raise_threshold ({self.raise_threshold}): the hysteresis would be inverted"
            )
        if self.raise_count < 1 or self.clear_count < 1:
            raise ValueError(
                f"alarm raise_count and clear_count must be >= 1, got {self.raise_count}/{self.clear_count}"
            )
        if not 1 <= self.severity <= 1000:
            raise ValueError(f"alarm severity must be 1..1000, got {self.severity}")


@dataclass(eq=False)
class Condition:
    """One machine's anomaly alarm: its state and where it lives in the address space."""

    node_id: ua.NodeId
    source_id: ua.NodeId
    source_name: str
    fields: dict[str, ua.NodeId]  # event field path ("ActiveState/Id") -> instance variable
    input_node: ua.NodeId  # the variable the alarm watches (the machine's Score)
    severity: int
    enabled: bool = True
    active: bool = False
    acked: bool = True
    above: int = 0  # events in a row at or above the raise threshold
    below: int = 0  # events in a row below the clear threshold (while active)
    event_id: bytes = b""  # EventId of the latest state (what Acknowledge must name)
    trace_id: str = ""
    score: float = 0.0
    message: str = ""
    comment: str = ""
    comment_time: datetime | None = None
    client_user: str = ""
    quality: ua.StatusCode = field(default_factory=lambda: _GOOD)
    quality_time: datetime | None = None
    last_severity: int = 0
    active_time: datetime | None = None
    acked_time: datetime | None = None
    enabled_time: datetime | None = None
    last_event: Any = None  # the latest state as emitted (what ConditionRefresh replays)
    transitions: int = 0

    @property
    def retain(self) -> bool:
        return self.enabled and (self.active or not self.acked)


def _template(ev: Any) -> Any:
    """The event object every state change copies: AlarmConditionType's fields, ours, and the
    ConditionId (asyncua's EventGenerator adds it the same way)."""
    if "NodeId" not in ev.data_types:
        ev.add_property("NodeId", None, ua.VariantType.NodeId)
    for name, vt in (("TraceId", ua.VariantType.String), ("Score", ua.VariantType.Double)):
        if name not in ev.data_types:
            ev.add_property(name, None, vt)
    for f in _TIME_FIELDS:
        if f in ev.data_types:
            ev.data_types[f] = ua.VariantType.DateTime
    ev.ConditionClassId = _ns0(_M.ProcessConditionClassType)
    ev.ConditionClassName = ua.LocalizedText("Process")
    ev.ConditionName = CONDITION_NAME
    ev.BranchId = ua.NodeId()  # null: no branches
    return ev


class AlarmManager:
    def __init__(
        self, server: Server, idx: int, cfg: AlarmConfig, enqueue: Enqueue, *, enforce_roles: bool
    ) -> None:
        self.server = server
        self.idx = idx
        self.cfg = cfg
        self._enqueue = enqueue
        self.enforce_roles = enforce_roles
        self.conditions: dict[ua.NodeId, Condition] = {}
        self.type_node: Node | None = None
        self._template: Any = _template(AlarmCondition())  # install() derives it from the type
        self._refresh_start: Any = None
        self._refresh_end: Any = None

    # -- setup ----------------------------------------------------------------------------
    async def install(self) -> Node:
        """Create AnomalyAlarmType and bind the condition methods. Call once, after init."""
        s = self.server
        base = s.get_node(_ns0(_M.AlarmConditionType))
        t = await base.add_object_type(
            _sid(ALARM_TYPE_NAME, self.idx), ua.QualifiedName(ALARM_TYPE_NAME, self.idx)
        )
        for name, value, vt in (
            ("TraceId", "", ua.VariantType.String),
            ("Score", 0.0, ua.VariantType.Double),
        ):
            p = await t.add_property(
                _sid(f"{ALARM_TYPE_NAME}/{name}", self.idx), ua.QualifiedName(name, self.idx), value, vt
            )
            await p.set_modelling_rule(True)
        self.type_node = t
        self._template = _template(await events.get_event_obj_from_type_node(t))
        self._refresh_start = await self._system_event(_M.RefreshStartEventType)
        self._refresh_end = await self._system_event(_M.RefreshEndEventType)
        isession = s.iserver.isession
        isession.add_method_callback(ACKNOWLEDGE, self._acknowledge)
        isession.add_method_callback(ADD_COMMENT, self._add_comment)
        isession.add_method_callback(ENABLE, self._enable)
        isession.add_method_callback(DISABLE, self._disable)
        isession.add_method_callback(REFRESH, self._refresh)
        isession.add_method_callback(REFRESH2, self._refresh)
        return t

    async def _system_event(self, type_id: int) -> Any:
        ev: Any = await events.get_event_obj_from_type_node(self.server.get_node(_ns0(type_id)))
        ev.SourceNode = _ns0(_M.Server)
        ev.SourceName = "Server"
        ev.Severity = 1
        return ev

    def register(
        self,
        node_id: ua.NodeId,
        source_id: ua.NodeId,
        source_name: str,
        fields: dict[str, ua.NodeId],
        input_node: ua.NodeId,
    ) -> Condition:
        c = Condition(
            node_id, source_id, source_name, fields, input_node, self.cfg.severity, enabled_time=_now()
        )
        self.conditions[node_id] = c
        return c

    # -- the state machine ---------------------------------------------------------------
    def observe(self, c: Condition, score: float, ev: Event) -> bool:
        """Feed one scored event; returns True when the condition changed state (an event is queued)."""
        if not c.enabled:
            return False
        cfg = self.cfg
        if not c.active:
            c.above = c.above + 1 if score >= cfg.raise_threshold else 0
            if c.above >= cfg.raise_count:
                trace_id, causes = ev.trace_hex, ev.causes
                c.above = c.below = 0
                c.active, c.acked = True, False
                c.active_time = _now()
                c.trace_id, c.score = trace_id, score
                c.last_severity, c.severity = c.severity, cfg.severity
                why = ", ".join(causes) if causes else "model"
                c.message = (
                    f"Anomaly on {c.source_name}: score {score:.2f} >= {cfg.raise_threshold:g} "
                    f"for {cfg.raise_count} event(s) ({why}), trace {trace_id}"
                )
                self._emit(c, _sample_time(ev))
                return True
            return False
        c.below = c.below + 1 if score < cfg.clear_threshold else 0
        if c.below >= cfg.clear_count:
            c.above = c.below = 0
            c.active = False
            c.active_time = _now()
            c.score = score
            c.message = (
                f"Anomaly on {c.source_name} cleared: score below {cfg.clear_threshold:g} "
                f"for {cfg.clear_count} event(s) (raised with trace {c.trace_id})"
            )
            self._emit(c, _sample_time(ev))
            return True
        return False

    def set_quality(self, c: Condition, status: ua.StatusCode) -> None:
        """The data behind the alarm went offline (Bad/Uncertain) or came back (Good)."""
        if c.quality.value == status.value:
            return
        c.quality, c.quality_time = status, _now()
        if c.event_id or c.retain:
            self._emit(c, None)

    def _emit(self, c: Condition, t: datetime | None) -> None:
        c.event_id = uuid.uuid4().bytes
        c.transitions += 1
        ev = self.snapshot(c, t)
        c.last_event = ev
        self._enqueue(ev, c)

    def snapshot(self, c: Condition, t: datetime | None = None) -> Any:
        """The condition's current state as an event object (not emitted)."""
        ev = copy.copy(self._template)
        now = _now()
        ev.emitting_node = _ns0(_M.Server)
        ev.EventId = c.event_id
        ev.NodeId = c.node_id
        ev.SourceNode = c.source_id
        ev.SourceName = c.source_name
        ev.Time = t or now
        ev.ReceiveTime = now
        ev.Message = ua.LocalizedText(c.message or f"{CONDITION_NAME} of {c.source_name}")
        ev.Severity = c.severity
        ev.LastSeverity = c.last_severity
        ev.Retain = c.retain
        ev.Quality = c.quality
        ev.__dict__["Quality/SourceTimestamp"] = c.quality_time
        ev.Comment = ua.LocalizedText(c.comment)
        ev.__dict__["Comment/SourceTimestamp"] = c.comment_time
        ev.ClientUserId = c.client_user
        ev.EnabledState = ua.LocalizedText("Enabled" if c.enabled else "Disabled")
        ev.__dict__["EnabledState/Id"] = c.enabled
        ev.__dict__["EnabledState/TransitionTime"] = c.enabled_time
        ev.ActiveState = ua.LocalizedText("Active" if c.active else "Inactive")
        ev.__dict__["ActiveState/Id"] = c.active
        ev.__dict__["ActiveState/TransitionTime"] = c.active_time
        ev.AckedState = ua.LocalizedText("Acknowledged" if c.acked else "Unacknowledged")
        ev.__dict__["AckedState/Id"] = c.acked
        ev.__dict__["AckedState/TransitionTime"] = c.acked_time
        ev.InputNode = c.input_node
        ev.SuppressedOrShelved = False
        ev.TraceId = c.trace_id
        ev.Score = c.score
        return ev

    def instance_values(self, c: Condition, ev: Any) -> list[tuple[ua.NodeId, ua.Variant]]:
        """What the condition's variables in the address space must show after `ev`."""
        out = []
        for path, nid in c.fields.items():
            if path in ev.data_types and hasattr(ev, path):
                val = getattr(ev, path)
                if val is not None:
                    out.append((nid, ua.Variant(val, ev.data_types[path])))
        return out

    # -- methods (called by asyncua with the ObjectId and the input Variants) ------------
    def _target(self, parent: ua.NodeId, args: tuple[ua.Variant, ...], n: int) -> Condition | ua.StatusCode:
        c = self.conditions.get(parent)
        if c is None:
            return _status(ua.StatusCodes.BadNodeIdInvalid)
        if len(args) < n:
            return _status(ua.StatusCodes.BadArgumentsMissing)
        if len(args) > n:
            return _status(ua.StatusCodes.BadTooManyArguments)
        if not sec.may_operate(sec.current_user(), enforce=self.enforce_roles):
            log.warning(
                "%s: refused to user %r (needs the operator role)",
                c.source_name,
                sec.user_name(sec.current_user()),
            )
            return _status(ua.StatusCodes.BadUserAccessDenied)
        return c

    @staticmethod
    def _comment(v: ua.Variant) -> str | None:
        val = v.Value
        if val is None:
            return ""
        if isinstance(val, ua.LocalizedText):
            return val.Text or ""
        if isinstance(val, str):
            return val
        return None

    def _check_event(self, c: Condition, args: tuple[ua.Variant, ...]) -> tuple[str, ua.StatusCode | None]:
        event_id = args[0].Value
        comment = self._comment(args[1])
        if not isinstance(event_id, bytes) or comment is None:
            return "", _status(ua.StatusCodes.BadTypeMismatch)
        if not c.enabled:
            return "", _status(ua.StatusCodes.BadConditionDisabled)
        if not c.event_id or event_id != c.event_id:
            return "", _status(ua.StatusCodes.BadEventIdUnknown)
        return comment, None

    async def _acknowledge(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
        c = self._target(parent, args, 2)
        if isinstance(c, ua.StatusCode):
            return c
        comment, err = self._check_event(c, args)
        if err is not None:
            return err
        if c.acked:
            return _status(ua.StatusCodes.BadConditionBranchAlreadyAcked)
        now = _now()
        c.acked, c.acked_time = True, now
        c.client_user = sec.user_name(sec.current_user())
        if comment:
            c.comment, c.comment_time = comment, now
        log.info("%s acknowledged by %r: %s", c.source_name, c.client_user, comment)
        self._emit(c, None)
        return []

    async def _add_comment(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
        c = self._target(parent, args, 2)
        if isinstance(c, ua.StatusCode):
            return c
        comment, err = self._check_event(c, args)
        if err is not None:
            return err
        c.comment, c.comment_time = comment, _now()
        c.client_user = sec.user_name(sec.current_user())
        self._emit(c, None)
        return []

    async def _enable(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
        c = self._target(parent, args, 0)
        if isinstance(c, ua.StatusCode):
            return c
        if c.enabled:
            return _status(ua.StatusCodes.BadConditionAlreadyEnabled)
        c.enabled, c.enabled_time = True, _now()
        c.client_user = sec.user_name(sec.current_user())
        self._emit(c, None)
        return []

    async def _disable(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
        c = self._target(parent, args, 0)
        if isinstance(c, ua.StatusCode):
            return c
        if not c.enabled:
            return _status(ua.StatusCodes.BadConditionAlreadyDisabled)
        # Disabled: no evaluation, not retained; the alarm starts afresh when enabled again.
        c.enabled, c.enabled_time = False, _now()
        c.active, c.acked, c.above, c.below = False, True, 0, 0
        c.client_user = sec.user_name(sec.current_user())
        self._emit(c, None)
        return []

    async def _refresh(self, parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
        """ConditionRefresh(SubscriptionId) and ConditionRefresh2(SubscriptionId, MonitoredItemId)."""
        if not args or len(args) > 2:
            return _status(
                ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments
            )
        subsvc = self.server.iserver.subscription_service
        sub = subsvc.subscriptions.get(int(args[0].Value or 0))
        if sub is None or not self._owned_by_caller(sub):
            return _status(ua.StatusCodes.BadSubscriptionIdInvalid)
        mis = sub.monitored_item_srv
        watched: dict[ua.NodeId, list[int]] = mis._monitored_events  # notifier -> event items
        if len(args) == 2 and args[1].Value is not None:
            mid = int(args[1].Value)
            targets: list[tuple[ua.NodeId, int | None]] = [
                (n, mid) for n, mids in watched.items() if mid in mids
            ]
            if not targets:
                return _status(ua.StatusCodes.BadMonitoredItemIdInvalid)
        else:
            targets = [(node, None) for node in watched]
        server_id = _ns0(_M.Server)

        async def send(ev: Any, only_for: ua.NodeId | None = None) -> None:
            for node, mid in targets:
                if only_for is None or node in (server_id, only_for):
                    await mis.trigger_event(self._emitted_on(ev, node), mid)

        await send(self._stamp(self._refresh_start))
        n = 0
        for c in list(self.conditions.values()):
            ev = c.last_event
            if ev is not None and ev.Retain:
                # The retained state as last emitted: same EventId, so Acknowledge works with it.
                await send(ev, c.source_id)
                n += 1
        await send(self._stamp(self._refresh_end))
        log.info("ConditionRefresh of subscription %s replayed %d retained condition(s)", args[0].Value, n)
        return []

    def _owned_by_caller(self, sub: Any) -> bool:
        """Only the session that owns a subscription may refresh it (Part 9 5.5.7).

        asyncua hands method callbacks no session: find the caller's session by its user
        object, which asyncua creates afresh for every session activation."""
        user = sec.current_user()
        sessions = getattr(self.server.iserver, "_external_sessions", None)
        if user is None or not isinstance(sessions, dict):
            return True  # an internal call, or an asyncua without that table: nothing to check
        mine = [s.session_id for s in sessions.values() if s.user is user]
        return not mine or sub.session_id in mine

    @staticmethod
    def _stamp(ev: Any) -> Any:
        ev = copy.copy(ev)
        ev.EventId = uuid.uuid4().bytes
        ev.Time = ev.ReceiveTime = _now()
        ev.Message = ua.LocalizedText(type(ev).__name__)
        return ev

    @staticmethod
    def _emitted_on(ev: Any, node: ua.NodeId) -> Any:
        """`ev` as emitted by `node` (asyncua delivers an event only to items watching its emitter)."""
        if ev.emitting_node == node:
            return ev
        out = copy.copy(ev)
        out.emitting_node = node
        return out

    def on_machine(self, ev: Any) -> Any:
        """A copy of `ev` for subscribers of the machine object itself."""
        return self._emitted_on(ev, ev.SourceNode)
