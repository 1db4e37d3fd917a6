"""Gateway observability: Prometheus metrics scraped over HTTP, JSON log lines, and
OpenTelemetry spans that continue the node's trace (with and without the SDK installed)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from edgeline.host import wire
from edgeline.host.logging_setup import JsonFormatter, setup_logging
from edgeline.host.metrics import DEAD_LETTER_REASONS, GatewayMetrics, MetricsServer, reason_label
from edgeline.host.tracing import EventTracer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SPAN = bytes.fromhex("b7ad6b7169203331")


def event(**kw: Any) -> wire.Event:
    args: dict[str, Any] = dict(
        kind=1, node="node-1", boot=2, seq=7, trace_id=TRACE, span_id=SPAN, t_wall_us=0, t_mono_us=0
    )
    return wire.Event(**(args | kw))


# -- metrics -----------------------------------------------------------------------------------
@pytest.fixture
def served() -> Iterator[tuple[GatewayMetrics, MetricsServer]]:
    m = GatewayMetrics()
    server = m.start_http("127.0.0.1", 0)
    yield m, server
    server.close()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scrape_reports_what_the_gateway_counted(served: tuple[GatewayMetrics, MetricsServer]) -> None:
    m, server = served
    for kind in ["evt"] * 5 + ["tel", "birth", "death", "weird"]:
        m.on_message(kind)
    m.on_duplicate()
    m.on_duplicate(2)
    assert m.on_dead_letter("not valid CBOR: premature end of stream") == "not_cbor"
    m.on_dead_letter("payload of 20000 bytes exceeds the 16384-byte limit")
    m.on_dead_letter("something nobody foresaw")
    m.observe_inference(0.0003, 64)
    m.observe_inference(0.002, 512)
    m.observe_opcua_publish(0.004)
    with m.time_opcua_publish():
        pass
    m.set_outbox_depth(17)
    online = [3]
    m.track_nodes_online(lambda: online[0])
    s = scrape(server)
    p = "edgeline_gateway"
    assert s[(f"{p}_messages_total", (("kind", "evt"),))] == 5
    assert s[(f"{p}_messages_total", (("kind", "tel"),))] == 1
    assert s[(f"{p}_messages_total", (("kind", "other"),))] == 1
    assert s[(f"{p}_duplicates_total", ())] == 3
    assert s[(f"{p}_dead_letters_total", (("reason", "not_cbor"),))] == 1
    assert s[(f"{p}_dead_letters_total", (("reason", "oversize"),))] == 1
    assert s[(f"{p}_dead_letters_total", (("reason", "other"),))] == 1
    assert s[(f"{p}_dead_letters_total", (("reason", "schema_version"),))] == 0  # present from the start
    assert s[(f"{p}_inference_seconds_count", ())] == 2
    assert s[(f"{p}_inference_seconds_sum", ())] == pytest.approx(0.0023)
    assert s[(f"{p}_inference_seconds_bucket", (("le", "0.0005"),))] == 1
    assert s[(f"{p}_inference_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[(f"{p}_inference_rows_total", ())] == 576
    assert s[(f"{p}_inference_batch_size_bucket", (("le", "64.0"),))] == 1
    assert s[(f"{p}_opcua_publish_seconds_count", ())] == 2
    assert s[(f"{p}_opcua_publish_seconds_bucket", (("le", "0.005"),))] == 2
    assert s[(f"{p}_outbox_depth", ())] == 17
    assert s[(f"{p}_nodes_online", ())] == 3
    online[0] = 1
    assert scrape(server)[(f"{p}_nodes_online", ())] == 1  # read at scrape time


def test_own_registry_not_the_global_one() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()  # two would collide on one registry
    a.on_message("evt")
    assert b'edgeline_gateway_messages_total{kind="evt"} 0.0' in b.render()
    assert REGISTRY.get_sample_value("edgeline_gateway_messages_total", {"kind": "evt"}) is None


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("payload of 20000 bytes exceeds the 16384-byte limit", "oversize"),
        ("not valid CBOR: premature end", "not_cbor"),
        ("payload is a CBOR list, not a map", "not_map"),
        ("schema version 2 is not supported (this gateway speaks 1)", "schema_version"),
        ("topic 'a/b' is not edgeline/v1/<site>/<node>/<kind>", "bad_topic"),
        ("kind 2 does not match topic kind 'evt'", "identity_mismatch"),
        ("node id 'n2' does not match the topic's 'n1'", "identity_mismatch"),
        ("missing key 4 (seq)", "missing_key"),
        ("key 4 (seq) has type str", "wrong_type"),
        ("key 4 (seq) = -1 is out of range 0..18446744073709551615", "out_of_range"),
        ("seq must start at 1", "out_of_range"),
        ("feature of vibration must be a finite number, got nan", "non_finite"),
        ("trace id must be 16 bytes and not all zero", "bad_trace"),
        ("more than 64 sensors in one event", "too_many"),
        ("unknown node 'n9': no birth seen", "unknown_node"),
        ("key 2 (node id) = 'a b' is not a valid name", "bad_name"),
        ("a reason from the future", "other"),
    ],
)
def test_dead_letter_reasons_are_bounded(reason: str, label: str) -> None:
    assert reason_label(reason) == label
    assert label in DEAD_LETTER_REASONS


def test_gateway_wire_errors_map_to_known_labels() -> None:
    # Reasons produced by the real validator, not typed by hand.
    import cbor2

    topic = wire.parse_topic("edgeline/v1/s/n1/evt")
    labels = []
    for payload in [b"\xff", cbor2.dumps([1]), cbor2.dumps({0: 9}), cbor2.dumps({0: 1, 1: 1, 2: "n1"})]:
        with pytest.raises(wire.WireError) as e:
            wire.parse_event(wire.decode(payload), topic)
        labels.append(reason_label(str(e.value)))
    assert labels == ["not_cbor", "not_map", "schema_version", "missing_key"]


def test_metrics_port_in_use_names_the_address(served: tuple[GatewayMetrics, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
        GatewayMetrics().start_http("127.0.0.1", server.port)


# -- JSON logs -------------------------------------------------------------------------------
def test_json_log_lines_carry_trace_id_and_extras() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", stream=buf, logger="edgeline.test-json")
    setup_logging("DEBUG", stream=buf, logger="edgeline.test-json")  # twice: still one handler
    log = logging.getLogger("edgeline.test-json.gateway")
    log.info("anomaly on %s", "s/l/m", extra={"trace_id": TRACE, "node": "node-1", "seq": 7})
    log.warning("no trace here", extra={"obj": object()})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(x) for x in lines)
    assert first["msg"] == "anomaly on s/l/m" and first["level"] == "INFO"
    assert first["logger"] == "edgeline.test-json.gateway"
    assert first["trace_id"] == TRACE.hex() and first["node"] == "node-1" and first["seq"] == 7
    assert first["ts"].endswith("Z") and len(first["ts"]) == 24
    assert "trace_id" not in second and second["obj"].startswith("<object object")
    assert "ValueError: boom" in third["exc"]


def test_plain_text_logging_option() -> None:
    buf = io.StringIO()
    setup_logging("INFO", json_lines=False, stream=buf, logger="edgeline.test-plain")
    logging.getLogger("edgeline.test-plain").info("hello")
    assert buf.getvalue().rstrip().endswith("INFO edgeline.test-plain: hello")


# -- OpenTelemetry -----------------------------------------------------------------------------
def test_span_continues_the_node_trace() -> None:
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        pytest.fail("opentelemetry-sdk is not installed: pip install -e '.[dev]' (the dev extra has it)")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = EventTracer(provider)
    assert tracer.enabled
    buf = io.StringIO()
    setup_logging("INFO", stream=buf, logger="edgeline.test-otel")
    with tracer.event_span(event(anomaly=True), machine="s/l/m") as span:
        assert span is not None
        logging.getLogger("edgeline.test-otel").info("inside the span")  # ids from the current span
    [done] = exporter.get_finished_spans()
    assert done.context.trace_id == int.from_bytes(TRACE, "big")
    assert done.parent is not None and done.parent.span_id == int.from_bytes(SPAN, "big")
    assert done.parent.is_remote and done.context.span_id != done.parent.span_id
    assert done.kind == SpanKind.CONSUMER
    assert done.attributes is not None
    assert done.attributes["edgeline.node"] == "node-1" and done.attributes["edgeline.seq"] == 7
    assert done.attributes["edgeline.machine"] == "s/l/m" and done.attributes["edgeline.anomaly"] is True
    line = json.loads(buf.getvalue())
    assert line["trace_id"] == TRACE.hex() and line["span_id"] == f"{done.context.span_id:016x}"


def test_disabled_tracer_makes_no_span() -> None:
    tracer = EventTracer(enabled=False)
    assert not tracer.enabled
    with tracer.event_span(event()) as span:
        assert span is None


def test_without_the_sdk_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if opentelemetry were not installed: importing it fails.
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    tracer = EventTracer()
    assert not tracer.enabled
    with tracer.event_span(event()) as span:
        assert span is None


def test_importing_the_gateway_observability_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, edgeline.host.tracing, edgeline.host.metrics, edgeline.host.logging_setup;"
        "print('opentelemetry' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_formatter_takes_text_ids_and_keeps_one_line() -> None:
    rec = logging.LogRecord("edgeline.x", logging.INFO, __file__, 1, "two\nlines", (), None)
    rec.trace_id = TRACE.hex()
    rec.span_id = SPAN
    out = JsonFormatter().format(rec)
    assert "\n" not in out
    assert json.loads(out) | {"ts": ""} == {
        "ts": "",
        "level": "INFO",
        "logger": "edgeline.x",
        "msg": "two\nlines",
        "trace_id": TRACE.hex(),
        "span_id": SPAN.hex(),
    }
