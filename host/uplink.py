"""Host code. The uplink: what the gateway forwards upstream, and how.

- `UplinkRecord` and its CBOR form (`encode_record` / `decode_record`): one processed
  window, tagged with its machine key, identity (node, boot, seq) and trace id.
  docs/uplink.md is the prose.
- `Uplink`: the interface the runner (`edgeline.host.uplinker.Uplinker`) drives. Every
  method but `close` is non-blocking: the client libraries do their I/O on their own threads.
- `MqttUplink`: a bridge to a second MQTT broker (paho-mqtt 2, QoS1). A record counts as
  sent only once its PUBACK is in; paho keeps unacknowledged publishes across reconnects
  and resends them (DUP) in their original order.
- `KafkaUplink` lives in uplink_kafka.py (optional extra `kafka`).

Delivery is at-least-once: after a crash, or a failed delivery, unacknowledged records
are sent again. Every record carries (node, boot, seq), so a consumer that dedupes on it
sees each window exactly once, in order.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.outbox import OutboxRecord
from edgeline.host.wire import Event
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

log = logging.getLogger("edgeline.uplink")

UPLINK_TOPIC_ROOT = "edgeline/v1/uplink"
UPLINK_SCHEMA_VERSION = 1
KIND_UPLINK = w.KIND_UPLINK  # key 1 of an uplink record
# Keys shared with the node wire format keep its numbers and meaning (docs/wire-format.md).
K_V, K_KIND, K_NODE, K_BOOT, K_SEQ, K_TRACE = w.K_V, w.K_KIND, w.K_NODE, w.K_BOOT, w.K_SEQ, w.K_TRACE
K_T_WALL, K_SCORES, K_ANOMALY = w.K_T_WALL, w.K_SCORES, w.K_ANOMALY
# Keys of the uplink record only (50-59 reserved for it).
K_MACHINE_KEY, K_GATEWAY_ID, K_T_GATEWAY = w.K_MACHINE_KEY, w.K_GATEWAY_ID, w.K_T_GATEWAY
MAX_RECORD = 16 * 1024


class UplinkError(RuntimeError):
    """The uplink cannot be built or used; the text says what to change."""


class UplinkBusy(UplinkError):
    """The uplink's own buffers are full: try again later (not a failure)."""


class UplinkRecordError(ValueError):
    """A payload is not a valid uplink record; the text names the key."""


@dataclass(frozen=True)
class UplinkRecord:
    machine: str  # Site/Line/Machine key, e.g. "plant1/line2/press3"
    node: str
    boot: int
    seq: int
    trace_id: bytes  # 16 bytes, continued from the node's event
    anomaly: bool
    scores: dict[str, float]
    t_wall_us: int  # the node's wall clock of the sample that completed the window (0: unsynced)
    gateway: str = ""
    t_gateway_us: int = 0  # when the gateway received the event

    @property
    def identity(self) -> tuple[str, int, int]:
        """(node, boot, seq): what consumers dedupe on."""
        return (self.node, self.boot, self.seq)

    @property
    def trace_hex(self) -> str:
        return self.trace_id.hex()


def encode_record(r: UplinkRecord) -> bytes:
    """CBOR, preferred serialization, small integer keys (docs/uplink.md)."""
    return cbor2.dumps(
        {
            K_V: UPLINK_SCHEMA_VERSION,
            K_KIND: KIND_UPLINK,
            K_NODE: r.node,
            K_BOOT: r.boot,
            K_SEQ: r.seq,
            K_TRACE: r.trace_id,
            K_T_WALL: r.t_wall_us,
            K_SCORES: r.scores,
            K_ANOMALY: r.anomaly,
            K_MACHINE_KEY: r.machine,
            K_GATEWAY_ID: r.gateway,
            K_T_GATEWAY: r.t_gateway_us,
        },
        canonical=True,
    )


def _get(m: Mapping[Any, Any], key: int, typ: type, what: str) -> Any:
    v = m.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise UplinkRecordError(f"uplink record key {key} ({what}) must be {typ.__name__}, got {v!r:.40}")
    return v


