"""Host code. The gateway's Prometheus metrics: its own registry, served over HTTP.

    metrics = GatewayMetrics()
    server = metrics.start_http("127.0.0.1", 9464)    # GET /metrics, Prometheus text format
    metrics.on_message("evt"); metrics.on_dead_letter("not valid CBOR: ...")
    with metrics.time_opcua_publish():
        await opcua.update(...)
    server.close()

Every label takes values from a fixed set, so a misbehaving node cannot grow the series
count: message kinds outside evt/tel/birth/death count as `other`, and a dead letter's free
text reason is reduced to one of `DEAD_LETTER_REASONS` by `reason_label`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

KINDS = ("evt", "tel", "birth", "death", "other")
# What a dead letter's reason text is reduced to, first match wins (texts from host/wire.py).
_REASON_RULES: tuple[tuple[str, str], ...] = (
    ("exceeds the", "oversize"),
    ("not valid cbor", "not_cbor"),
    (", not a map", "not_map"),
    ("schema version", "schema_version"),
    ("unknown node", "unknown_node"),
    ("does not match", "identity_mismatch"),
    ("missing key", "missing_key"),
    ("has type", "wrong_type"),
    ("out of range", "out_of_range"),
    ("seq must", "out_of_range"),
    ("finite number", "non_finite"),
    ("trace id", "bad_trace"),
    ("span id", "bad_trace"),
    ("more than", "too_many"),
    ("at most", "too_many"),
    ("1..", "too_many"),
    ("topic ", "bad_topic"),
    ("valid name", "bad_name"),
)
DEAD_LETTER_REASONS = (*dict.fromkeys(label for _, label in _REASON_RULES), "other")

# Seconds. A batched inference of a small model takes tens of microseconds; a slow OPC-UA
# write milliseconds: buckets from 10 us to 1 s.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def reason_label(reason: str) -> str:
    """The bounded label for a dead letter's free-text reason."""
    text = reason.lower()
    for needle, label in _REASON_RULES:
        if needle in text:
            return label
    return "other"


@dataclass
class MetricsServer:
    """The HTTP endpoint serving one registry; close() stops it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class GatewayMetrics:
    """The gateway's metrics on a registry of their own (never prometheus_client's global one,
    so two gateways in one process, or a test, do not collide).

    :param registry: a registry to register into; a new one by default.
    :param prefix: metric name prefix.
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "edgeline_gateway") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.messages = Counter(f"{p}_messages", "MQTT messages taken in, by kind", ["kind"], registry=r)
        self.duplicates = Counter(f"{p}_duplicates", "Events dropped by dedupe: seen before", registry=r)
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Messages sent to the dead-letter topic, by reason", ["reason"], registry=r
        )
        self.inference_seconds = Histogram(
            f"{p}_inference_seconds", "Gateway model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_batch = Histogram(
            f"{p}_inference_batch_size", "Rows per gateway model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_rows = Counter(f"{p}_inference_rows", "Rows scored by the gateway model", registry=r)
        self.opcua_publish_seconds = Histogram(
            f"{p}_opcua_publish_seconds",
            "Time to write one event's values (and any anomaly event) to the OPC-UA server",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_depth = Gauge(f"{p}_outbox_depth", "Records waiting in the outbox", registry=r)
        self.nodes_online = Gauge(f"{p}_nodes_online", "Nodes online (birth seen, no death)", registry=r)
        for kind in KINDS:  # every series exists from the start, at 0
            self.messages.labels(kind)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)

    # -- what the gateway calls -------------------------------------------------------------
    def on_message(self, kind: str) -> None:
        """One MQTT message taken in; `kind` is the topic's last level (evt, tel, birth, death)."""
        self.messages.labels(kind if kind in KINDS else "other").inc()

    def on_duplicate(self, n: int = 1) -> None:
        self.duplicates.inc(n)

    def on_dead_letter(self, reason: str) -> str:
        """Count a refused message; returns the label its reason was counted under."""
        label = reason_label(reason)
        self.dead_letters.labels(label).inc()
        return label

    def observe_inference(self, seconds: float, batch: int) -> None:
        """One gateway-model inference call over `batch` rows that took `seconds`."""
        self.inference_seconds.observe(seconds)
        self.inference_batch.observe(batch)
        self.inference_rows.inc(batch)

    def observe_opcua_publish(self, seconds: float) -> None:
        self.opcua_publish_seconds.observe(seconds)

    @contextmanager
    def time_opcua_publish(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.opcua_publish_seconds.observe(time.perf_counter() - t0)

    def set_outbox_depth(self, n: int) -> None:
        self.outbox_depth.set(n)

    def set_nodes_online(self, n: int) -> None:
        self.nodes_online.set(n)

    def track_nodes_online(self, count: Callable[[], int]) -> None:
        """Read the online count at every scrape instead (e.g. from the gateway's StateStore)."""
        self.nodes_online.set_function(lambda: float(count()))

    # -- exposition -------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve GET /metrics from a daemon thread. port 0 picks a free one (see .port).

        Loopback by default: exposing metrics beyond the machine is an explicit choice.
        :raises OSError: the address cannot be bound (the message names it).
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
        return MetricsServer(host, server.server_port, server, thread)
