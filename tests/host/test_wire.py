"""Gateway-side validation of the wire contract: good messages parse, bad ones say why."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host import wire

from wire_messages import birth_map, event_map

TOPIC = wire.parse_topic("edgeline/v1/plant-a/node-1/evt")


def event() -> dict[int, Any]:
    return event_map(
        "node-1",
        7,
        boot=3,
        t_wall_us=1_700_000_000_000_000,
        t_mono_us=12345,
        features={"vibration": [0.1, 0.2, 0.3, 0.9, 3.0]},
        scores={"vibration": 4.2},
        anomaly=True,
        causes=["vibration"],
    )


def test_good_event_parses() -> None:
    ev = wire.parse_event(wire.decode(cbor2.dumps(event())), TOPIC)
    assert (ev.node, ev.boot, ev.seq) == ("node-1", 3, 7)
    assert ev.trace_hex == bytes(range(1, 17)).hex()
    assert ev.anomaly and ev.causes == ["vibration"]


def test_unknown_keys_are_ignored() -> None:
    ev = wire.parse_event(wire.decode(cbor2.dumps(event() | {99: "future"})), TOPIC)
    assert ev.seq == 7


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ({w.K_V: 2}, "schema version"),
        ({w.K_KIND: w.KIND_TEL}, "does not match topic"),
        ({w.K_NODE: "node-2"}, "does not match the topic"),
        ({w.K_SEQ: -1}, "out of range"),
        ({w.K_SEQ: 0}, "seq must start at 1"),
        ({w.K_SEQ: "7"}, "type str"),
        ({w.K_TRACE: bytes(16)}, "trace id"),
        ({w.K_TRACE: b"short"}, "trace id"),
        ({w.K_SPAN: bytes(9)}, "span id"),
        ({w.K_ANOMALY: 1}, "anomaly flag"),
        ({w.K_FEATURES: {"vibration": [float("nan")]}}, "finite"),
        ({w.K_FEATURES: {"bad/name": [1.0]}}, "features of sensor"),
        ({w.K_CAUSES: ["temperature"]}, "causes"),
        ({w.K_SCORES: {"vibration": "high"}}, "finite"),
    ],
)
def test_bad_event_refused_with_reason(mutate: dict[int, Any], reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.parse_event(wire.decode(cbor2.dumps(event() | mutate)), TOPIC)


def test_missing_key_named() -> None:
    m = event()
    del m[w.K_SEQ]
    with pytest.raises(wire.WireError, match="missing key 4"):
        wire.parse_event(m, TOPIC)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not valid CBOR"),
        (b"\xff\x00", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "not a map"),
        (b"\xa1" * 5000 + b"\x00", "not valid CBOR"),
        (b"\x00" * (wire.MAX_PAYLOAD + 1), "exceeds"),
    ],
)
def test_bad_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(payload)


@pytest.mark.parametrize(
    "topic",
    [
        "edgeline/v1/plant-a/node-1",
        "edgeline/v2/plant-a/node-1/evt",
        "edgeline/v1/plant-a/node-1/cmd",
        "edgeline/v1/plant a/node-1/evt",
        "edgeline/v1/plant-a/_gateway/evt",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_topic(topic)


def test_birth_roundtrip() -> None:
    t = wire.parse_topic("edgeline/v1/plant-a/node-1/birth")
    m = birth_map(
        "node-1", "pump-01", site="plant-a", line="line-1", fw="0.1.0", drops={0: 0}, window=[1000, 256]
    )
    b = wire.parse_birth(wire.decode(cbor2.dumps(m)), t)
    assert (b.site, b.line, b.machine) == ("plant-a", "line-1", "pump-01")
    m[w.K_SITE] = "plant-b"
    with pytest.raises(wire.WireError, match="site"):
        wire.parse_birth(m, t)
