"""Host code. OPC-UA clients that watch the gateway as SCADA would.

`AnomalyWatcher` subscribes to the per-window anomaly events; `AlarmWatcher` to the anomaly
alarm conditions (and the RefreshStart/RefreshEnd markers of ConditionRefresh), and can
acknowledge, comment and refresh. The demo and the tests use them to see what an operator
sees, through a real client connection rather than the server's own objects. Both connect
unsecured (the demo) or with Basic256Sha256 Sign&Encrypt, a client certificate and a user
account (`ClientCredentials`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from edgeline.host.opcua_alarms import ALARM_TYPE_NAME
from edgeline.host.opcua_server import NAMESPACE

log = logging.getLogger("edgeline.opcua.watch")


def _ns0(i: int) -> ua.NodeId:
    """A standard (namespace 0) NodeId; asyncua types the identifier as a NewType."""
    return ua.NodeId(ua.Int32(i))


def _sid(ident: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(ident), ua.Int16(ns))


@dataclass(frozen=True)
class ClientCredentials:
    """What a client needs for the secure endpoint: its application instance certificate
    (DER or PEM; its URI SAN must equal `app_uri`) and key, and a user account."""

    cert: Path
    key: Path
    app_uri: str
    username: str
    password: str


async def connect(endpoint: str, creds: ClientCredentials | None = None, timeout: float = 10) -> Client:
    """A connected asyncua client: unsecured and anonymous without `creds`."""
    client = Client(endpoint, timeout=timeout)
    if creds is not None:
        client.application_uri = creds.app_uri
        client.set_user(creds.username)
        client.set_password(creds.password)
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(creds.cert),
            str(creds.key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    await client.connect()
    return client


def _fields(event: Any) -> dict[str, Any]:
    return {
        k: (v.Value if isinstance(v, ua.Variant) else v)
        for k, v in event.get_event_props_as_fields_dict().items()
    }


@dataclass
class SeenEvent:
    trace_id: str
    score: float
    source: str
    node: str
    seq: int
    sample_time: datetime | None
    received_us: int

    @property
    def latency_ms(self) -> float | None:
        if self.sample_time is None:
            return None
        return (self.received_us - self.sample_time.timestamp() * 1e6) / 1000.0


@dataclass
class _Handler:
    seen: list[SeenEvent] = field(default_factory=list)

    def event_notification(self, event: Any) -> None:
        now = time.time_ns() // 1000
        f = _fields(event)
        t = f.get("Time")
        self.seen.append(
            SeenEvent(
                trace_id=str(f.get("TraceId") or ""),
                score=float(f.get("Score") or 0.0),
                source=str(f.get("SourceName") or ""),
                node=str(f.get("SensorNode") or ""),
                seq=int(f.get("Seq") or 0),
                sample_time=t if isinstance(t, datetime) else None,
                received_us=now,
            )
        )


class AnomalyWatcher:
    """Subscribes (publishing interval 0: lowest latency) to AnomalyEventType on Server."""

    def __init__(self, endpoint: str, creds: ClientCredentials | None = None) -> None:
        self.endpoint = endpoint
        self.creds = creds
        self.client: Client | None = None
        self._handler = _Handler()
        self._sub: Any = None

    @property
    def seen(self) -> list[SeenEvent]:
        return self._handler.seen

    async def start(self) -> None:
        self.client = await connect(self.endpoint, self.creds)
        idx = await self.client.get_namespace_index(NAMESPACE)
        etype = self.client.get_node(_sid("AnomalyEventType", idx))
        self._sub = await self.client.create_subscription(0, self._handler)
        await self._sub.subscribe_events(self.client.nodes.server, etype)

    async def stop(self) -> None:
        if self.client is None:
            return
        try:
            if self._sub is not None:
                await self._sub.delete()
        finally:
            await self.client.disconnect()


@dataclass
class SeenAlarm:
    """One AnomalyAlarmType event as the client received it (or a refresh marker)."""

    kind: str  # "alarm" | "refresh-start" | "refresh-end"
    condition_id: ua.NodeId | None
    source: str
    event_id: bytes
    active: bool
    acked: bool
    retain: bool
    severity: int
    trace_id: str
    score: float
    message: str
    comment: str
    user: str
    quality: int
    time: datetime | None
    received_us: int

    @property
    def latency_ms(self) -> float | None:
        if self.time is None:
            return None
        return (self.received_us - self.time.timestamp() * 1e6) / 1000.0


_REFRESH_START = _ns0(ua.ObjectIds.RefreshStartEventType)
_REFRESH_END = _ns0(ua.ObjectIds.RefreshEndEventType)


@dataclass
class _AlarmHandler:
    seen: list[SeenAlarm] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def event_notification(self, event: Any) -> None:
        now = time.time_ns() // 1000
        f = _fields(event)
        etype = f.get("EventType")
        kind = (
            "refresh-start"
            if etype == _REFRESH_START
            else "refresh-end"
            if etype == _REFRESH_END
            else "alarm"
        )
        msg, comment, t, q = f.get("Message"), f.get("Comment"), f.get("Time"), f.get("Quality")
        self.seen.append(
            SeenAlarm(
                kind=kind,
                condition_id=f.get("NodeId"),
                source=str(f.get("SourceName") or ""),
                event_id=bytes(f.get("EventId") or b""),
                active=bool(f.get("ActiveState/Id")),
                acked=bool(f.get("AckedState/Id")),
                retain=bool(f.get("Retain")),
                severity=int(f.get("Severity") or 0),
                trace_id=str(f.get("TraceId") or ""),
                score=float(f.get("Score") or 0.0),
                message=(msg.Text or "") if isinstance(msg, ua.LocalizedText) else str(msg or ""),
                comment=(comment.Text or "") if isinstance(comment, ua.LocalizedText) else "",
                user=str(f.get("ClientUserId") or ""),
                quality=q.value if isinstance(q, ua.StatusCode) else 0,
                time=t if isinstance(t, datetime) else None,
                received_us=now,
            )
        )
        self.changed.set()


class AlarmWatcher:
    """An alarm list: subscribes to AnomalyAlarmType (and the refresh markers) on Server."""

    def __init__(
        self, endpoint: str, creds: ClientCredentials | None = None, publishing_ms: float = 0
    ) -> None:
        self.endpoint = endpoint
        self.creds = creds
        self.publishing_ms = publishing_ms
        self.client: Client | None = None
        self._handler = _AlarmHandler()
        self._sub: Any = None

    @property
    def seen(self) -> list[SeenAlarm]:
        return self._handler.seen

    @property
    def alarms(self) -> list[SeenAlarm]:
        return [a for a in self.seen if a.kind == "alarm"]

    def latest(self, source: str) -> SeenAlarm | None:
        """The last state seen of the condition of machine `source` (Site/Line/Machine)."""
        for a in reversed(self.seen):
            if a.kind == "alarm" and a.source == source:
                return a
        return None

    async def start(self) -> None:
        self.client = await connect(self.endpoint, self.creds)
        idx = await self.client.get_namespace_index(NAMESPACE)
        types = [self.client.get_node(_sid(ALARM_TYPE_NAME, idx)), _REFRESH_START, _REFRESH_END]
        self._sub = await self.client.create_subscription(self.publishing_ms, self._handler)
        self.item = await self._sub.subscribe_events(self.client.nodes.server, types)

    async def stop(self) -> None:
        if self.client is None:
            return
        try:
            if self._sub is not None:
                await self._sub.delete()
        finally:
            await self.client.disconnect()

    async def wait_for(
        self, pred: Callable[[list[SeenAlarm]], bool], timeout: float = 5.0
    ) -> list[SeenAlarm]:
        """Wait until `pred(seen)` holds; returns `seen`.

        :raises TimeoutError: naming what was seen, when it does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while not pred(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"alarm condition not met within {timeout} s; seen: {self.seen}")
            self._handler.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._handler.changed.wait(), left)
        return self.seen

    async def acknowledge(self, alarm: SeenAlarm, comment: str = "", event_id: bytes | None = None) -> None:
        """Call Acknowledge on the alarm's condition with its EventId (or `event_id`).

        :raises asyncua.ua.UaStatusCodeError: what the server refused it with."""
        await self._call(alarm, ua.ObjectIds.AcknowledgeableConditionType_Acknowledge, comment, event_id)

    async def add_comment(self, alarm: SeenAlarm, comment: str, event_id: bytes | None = None) -> None:
        await self._call(alarm, ua.ObjectIds.ConditionType_AddComment, comment, event_id)

    async def _call(self, alarm: SeenAlarm, method: int, comment: str, event_id: bytes | None) -> None:
        assert self.client is not None and alarm.condition_id is not None
        eid = alarm.event_id if event_id is None else event_id
        await self.client.get_node(alarm.condition_id).call_method(
            _ns0(method),
            ua.Variant(eid, ua.VariantType.ByteString),
            ua.Variant(ua.LocalizedText(comment), ua.VariantType.LocalizedText),
        )

    async def refresh(self, monitored_item: bool = False) -> None:
        """ConditionRefresh of this subscription (ConditionRefresh2 of its item if asked)."""
        assert self.client is not None and self._sub is not None
        cond_type = self.client.get_node(_ns0(ua.ObjectIds.ConditionType))
        sid = ua.Variant(self._sub.subscription_id, ua.VariantType.UInt32)
        if monitored_item:
            mid = ua.Variant(self.item, ua.VariantType.UInt32)
            await cond_type.call_method(_ns0(ua.ObjectIds.ConditionType_ConditionRefresh2), sid, mid)
        else:
            await cond_type.call_method(_ns0(ua.ObjectIds.ConditionType_ConditionRefresh), sid)
