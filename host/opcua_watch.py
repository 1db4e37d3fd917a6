"""An OPC-UA client that subscribes to the gateway's anomaly events, as SCADA would.

The demo and the tests use it to see what an operator sees, through a real client
connection rather than the server's own objects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asyncua import Client, ua
from edgeline.host.opcua_server import NAMESPACE

log = logging.getLogger("edgeline.opcua.watch")


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
        f = event.get_event_props_as_fields_dict()

        def val(name: str) -> Any:
            v = f.get(name)
            return v.Value if isinstance(v, ua.Variant) else v

        t = val("Time")
        self.seen.append(
            SeenEvent(
                trace_id=str(val("TraceId") or ""),
                score=float(val("Score") or 0.0),
                source=str(val("SourceName") or ""),
                node=str(val("SensorNode") or ""),
                seq=int(val("Seq") or 0),
                sample_time=t if isinstance(t, datetime) else None,
                received_us=now,
            )
        )


class AnomalyWatcher:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = Client(endpoint, timeout=10)
        self._handler = _Handler()
        self._sub: Any = None

    @property
    def seen(self) -> list[SeenEvent]:
        return self._handler.seen

    async def start(self) -> None:
        await self.client.connect()
        idx = await self.client.get_namespace_index(NAMESPACE)
        etype = await self.client.nodes.base_event_type.get_child(f"{idx}:AnomalyEventType")
        # Publishing interval 0: the server sends as soon as it can (lowest latency).
        self._sub = await self.client.create_subscription(0, self._handler)
        await self._sub.subscribe_events(self.client.nodes.server, etype)

    async def stop(self) -> None:
        try:
            if self._sub is not None:
                await self._sub.delete()
        finally:
            await self.client.disconnect()