def decode_record(payload: bytes) -> UplinkRecord:
    """Parse and validate an uplink record (for consumers and tests).

    :raises UplinkRecordError: naming the key that is missing or wrong.
    """
    if len(payload) > MAX_RECORD:
        raise UplinkRecordError(f"uplink record of {len(payload)} bytes exceeds {MAX_RECORD}")
    try:
        m = cbor2.loads(payload)
    except Exception as e:  # cbor2 raises several types; all mean "not CBOR"
        raise UplinkRecordError(f"uplink record is not valid CBOR: {e}") from e
    if not isinstance(m, dict):
        raise UplinkRecordError(f"uplink record is a CBOR {type(m).__name__}, not a map")
    if m.get(K_V) != UPLINK_SCHEMA_VERSION or m.get(K_KIND) != KIND_UPLINK:
        raise UplinkRecordError(
            f"not an uplink record v{UPLINK_SCHEMA_VERSION}: "
            f"key 0 = {m.get(K_V)!r}, key 1 = {m.get(K_KIND)!r}"
        )
    trace = _get(m, K_TRACE, bytes, "trace id")
    if len(trace) != 16:
        raise UplinkRecordError(f"uplink record key {K_TRACE} (trace id) must be 16 bytes")
    scores = _get(m, K_SCORES, dict, "scores")
    for s, v in scores.items():
        if not isinstance(s, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UplinkRecordError(
                f"uplink record key {K_SCORES} (scores): {s!r} -> {v!r} is not str -> number"
            )
    return UplinkRecord(
        machine=_get(m, K_MACHINE_KEY, str, "machine key"),
        node=_get(m, K_NODE, str, "node"),
        boot=_get(m, K_BOOT, int, "boot"),
        seq=_get(m, K_SEQ, int, "seq"),
        trace_id=bytes(trace),
        anomaly=_get(m, K_ANOMALY, bool, "anomaly"),
        scores={s: float(v) for s, v in scores.items()},
        t_wall_us=_get(m, K_T_WALL, int, "t_wall"),
        gateway=_get(m, K_GATEWAY_ID, str, "gateway") if K_GATEWAY_ID in m else "",
        t_gateway_us=_get(m, K_T_GATEWAY, int, "t_gateway") if K_T_GATEWAY in m else 0,
    )


def record_from_event(ev: Event, machine_key: str, gateway: str, t_recv_us: int) -> UplinkRecord:
    """The uplink record of a processed window."""
    return UplinkRecord(
        machine=machine_key,
        node=ev.node,
        boot=ev.boot,
        seq=ev.seq,
        trace_id=ev.trace_id,
        anomaly=bool(ev.anomaly),
        scores=dict(ev.scores),
        t_wall_us=ev.t_wall_us,
        gateway=gateway,
        t_gateway_us=t_recv_us,
    )


def uplink_topic(machine_key: str) -> str:
    """`edgeline/v1/uplink/{site}/{machine}` for a "site/line/machine" key.

    :raises ValueError: if the key is not three valid names separated by "/".
    """
    parts = machine_key.split("/")
    if len(parts) != 3 or not all(w.valid_name(p) for p in parts):
        raise ValueError(f"machine key {machine_key!r} is not site/line/machine of valid names")
    return f"{UPLINK_TOPIC_ROOT}/{parts[0]}/{parts[2]}"


# -- the interface the runner drives ---------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    confirmed_upto: int  # every record sent with id <= this is confirmed (0: none yet)
    failed: bool  # a delivery failed: the runner resends from confirmed_upto once settled
    unsettled: int  # records sent whose outcome is not known yet


class DeliveryTracker:
    """Turns confirmations that arrive in any order, on any thread, into the contiguous
    prefix of sent records the outbox may drop (an outbox ack is always a prefix).

    `token` is whatever the client library reports back: a paho message id, an outbox id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: collections.deque[tuple[int, Hashable]] = collections.deque()
        self._done: set[Hashable] = set()
        self._failed: set[Hashable] = set()
        self._confirmed = 0

    def sent(self, record_id: int, token: Hashable) -> None:
        with self._lock:
            self._order.append((record_id, token))

    def unsend_last(self) -> None:
        """Forget the newest `sent` (the library refused it after all)."""
        with self._lock:
            self._order.pop()

    def done(self, token: Hashable, ok: bool = True) -> None:
        with self._lock:
            (self._done if ok else self._failed).add(token)

    def progress(self) -> Progress:
        with self._lock:
            while self._order and self._order[0][1] in self._done:
                rid, token = self._order.popleft()
                self._done.discard(token)
                self._confirmed = rid
            unsettled = sum(1 for _rid, t in self._order if t not in self._done and t not in self._failed)
            return Progress(self._confirmed, bool(self._failed), unsettled)

    @property
    def in_flight(self) -> int:
        return len(self._order)

    def clear(self) -> None:
        """After a failure has settled: forget everything in flight (it will be resent)."""
        with self._lock:
            self._order.clear()
            self._done.clear()
            self._failed.clear()


class Uplink(abc.ABC):
    """Where outbox records go. Driven by one runner thread; callbacks may come from others.

    A record is confirmed when the far side has taken responsibility for it (PUBACK from
    the broker, a delivery report with acks=all); only then may the outbox drop it.
    """

    name = "uplink"

    def __init__(self) -> None:
        self.tracker = DeliveryTracker()

    @abc.abstractmethod
    def start(self) -> None:
        """Begin connecting; returns at once."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while sending makes sense (connected, no fatal error)."""

    @abc.abstractmethod
    def send(self, record: OutboxRecord) -> None:
        """Hand one record over without blocking.

        :raises UplinkBusy: the library's buffers are full; try again later.
        :raises ValueError: the record can never be sent (e.g. a key that makes no topic).
        """

    def poll(self) -> Progress:
        """Serve the library's callbacks (without blocking) and report progress."""
        return self.tracker.progress()

    def reset(self) -> None:
        """After a failed delivery has settled: forget in-flight state before the resend."""
        self.tracker.clear()

    @abc.abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Give in-flight records up to `timeout` s to be confirmed, then disconnect (blocks)."""

    @property
    def in_flight(self) -> int:
        return self.tracker.in_flight


class MqttUplink(Uplink):
    """QoS1 bridge to a second MQTT broker: topic `edgeline/v1/uplink/{site}/{machine}`.

    :param host: the upstream broker.
    :param port: its port.
    :param client_id: stable per gateway (the broker logs it).
    :param username: with `password`, for a broker that requires them.
    :param tls_ca: CA file; enables TLS (with `tls_cert`/`tls_key` for a client certificate).
    :param max_inflight: paho's own limit on QoS1 publishes awaiting PUBACK. 0 (default)
        leaves the bound to the runner's `max_in_flight` window: paho rescans its in-flight
        messages on every PUBACK when it enforces a limit (~2x slower at 100).
    :param reconnect_max_s: paho's reconnect backoff ceiling (it starts at 1 s).
    """

    name = "mqtt"

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str = "edgeline-uplink",
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        keepalive: int = 30,
        max_inflight: int = 0,
        reconnect_max_s: int = 4,
    ) -> None:
        super().__init__()
        if not 0 < port < 65536:
            raise ValueError(f"uplink MQTT port {port} is not a TCP port")
        self.host, self.port = host, port
        self.keepalive = keepalive
        self._connected = threading.Event()
        self._replaying = False  # reconnected, old publishes not all confirmed yet
        self.connects = 0
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True
        )
        if username:
            self._client.username_pw_set(username, password)
        if tls_ca:
            self._client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)  # the runner bounds what is in flight
        self._client.reconnect_delay_set(1, reconnect_max_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()

    @property
    def ready(self) -> bool:
        if not self._connected.is_set():
            return False
        if self._replaying:
            # paho calls on_connect *before* it resends what was unacknowledged at the
            # disconnect: a new publish now could overtake an old one. Wait for all of them.
            if self.tracker.progress().unsettled:
                return False
            self._replaying = False
        return True

    def send(self, record: OutboxRecord) -> None:
        topic = uplink_topic(record.key)
        # Published while the connection drops, a QoS1 message waits in paho and goes out
        # after the reconnect (rc NO_CONN); anything else means paho did not take it.
        info = self._client.publish(topic, record.payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise UplinkBusy(f"paho refused a publish to {topic}: {mqtt.error_string(info.rc)}")
        self.tracker.sent(record.id, info.mid)

    def close(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready and self.poll().unsettled and time.monotonic() < deadline:
            time.sleep(0.01)
        self._client.disconnect()
        self._client.loop_stop()

    # paho's network thread
    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("uplink broker %s:%d refused the connection: %s", self.host, self.port, rc)
            return
        self.connects += 1
        self._connected.set()
        log.info("uplink connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._replaying = True
        self._connected.clear()
        if rc != 0:
            log.warning("uplink lost broker %s:%d (%s); paho reconnects", self.host, self.port, rc)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        self.tracker.done(mid)


# -- configuration ---------------------------------------------------------------------------
@dataclass
class UplinkConfig:
    """The `uplink` section of a gateway configuration."""

    kind: str = "none"  # "none", "mqtt" or "kafka"
    host: str = "127.0.0.1"  # mqtt
    port: int = 1883
    client_id: str = "edgeline-uplink"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    bootstrap_servers: str = ""  # kafka
    topic: str = "edgeline-uplink"
    kafka_config: dict[str, Any] = field(default_factory=dict)  # librdkafka properties
    max_bytes: int = 256 * 1024 * 1024  # outbox bounds
    max_age_s: float = 7 * 24 * 3600.0


def build_uplink(cfg: UplinkConfig) -> Uplink | None:
    """The uplink a configuration names, not yet started; None for kind "none".

    :raises ValueError: for an unknown kind.
    :raises UplinkError: for kind "kafka" without the `kafka` extra installed.
    """
    if cfg.kind == "none":
        return None
    if cfg.kind == "mqtt":
        return MqttUplink(
            cfg.host,
            cfg.port,
            client_id=cfg.client_id,
            username=cfg.username,
            password=cfg.password,
            tls_ca=cfg.tls_ca,
            tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
        )
    if cfg.kind == "kafka":
        from edgeline.host.uplink_kafka import KafkaUplink

        if not cfg.bootstrap_servers and "test.mock.num.brokers" not in cfg.kafka_config:
            raise ValueError("uplink kind 'kafka' needs bootstrap_servers (host:port,...)")
        return KafkaUplink(cfg.bootstrap_servers, cfg.topic, config=cfg.kafka_config)
    raise ValueError(f"uplink kind {cfg.kind!r} is not one of none, mqtt, kafka")
