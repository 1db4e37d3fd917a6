"""Host code. Bridge an existing PLC's OPC-UA server into the pipeline, as if it were nodes.

An asyncua client subscribes (data change, trigger status+value+timestamp, a queue per item
so no sample between two publishing intervals is lost) to the NodeIds the config maps. Each
distinct `node` in the map becomes a *virtual node*: its own MQTT connection (paho-mqtt 2,
QoS1) with its own last will, a persisted boot id, a seq per boot, a retained birth listing
its sensors, and one `evt` per value, exactly as docs/wire-format.md has a node send it:

    features = {sensor: [value]} (feature name "value"), scores = {}, anomaly = false,
    causes = [], detector = "plc", t_wall = the value's SourceTimestamp (us since the epoch)

A value whose status is not Good, or that is not a finite number (bools count as 0/1), is
skipped and counted. When the PLC is lost the virtual nodes publish their death (the
gateway shows them offline); the bridge reconnects with exponential backoff and jitter and
publishes their birth again.

Config, a TOML table that can sit in the gateway's config file beside [mqtt]:

    [plc]
    endpoint = "opc.tcp://10.0.0.5:4840"
    site = "plant-a"
    line = "line-1"
    machine = "pump-3"
    state_dir = "/var/lib/edgeline/plc"      # boot ids
    # publishing_interval_ms = 50, sampling_interval_ms = 0, queue_size = 100,
    # timeout_s = 4, backoff_initial_s = 0.5, backoff_max_s = 30,
    # user = "...", password = "...", security = "Basic256Sha256,SignAndEncrypt,cert.pem,key.pem"

    [[plc.map]]
    nodeid = "ns=2;s=Line1.Pump3.Vib"
    node = "plc-pump3"
    sensor = "vibration"
    unit = "g"
    # line = "...", machine = "..."          # per node, overriding [plc]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from asyncua import Client, ua
from edgeline.firmware.edgeline_node import VERSION
from edgeline.firmware.edgeline_node import wire as w
from edgeline.firmware.edgeline_node.identity import span_id, trace_id
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("edgeline.plc_bridge")

DETECTOR = "plc"
FEATURE = "value"
MAX_UNIT = 16  # characters the gateway keeps of a unit
MAX_SENSORS = 64  # per node, as the gateway enforces
MAX_QUEUED = 100_000  # MQTT messages paho holds per virtual node while the broker is away
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)
_MONO_MASK = (1 << 30) - 1


class PlcConfigError(ValueError):
    """The [plc] config is wrong; the message names the key."""


@dataclass(frozen=True)
class PlcPoint:
    """One mapped PLC variable."""

    nodeid: str
    node: str
    sensor: str
    unit: str = ""
    line: str | None = None
    machine: str | None = None


@dataclass
class PlcBridgeConfig:
    endpoint: str
    site: str
    line: str
    machine: str
    points: list[PlcPoint]
    state_dir: Path
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_user: str | None = None
    broker_password: str | None = None
    publishing_interval_ms: float = 50.0
    sampling_interval_ms: float = 0.0
    queue_size: int = 100
    timeout_s: float = 4.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    user: str | None = None
    password: str | None = None
    security: str | None = None


# -- config -----------------------------------------------------------------------------------
_PLC_KEYS: dict[str, type | tuple[type, ...]] = {
    "endpoint": str,
    "site": str,
    "line": str,
    "machine": str,
    "state_dir": str,
    "publishing_interval_ms": (int, float),
    "sampling_interval_ms": (int, float),
    "queue_size": int,
    "timeout_s": (int, float),
    "backoff_initial_s": (int, float),
    "backoff_max_s": (int, float),
    "user": str,
    "password": str,
    "security": str,
    "map": list,
}
_MAP_KEYS = {"nodeid": str, "node": str, "sensor": str, "unit": str, "line": str, "machine": str}
_MQTT_KEYS = {"host": str, "port": int, "user": str, "password": str}


def _typed(table: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    for key, v in table.items():
        typ = schema.get(key)
        if typ is None:
            raise PlcConfigError(f"unknown key {where}.{key}; known: {', '.join(schema)}")
        if not isinstance(v, typ) or isinstance(v, bool):
            name = typ.__name__ if isinstance(typ, type) else "number"
            raise PlcConfigError(f"{where}.{key} must be a {name}, got {v!r}")


def _name(v: str, where: str) -> str:
    if not w.valid_name(v):
        raise PlcConfigError(
            f"{where} = {v!r} is not a valid name: 1-32 of A-Z a-z 0-9 _ - not starting with '_'"
        )
    return v


def parse_config(raw: dict[str, Any], *, base_dir: Path | None = None) -> PlcBridgeConfig:
    """The bridge's config from a parsed TOML document: its [plc] table, and [mqtt] for the broker
    (the same keys as the gateway's). Other tables are left to their owners.

    :raises PlcConfigError: naming the key that is missing or wrong.
    """
    plc = raw.get("plc")
    if not isinstance(plc, dict):
        raise PlcConfigError("the config has no [plc] table")
    _typed(plc, _PLC_KEYS, "plc")
    mq = raw.get("mqtt", {})
    if not isinstance(mq, dict):
        raise PlcConfigError("[mqtt] must be a table")
    _typed({k: v for k, v in mq.items() if k in _MQTT_KEYS}, _MQTT_KEYS, "mqtt")
    for key in ("endpoint", "site", "line", "machine", "state_dir"):
        if key not in plc:
            raise PlcConfigError(f"plc.{key} is missing")
    endpoint = plc["endpoint"]
    if not endpoint.startswith("opc.tcp://"):
        raise PlcConfigError(f"plc.endpoint must be an opc.tcp:// URL, got {endpoint!r}")
    site = _name(plc["site"], "plc.site")
    line = _name(plc["line"], "plc.line")
    machine = _name(plc["machine"], "plc.machine")
    entries = plc.get("map", [])
    if not entries:
        raise PlcConfigError("plc.map is empty: add [[plc.map]] entries (nodeid, node, sensor, unit)")
    points: list[PlcPoint] = []
    seen_ids: set[str] = set()
    seen_sensors: set[tuple[str, str]] = set()
    where_of: dict[str, tuple[str, str]] = {}
    for i, e in enumerate(entries):
        at = f"plc.map[{i}]"
        if not isinstance(e, dict):
            raise PlcConfigError(f"{at} must be a table")
        _typed(e, _MAP_KEYS, at)
        for key in ("nodeid", "node", "sensor"):
            if key not in e:
                raise PlcConfigError(f"{at}.{key} is missing")
        try:
            ua.NodeId.from_string(e["nodeid"])
        except Exception as exc:  # asyncua raises its own parsing error types
            raise PlcConfigError(f"{at}.nodeid = {e['nodeid']!r} is not an OPC-UA NodeId: {exc}") from exc
        if e["nodeid"] in seen_ids:
            raise PlcConfigError(f"{at}.nodeid {e['nodeid']!r} is mapped twice")
        seen_ids.add(e["nodeid"])
        node = _name(e["node"], f"{at}.node")
        sensor = _name(e["sensor"], f"{at}.sensor")
        if (node, sensor) in seen_sensors:
            raise PlcConfigError(f"{at}: node {node!r} already has a sensor {sensor!r}")
        seen_sensors.add((node, sensor))
        unit = e.get("unit", "")
        if len(unit) > MAX_UNIT:
            raise PlcConfigError(f"{at}.unit {unit!r} is longer than {MAX_UNIT} characters")
        p_line = _name(e["line"], f"{at}.line") if "line" in e else None
        p_machine = _name(e["machine"], f"{at}.machine") if "machine" in e else None
        where = (p_line or line, p_machine or machine)
        if where_of.setdefault(node, where) != where:
            raise PlcConfigError(
                f"{at}: node {node!r} is placed on {'/'.join(where)} here but on "
                f"{'/'.join(where_of[node])} by an earlier entry: one node sits on one machine"
            )
        points.append(PlcPoint(e["nodeid"], node, sensor, unit, p_line, p_machine))
    per_node = Counter(p.node for p in points)
    for node, n in per_node.items():
        if n > MAX_SENSORS:
            raise PlcConfigError(f"node {node!r} has {n} sensors mapped; at most {MAX_SENSORS}")
    state_dir = Path(plc["state_dir"])
    if base_dir is not None and not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    cfg = PlcBridgeConfig(
        endpoint=endpoint,
        site=site,
        line=line,
        machine=machine,
        points=points,
        state_dir=state_dir,
        broker_host=mq.get("host", "127.0.0.1"),
        broker_port=mq.get("port", 1883),
        broker_user=mq.get("user"),
        broker_password=mq.get("password"),
        user=plc.get("user"),
        password=plc.get("password"),
        security=plc.get("security"),
    )
    for key in ("publishing_interval_ms", "sampling_interval_ms"):  # 0 = as fast as the PLC can
        if key in plc:
            if plc[key] < 0:
                raise PlcConfigError(f"plc.{key} must be 0 or more, got {plc[key]!r}")
            setattr(cfg, key, float(plc[key]))
    for key in ("queue_size", "timeout_s", "backoff_initial_s", "backoff_max_s"):
        if key in plc:
            if plc[key] <= 0:
                raise PlcConfigError(f"plc.{key} must be positive, got {plc[key]!r}")
            setattr(cfg, key, plc[key])
    if not 1 <= cfg.broker_port <= 65535:
        raise PlcConfigError(f"mqtt.port must be 1..65535, got {cfg.broker_port}")
    return cfg


def load_config(path: Path) -> PlcBridgeConfig:
    """:raises PlcConfigError: unreadable file, bad TOML, or a bad [plc] table (naming the file)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise PlcConfigError(f"cannot read {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise PlcConfigError(f"{path} is not valid TOML: {e}") from e
    try:
        return parse_config(raw, base_dir=path.parent)
    except PlcConfigError as e:
        raise PlcConfigError(f"{path}: {e}") from e


# -- one bridged node -----------------------------------------------------------------------
def next_boot_id(path: Path) -> int:
    """Read, increment and persist a boot id (1 on first use); written to a temp file, fsynced
    and renamed, so a crash leaves the old or the new value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        boot = int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        boot = 0
    boot = boot % (2**32 - 1) + 1
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{boot}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return boot


def to_us(ts: dt.datetime) -> int:
    """OPC-UA DateTime -> microseconds since the Unix epoch (naive datetimes are UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return max(0, (ts - _EPOCH) // _US)


class VirtualNode:
    """What a node would be for a group of PLC variables: identity, birth, death, events."""

    def __init__(
        self, node: str, site: str, line: str, machine: str, sensors: list[tuple[str, str]], boot: int
    ):
        self.node = node
        self.site = site
        self.line = line
        self.machine = machine
        self.sensors = sensors
        self.boot = boot
        self.seq = 0
        self.drops = 0

    def topic(self, kind: int) -> str:
        return w.topic(self.site, self.node, kind)

    def _head(self, kind: int) -> dict[int, Any]:
        return {w.K_V: w.SCHEMA_VERSION, w.K_KIND: kind, w.K_NODE: self.node, w.K_BOOT: self.boot}

    def birth(self) -> bytes:
        m = self._head(w.KIND_BIRTH)
        m[w.K_FW] = f"plc-bridge {VERSION}"
        m[w.K_MODEL_SHA] = None
        m[w.K_SENSORS] = [[s, unit, [FEATURE]] for s, unit in self.sensors]
        m[w.K_SITE] = self.site
        m[w.K_LINE] = self.line
        m[w.K_MACHINE] = self.machine
        m[w.K_DROPS] = {0: self.drops}
        return cbor2.dumps(m, canonical=True)

    def death(self) -> bytes:
        return cbor2.dumps(self._head(w.KIND_DEATH), canonical=True)

    def event(self, sensor: str, value: float, t_wall_us: int, t_mono_us: int) -> bytes:
        self.seq += 1
        m = self._head(w.KIND_EVT)
        m[w.K_SEQ] = self.seq
        m[w.K_TRACE] = trace_id()
        m[w.K_SPAN] = span_id()
        m[w.K_T_WALL] = t_wall_us
        m[w.K_T_MONO] = t_mono_us & _MONO_MASK
        m[w.K_FEATURES] = {sensor: [value]}
        m[w.K_SCORES] = {}
        m[w.K_ANOMALY] = False
        m[w.K_CAUSES] = []
        m[w.K_DETECTOR] = DETECTOR
        return cbor2.dumps(m, canonical=True)


class _NodeLink:
    """A virtual node's MQTT connection: its own client id and last will (its death)."""

    def __init__(self, vn: VirtualNode, cfg: PlcBridgeConfig, plc_up: Callable[[], bool]) -> None:
        self.vn = vn
        self._plc_up = plc_up
        self._lock = threading.Lock()  # birth/death from paho's thread vs events from the loop
        self.connected = threading.Event()
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edgeline-plc-{vn.node}",
            clean_session=True,
        )
        if cfg.broker_user:
            c.username_pw_set(cfg.broker_user, cfg.broker_password)
        c.will_set(vn.topic(w.KIND_DEATH), vn.death(), qos=1, retain=True)
        c.max_queued_messages_set(MAX_QUEUED)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        self.client = c

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("MQTT broker refused virtual node %s: %s", self.vn.node, rc)
            return
        # As a node does after every (re)connect; while the PLC is away it is dead instead.
        self.announce()
        self.connected.set()

    def announce(self, online: bool | None = None) -> mqtt.MQTTMessageInfo:
        """Publish the birth (PLC followed) or the death (PLC away); None = whichever is true
        now, read under the lock so that the last one published is always the current one."""
        vn = self.vn
        with self._lock:
            if online is None:
                online = self._plc_up()
            if online:
                return self.client.publish(vn.topic(w.KIND_BIRTH), vn.birth(), qos=1, retain=True)
            return self.client.publish(vn.topic(w.KIND_DEATH), vn.death(), qos=1, retain=True)

    def publish_event(self, sensor: str, value: float, t_wall_us: int, t_mono_us: int) -> bool:
        vn = self.vn
        with self._lock:
            info = self.client.publish(
                vn.topic(w.KIND_EVT), vn.event(sensor, value, t_wall_us, t_mono_us), qos=1
            )
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            vn.drops += 1
            return False
        return True  # sent, or queued by paho until the broker is back


# -- the bridge -------------------------------------------------------------------------------
@dataclass
class PlcBridgeStats:
    values: int = 0  # notifications received
    published: int = 0
    repeated: int = 0  # the same sample re-sent by the PLC on a re-subscribe: skipped
    bad_status: int = 0
    not_numeric: int = 0
    dropped: int = 0  # paho's queue full (broker away too long)
    plc_connects: int = 0
    plc_losses: int = 0
    refused_nodeids: list[str] = field(default_factory=list)


class _Handler:
    """asyncua subscription callbacks (called on the event loop, in notification order)."""

    def __init__(self, bridge: PlcBridge, lost: asyncio.Event) -> None:
        self.bridge = bridge
        self.lost = lost

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        item = data.monitored_item
        self.bridge.on_value(item.ClientHandle, val, item.Value)

    def status_change_notification(self, status: Any) -> None:
        log.warning("PLC subscription status changed: %s", status)
        self.lost.set()


class PlcBridge:
    """Runs the PLC subscription and the virtual nodes' MQTT links on the current event loop."""

    def __init__(self, cfg: PlcBridgeConfig) -> None:
        self.cfg = cfg
        self.stats = PlcBridgeStats()
        self._plc_up = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last: dict[int, tuple[int, float]] = {}  # handle -> (t_wall_us, value) last published
        self._points = {1000 + i: p for i, p in enumerate(cfg.points)}  # client handle -> point
        by_node: dict[str, list[PlcPoint]] = {}
        for p in cfg.points:
            by_node.setdefault(p.node, []).append(p)
        self.links: dict[str, _NodeLink] = {}
        for node, pts in by_node.items():
            boot = next_boot_id(cfg.state_dir / f"{node}.boot")
            vn = VirtualNode(
                node,
                cfg.site,
                pts[0].line or cfg.line,
                pts[0].machine or cfg.machine,
                [(p.sensor, p.unit) for p in pts],
                boot,
            )
            self.links[node] = _NodeLink(vn, cfg, lambda: self._plc_up)

    @property
    def nodes(self) -> dict[str, VirtualNode]:
        return {n: link.vn for n, link in self.links.items()}

    @property
    def plc_connected(self) -> bool:
        return self._plc_up

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, connect_timeout: float = 10.0) -> None:
        """Connect the virtual nodes to the broker, then start following the PLC.

        :raises ConnectionError: the broker is not reachable within `connect_timeout`.
        """
        for link in self.links.values():
            link.client.connect_async(self.cfg.broker_host, self.cfg.broker_port, keepalive=30)
            link.client.loop_start()
        deadline = time.monotonic() + connect_timeout
        for link in self.links.values():
            left = max(0.0, deadline - time.monotonic())
            if not await asyncio.to_thread(link.connected.wait, left):
                await self.stop()
                raise ConnectionError(
                    f"PLC bridge could not connect to MQTT broker {self.cfg.broker_host}:"
                    f"{self.cfg.broker_port} within {connect_timeout:.0f} s"
                )
        self._task = asyncio.create_task(self._plc_loop(), name="edgeline-plc-bridge")

    async def stop(self) -> None:
        """Stop following the PLC; publish each virtual node's death; disconnect."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._task, self.cfg.timeout_s + 5)
            self._task = None
        for link in self.links.values():
            if link.client.is_connected():
                info = link.announce(False)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(info.wait_for_publish, 2.0)
                link.client.disconnect()
            link.client.loop_stop()

    # -- values -----------------------------------------------------------------------------
    def on_value(self, handle: int, val: Any, dv: Any) -> None:
        """One data change from the PLC: publish it as an evt of its virtual node, or skip it."""
        self.stats.values += 1
        point = self._points.get(handle)
        if point is None:
            return
        status = getattr(dv, "StatusCode", None)
        if status is not None and not status.is_good():
            self.stats.bad_status += 1
            log.warning(
                "PLC value of %s (%s/%s) has status %s: skipped",
                point.nodeid,
                point.node,
                point.sensor,
                status,
            )
            return
        if isinstance(val, bool):
            value = 1.0 if val else 0.0
        elif isinstance(val, (int, float)) and math.isfinite(val):
            value = float(val)
        else:
            self.stats.not_numeric += 1
            log.warning(
                "PLC value of %s (%s/%s) is %r, not a finite number: skipped",
                point.nodeid,
                point.node,
                point.sensor,
                val,
            )
            return
        ts = getattr(dv, "SourceTimestamp", None) or getattr(dv, "ServerTimestamp", None)
        t_wall = to_us(ts) if ts is not None else time.time_ns() // 1000
        if self._last.get(handle) == (t_wall, value):
            self.stats.repeated += 1  # the current value again, re-sent on a re-subscribe
            return
        self._last[handle] = (t_wall, value)
        link = self.links[point.node]
        if link.publish_event(point.sensor, value, t_wall, time.monotonic_ns() // 1000):
            self.stats.published += 1
        else:
            self.stats.dropped += 1

    # -- the PLC connection ----------------------------------------------------------------
    def _set_plc_up(self, up: bool) -> None:
        if up == self._plc_up:
            return
        self._plc_up = up
        for link in self.links.values():
            if link.client.is_connected():  # otherwise its next connect announces it
                link.announce()

    def _monitored_items(self) -> list[ua.MonitoredItemCreateRequest]:
        reqs = []
        for handle, p in self._points.items():
            rv = ua.ReadValueId()
            rv.NodeId = ua.NodeId.from_string(p.nodeid)
            rv.AttributeId = ua.AttributeIds.Value
            params = ua.MonitoringParameters()
            params.ClientHandle = handle
            params.SamplingInterval = self.cfg.sampling_interval_ms
            params.QueueSize = self.cfg.queue_size
            params.DiscardOldest = True
            # A new sample with the same value is still a sample: report timestamp changes too.
            params.Filter = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor = rv
            req.MonitoringMode = ua.MonitoringMode.Reporting
            req.RequestedParameters = params
            reqs.append(req)
        return reqs

    async def _session(self) -> None:
        """One connection to the PLC: subscribe, then watch it until it is lost or we stop."""
        client = Client(self.cfg.endpoint, timeout=self.cfg.timeout_s)
        if self.cfg.user:
            client.set_user(self.cfg.user)
            client.set_password(self.cfg.password or "")
        if self.cfg.security:
            await client.set_security_string(self.cfg.security)
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            log.warning("connection to the PLC at %s lost: %r", self.cfg.endpoint, exc)
            lost.set()

        if hasattr(client, "connection_lost_callback"):
            client.connection_lost_callback = on_lost
        try:
            await client.connect()
            self.stats.plc_connects += 1
            sub = await client.create_subscription(self.cfg.publishing_interval_ms, _Handler(self, lost))
            results = await sub.create_monitored_items(self._monitored_items())
            refused = []
            for (_, p), r in zip(self._points.items(), results, strict=True):
                if isinstance(r, ua.StatusCode):
                    refused.append(p.nodeid)
                    log.error("the PLC refused to monitor %s (%s/%s): %s", p.nodeid, p.node, p.sensor, r)
            self.stats.refused_nodeids = refused
            log.info("following %d PLC variables at %s", len(results) - len(refused), self.cfg.endpoint)
            self._set_plc_up(True)
            while not self._stop.is_set() and not lost.is_set():
                waiters = [asyncio.ensure_future(e.wait()) for e in (self._stop, lost)]
                _done, pending = await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for f in pending:
                    f.cancel()
                if not self._stop.is_set() and not lost.is_set():
                    await client.check_connection()  # raises once the session is gone
        finally:
            if self._stop.is_set():
                self._plc_up = False  # stop() publishes the deaths and waits for them
            elif self._plc_up:
                self.stats.plc_losses += 1
                self._set_plc_up(False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    async def _plc_loop(self) -> None:
        delay = self.cfg.backoff_initial_s
        while not self._stop.is_set():
            connects = self.stats.plc_connects
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # OSError, TimeoutError, ua errors: all mean "PLC unavailable"
                log.warning("PLC at %s unavailable: %s", self.cfg.endpoint, e or type(e).__name__)
            if self._stop.is_set():
                return
            if self.stats.plc_connects > connects:
                delay = self.cfg.backoff_initial_s  # it was up: start the backoff over
            wait = delay * (0.5 + random.random() / 2)  # jitter: not every bridge at once
            log.info("reconnecting to the PLC in %.1f s", wait)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            delay = min(delay * 2, self.cfg.backoff_max_s)


# -- running it on its own ------------------------------------------------------------------
async def run(cfg: PlcBridgeConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    bridge = PlcBridge(cfg)
    await bridge.start()
    log.info("PLC bridge up: %s -> MQTT %s:%d", cfg.endpoint, cfg.broker_host, cfg.broker_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await bridge.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgeline gateway plc-bridge", description="Bridge a PLC's OPC-UA server into the pipeline."
    )
    p.add_argument("--config", type=Path, required=True, help="TOML file with a [plc] table (and [mqtt])")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except PlcConfigError as e:
        print(f"edgeline plc-bridge: {e}", file=sys.stderr)
        return 2
    asyncio.run(run(cfg))
    return 0
