"""The gateway: MQTT ingest -> validate -> dedupe -> machine state -> OPC-UA.

paho-mqtt's network thread hands each message to the asyncio loop, where one consumer
processes messages in arrival order; OPC-UA (asyncua) lives on that same loop.
Bad input never stops it: a malformed message is counted, logged with its topic and
published to the dead-letter topic, and the next message is processed as usual.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host import wire
from edgeline.host.gateway_scoring import GatewayScorer
from edgeline.host.gateway_store import GatewayStore
from edgeline.host.machine_state import MachineState, StateStore
from edgeline.host.metrics import GatewayMetrics, MetricsServer
from edgeline.host.opcua_alarms import AlarmConfig
from edgeline.host.opcua_security import SecurityConfig
from edgeline.host.opcua_server import OpcuaServer
from edgeline.host.tracing import EventTracer
from edgeline.host.uplink import UplinkConfig
from edgeline.host.uplinker import open_uplinker, uplink_listener
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("edgeline.gateway")

# Events that arrive before their node's birth are held unacknowledged, briefly: the
# broker stops sending once its in-flight window (Mosquitto: max_inflight_messages) is full
# of them, so they must not wait long, and never more than a window's worth.
MAX_PENDING = 16
PENDING_TIMEOUT_S = 5.0


@dataclass
class GatewayConfig:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_user: str | None = None
    broker_password: str | None = None
    site: str = "+"  # the site(s) this gateway serves; "+" = every site on the broker
    gateway_id: str = "gateway"
    opcua_host: str = "127.0.0.1"
    opcua_port: int = 4840
    dead_letter_site: str = "gateway"  # site level of the dead-letter topic when site is "+"
    state_dir: str | None = None  # dedupe marks and counters; None = in memory (demo, tests)
    max_batch: int = 512  # messages processed (and committed) together under load
    uplink: UplinkConfig = field(default_factory=UplinkConfig)  # kind "none" = no uplink
    model_path: str | None = None  # gateway model (.tflite) scoring each machine's features again
    metrics_port: int | None = None  # Prometheus text on 127.0.0.1:<port>; 0 = a free port
    metrics_host: str = "127.0.0.1"
    tracing: bool = False  # OpenTelemetry spans per event (needs opentelemetry-sdk and a provider)
    # None = OPC-UA without security (demo, tests): an explicit opt-out, logged loudly.
    opcua_security: SecurityConfig | None = None
    opcua_alarms: AlarmConfig = field(default_factory=AlarmConfig)


@dataclass
class GatewayStats:
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    malformed: int = 0
    pending: int = 0
    failed_batches: int = 0
    model_reloads: int = 0
    model_reloads_refused: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    dead_reasons: Counter[str] = field(default_factory=Counter)


EventListener = Callable[[wire.Event, MachineState, int], None]


@dataclass
class Inbound:
    """One MQTT message as paho handed it over: acknowledged only once it is committed."""

    topic: str
    payload: bytes
    t_recv_us: int
    mid: int = 0
    qos: int = 0


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.state = StateStore()
        if cfg.state_dir:
            Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
            self.store = GatewayStore(Path(cfg.state_dir) / "gateway.sqlite3")
        else:
            self.store = GatewayStore()
        self.dedupe = self.store.load_deduper()
        self._counts: Counter[tuple[str, str]] = Counter()
        self.opcua = OpcuaServer(
            cfg.opcua_host, cfg.opcua_port, security=cfg.opcua_security, alarms=cfg.opcua_alarms
        )
        self.stats = GatewayStats()
        self.event_listeners: list[EventListener] = []
        self.uplinker = open_uplinker(cfg.uplink, cfg.state_dir)
        if self.uplinker is not None:
            self.event_listeners.append(uplink_listener(self.uplinker.outbox, cfg.gateway_id))
        # paho's thread appends, the loop pops: a deque needs no lock for that (GIL-atomic).
        self._rx: collections.deque[Inbound | None] = collections.deque()
        self._rx_ready = asyncio.Event()
        self._rx_wake_pending = False
        self._pending: dict[str, list[Inbound]] = {}
        self._to_ack: list[Inbound] = []
        self._accepted: list[tuple[wire.Event, int]] = []  # deduped events of the current batch
        self._in_batch = False
        self.metrics = GatewayMetrics()
        self.metrics.track_nodes_online(lambda: sum(n.online for n in self.state.nodes.values()))
        self._metrics_server: MetricsServer | None = None
        self.tracer = EventTracer(enabled=cfg.tracing)
        self.scorer = GatewayScorer(cfg.model_path) if cfg.model_path else None
        if self.scorer is not None:
            self.scorer.self_test()
        # A gateway serving every site ("+") announces itself on each site's state topic as
        # the site's first node is born; nodes follow their own site's topic.
        self._sites_served: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        site = cfg.dead_letter_site if cfg.site == "+" else cfg.site
        self.state_topic = f"{w.TOPIC_ROOT}/{site}/{w.GATEWAY_NODE}/state"
        self.dead_topic = f"{w.TOPIC_ROOT}/{site}/{w.GATEWAY_NODE}/dead"
        # A persistent session with a stable client id, and acknowledgements sent by us only
        # after a message's effects are committed: what the broker holds for a gateway that
        # was down or killed is delivered again when it comes back, and nothing is acked
        # that was not recorded.
        self._mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edgeline-gateway-{cfg.gateway_id}",
            clean_session=False,
            manual_ack=True,
        )
        if cfg.broker_user:
            self._mqtt.username_pw_set(cfg.broker_user, cfg.broker_password)
        # Nodes follow this retained topic to know whether the gateway is there.
        self._mqtt.will_set(self.state_topic, self._state_payload(False), qos=1, retain=True)
        self._mqtt.enable_logger(logging.getLogger("edgeline.gateway.mqtt"))  # paho's own, at DEBUG
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._mqtt.on_disconnect = self._on_disconnect

    def _state_payload(self, online: bool) -> bytes:
        return wire.encode(
            {
                w.K_V: w.SCHEMA_VERSION,
                w.K_KIND: w.KIND_STATE,
                w.K_NODE: w.GATEWAY_NODE,
                w.K_BOOT: 0,
                w.K_ONLINE: online,
                w.K_GATEWAY: self.cfg.gateway_id,
            }
        )

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, connect_timeout: float = 10.0, connect: bool = True) -> None:
        """Start OPC-UA, restore known nodes, then connect to the broker (unless `connect` is
        False: benchmarks and tools feed `process()` directly)."""
        self._loop = asyncio.get_running_loop()
        await self.opcua.start()
        if self.cfg.metrics_port is not None:
            self._metrics_server = self.metrics.start_http(self.cfg.metrics_host, self.cfg.metrics_port)
            log.info("metrics at %s", self._metrics_server.url)
        await self._restore_births()
        if self.uplinker is not None:
            await self.uplinker.start()
        if not connect:
            return
        self._task = asyncio.create_task(self._consume(), name="edgeline-gateway-consume")
        self._mqtt.connect_async(self.cfg.broker_host, self.cfg.broker_port, keepalive=30)
        self._mqtt.loop_start()
        try:
            await asyncio.wait_for(self._connected.wait(), connect_timeout)
        except TimeoutError:
            await self.stop()
            raise ConnectionError(
                f"gateway could not connect to MQTT broker {self.cfg.broker_host}:{self.cfg.broker_port} "
                f"within {connect_timeout:.0f} s: is it running, and are host/port right?"
            ) from None

    async def stop(self) -> None:
        """Process and acknowledge what has arrived, say offline, then close everything.

        Messages that arrive after the consumer stopped are neither processed nor
        acknowledged: the broker keeps them in the gateway's session for the next start.
        """
        if self._task is not None:
            self._rx.append(None)
            self._rx_ready.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._task, 10.0)
            self._task = None
        if self._mqtt.is_connected():
            infos = [
                self._mqtt.publish(t, self._state_payload(False), qos=1, retain=True)
                for t in self._state_topics()
            ]
            for info in infos:
                with contextlib.suppress(Exception):
                    await asyncio.get_running_loop().run_in_executor(None, info.wait_for_publish, 2.0)
            # paho's loop runs once more after the disconnect and logs that at ERROR: not news.
            self._mqtt.disable_logger()
            self._mqtt.disconnect()
        self._mqtt.loop_stop()
        if self.uplinker is not None:
            await self.uplinker.stop()
            self.uplinker.outbox.close()
        await self.opcua.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        self.store.close()

    def _state_topics(self) -> list[str]:
        # tuple(): one C-level copy under the GIL, safe against the loop adding a site meanwhile
        sites = sorted(tuple(self._sites_served))
        return [self.state_topic] + [self._site_state_topic(site) for site in sites]

    def _site_state_topic(self, site: str) -> str:
        return f"{w.TOPIC_ROOT}/{site}/{w.GATEWAY_NODE}/state"

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every message received so far has been processed."""
        deadline = time.monotonic() + timeout
        while self._rx and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- paho thread ----------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("MQTT broker refused the gateway: %s", rc)
            return
        site = self.cfg.site
        client.subscribe([(f"{w.TOPIC_ROOT}/{site}/+/{k}", 1) for k in ("evt", "tel", "birth", "death")])
        for topic in self._state_topics():
            client.publish(topic, self._state_payload(True), qos=1, retain=True)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc != 0:
            log.warning("gateway lost the MQTT broker (%s); paho reconnects", rc)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._rx.append(Inbound(msg.topic, bytes(msg.payload), time.time_ns() // 1000, msg.mid, msg.qos))
        # Wake the loop once per burst, not once per message: the consumer clears the flag
        # before it drains, so a message appended after that always wakes it again.
        if not self._rx_wake_pending:
            self._rx_wake_pending = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._rx_ready.set)

    # -- processing -----------------------------------------------------------------------
    async def _consume(self) -> None:
        rx = self._rx
        while True:
            if not rx:
                try:
                    await asyncio.wait_for(self._rx_ready.wait(), 1.0 if self._pending else None)
                except TimeoutError:
                    await self.process([])  # nothing came in: still let parked events expire
                    continue
            self._rx_ready.clear()
            self._rx_wake_pending = False
            # Under load, take what has piled up and commit it as one transaction.
            batch: list[Inbound | None] = []
            while rx and len(batch) < self.cfg.max_batch:
                batch.append(rx.popleft())
            stop = None in batch
            try:
                await self.process([b for b in batch if b is not None])
            except Exception:
                # Nothing of the batch was committed or acknowledged: the broker redelivers it.
                log.exception("gateway failed to commit a batch of %d messages", len(batch))
                self.stats.failed_batches += 1
            if stop:
                return

    async def process(self, batch: list[Inbound]) -> None:
        """Handle a batch, commit its effects in one transaction, then acknowledge it."""
        self.store.begin()
        self._in_batch = True
        try:
            for item in batch:
                try:
                    await self.handle(item.topic, item.payload, item.t_recv_us, item)
                except Exception:  # a bug must not stop ingest; it is logged loudly
                    log.exception("gateway failed on a message from %s", item.topic)
                    self._to_ack.append(item)
            await self._finish_events()
            if self._pending:
                self._expire_pending()
            self.store.write_batch(self.dedupe, self._counts)
            if self.uplinker is not None:
                # Uplink records become durable before the batch commits: a crash in between
                # re-sends them, and upstream dedupes on (node, boot, seq) (docs/uplink.md).
                self.uplinker.outbox.flush()
            self.store.commit()
        except BaseException:
            self.store.rollback()
            raise
        finally:
            self._in_batch = False
            self._accepted.clear()
            self._counts.clear()
        for item in self._to_ack:
            if item.qos > 0:
                self._mqtt.ack(item.mid, item.qos)
        self._to_ack.clear()
        if self.uplinker is not None:
            self.metrics.set_outbox_depth(self.uplinker.outbox.depth)

    def _dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        self.stats.malformed += 1
        self.stats.dead_reasons[self.metrics.on_dead_letter(reason)] += 1
        log.warning("dead letter from topic %s: %s", topic, reason)
        body = {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: w.KIND_DEAD_LETTER,
            w.K_TOPIC: topic,
            w.K_REASON: reason,
            w.K_PAYLOAD: payload[:256],
        }
        self._mqtt.publish(self.dead_topic, wire.encode(body), qos=1)

    async def handle(self, topic: str, payload: bytes, t_recv_us: int, item: Inbound | None = None) -> None:
        """Process one message (outside a batch commit when called directly, as tests do)."""
        if item is None:
            item = Inbound(topic, payload, t_recv_us)
        self.stats.received += 1
        self.metrics.on_message(topic.rsplit("/", 1)[-1])
        if topic.split("/")[3:4] == [w.GATEWAY_NODE]:
            self._to_ack.append(item)  # our own state/dead-letter messages
            return
        try:
            t = wire.parse_topic(topic)
            m = wire.decode(payload)
            if t.kind == "birth":
                await self._on_birth(wire.parse_birth(m, t), payload)
            elif t.kind == "death":
                await self._on_death(wire.parse_death(m, t))
            else:
                ev = wire.parse_event(m, t)
                if self.state.machine_of(ev.node) is None:
                    self._park(t.node, item)  # acknowledged once its birth lets it through
                    return
                await self._on_event(ev, t_recv_us)
        except wire.WireError as e:
            self._dead_letter(topic, payload, str(e))
        self._to_ack.append(item)
        if not self._in_batch:  # called on its own (tests, tools): finish this one event now
            await self._finish_events()
            self._accepted.clear()

    def _park(self, node: str, item: Inbound) -> None:
        if self.stats.pending >= MAX_PENDING:
            self._dead_letter(item.topic, item.payload, f"unknown node {node!r}: no birth seen")
            self._to_ack.append(item)
            return
        self._pending.setdefault(node, []).append(item)
        self.stats.pending = sum(len(v) for v in self._pending.values())

    def reload_model(self, model: str | bytes) -> bool:
        """Blue-green reload of the gateway model: load the new one beside the running one,
        self-test it, then swap. On any failure the running model stays and False is returned.
        Batches in progress finish on the model they started with (the swap is one assignment
        between batches on this loop)."""
        try:
            candidate = GatewayScorer(model)
            candidate.self_test()
        except Exception as e:  # a bad file, a refused model, a failed self-test: keep the old one
            log.error("gateway model reload refused, keeping the running model: %s", e)
            self.stats.model_reloads_refused += 1
            return False
        self.scorer = candidate
        self.stats.model_reloads += 1
        log.info("gateway model reloaded (threshold %.4g)", candidate.threshold)
        return True

    async def _restore_births(self) -> None:
        """Known nodes from the last run, so their events need not wait for a new birth."""
        for node, raw in self.store.births():
            try:
                m = wire.decode(raw)
                topic = wire.Topic(site=str(m.get(w.K_SITE, "")), node=node, kind="birth")
                b = wire.parse_birth(m, topic)
            except wire.WireError as e:  # a schema this version no longer reads
                log.warning("stored birth of node %s not restored: %s", node, e)
                continue
            m_state, _ = self.state.on_birth(b)
            await self.opcua.ensure_machine(m_state)
        if self.state.nodes:
            log.info("restored %d known nodes from %s", len(self.state.nodes), self.store.path)

    def _expire_pending(self) -> None:
        """Dead-letter events whose node never announced itself within PENDING_TIMEOUT_S."""
        cutoff = time.time_ns() // 1000 - int(PENDING_TIMEOUT_S * 1e6)
        for node in list(self._pending):
            keep = []
            for item in self._pending[node]:
                if item.t_recv_us < cutoff:
                    self._dead_letter(item.topic, item.payload, f"unknown node {node!r}: no birth seen")
                    self._to_ack.append(item)
                else:
                    keep.append(item)
            if keep:
                self._pending[node] = keep
            else:
                del self._pending[node]
        self.stats.pending = sum(len(v) for v in self._pending.values())

    async def _on_birth(self, b: wire.Birth, raw: bytes | None = None) -> None:
        self.stats.by_kind["birth"] += 1
        if raw is not None:
            self.store.save_birth(b.node, raw)
        m, _new = self.state.on_birth(b)
        if self.scorer is not None:
            self.scorer.forget(m.key)
        if self.cfg.site == "+" and b.site not in self._sites_served:
            self._sites_served.add(b.site)
            self._mqtt.publish(self._site_state_topic(b.site), self._state_payload(True), qos=1, retain=True)
        await self.opcua.ensure_machine(m)
        await self.opcua.set_online(m.key, True, node=b.node, sensors=[s for s, _u, _f in b.sensors])
        log.info("birth of node %s boot %d on %s", b.node, b.boot, m.key)
        for item in self._pending.pop(b.node, []):
            self.stats.received -= 1  # counted when it first arrived
            await self.handle(item.topic, item.payload, item.t_recv_us, item)
        self.stats.pending = sum(len(v) for v in self._pending.values())

    async def _on_death(self, d: wire.Death) -> None:
        self.stats.by_kind["death"] += 1
        info = self.state.on_death(d.node)
        if info is not None:
            log.info("node %s went offline", d.node)
            await self.opcua.set_online(info.machine, False, node=d.node)

    async def _on_event(self, ev: wire.Event, t_recv_us: int) -> None:
        if not self.dedupe.accept(ev.node, ev.boot, ev.seq):
            self.stats.duplicates += 1
            self.metrics.on_duplicate()
            return
        self._accepted.append((ev, t_recv_us))

    async def _finish_events(self) -> None:
        """Score the batch's accepted events together, then apply them in arrival order."""
        if not self._accepted:
            return
        gw_scores: list[float | None] = [None] * len(self._accepted)
        if self.scorer is not None:
            gw_scores = self.scorer.score([(ev, self.state.machine_of(ev.node)) for ev, _t in self._accepted])
            self.metrics.observe_inference(self.scorer.last_batch_seconds, len(gw_scores))
        tracing = self.tracer.enabled
        for (ev, t_recv_us), gw in zip(self._accepted, gw_scores, strict=True):
            if tracing:
                with self.tracer.event_span(ev, None):
                    await self._apply_event(ev, t_recv_us, gw)
            else:
                await self._apply_event(ev, t_recv_us, gw)

    async def _apply_event(self, ev: wire.Event, t_recv_us: int, gw_score: float | None) -> None:
        self.stats.accepted += 1
        kind = "evt" if ev.kind == w.KIND_EVT else "tel"
        self.stats.by_kind[kind] += 1
        m = self.state.on_event(ev)
        if m is None:
            return
        self._counts[(m.key, kind)] += 1
        if ev.kind == w.KIND_EVT:
            if gw_score is not None:
                ev.scores["gateway"] = gw_score
            t0 = time.perf_counter()
            await self.opcua.update(m, ev, alarm_score(ev))
            if ev.anomaly:
                self._counts[(m.key, "anomaly")] += 1
                await self.opcua.emit_anomaly(m, ev)
            self.metrics.observe_opcua_publish(time.perf_counter() - t0)
            if ev.anomaly:
                log.info(
                    "anomaly on %s trace=%s node=%s seq=%d",
                    m.key,
                    ev.trace_hex,
                    ev.node,
                    ev.seq,
                    extra={"trace_id": ev.trace_hex, "node": ev.node, "seq": ev.seq},
                )
        for listener in self.event_listeners:
            listener(ev, m, t_recv_us)


# Model scores arrive as ratios to their threshold (1.0 = at it); control charts as |z| with
# a 3-sigma limit. The alarm compares both in sigma units: a model at its threshold counts
# as 3 sigma.
CHART_LIMIT_SIGMA = 3.0
MODEL_SCORE_KEYS = ("model", "gateway")


def alarm_score(ev: wire.Event) -> float:
    """The alarm's input for one event: the worst of its charts and models, in sigma units."""
    worst = 0.0
    for k, v in ev.scores.items():
        worst = max(worst, CHART_LIMIT_SIGMA * v if k in MODEL_SCORE_KEYS else v)
    return worst
