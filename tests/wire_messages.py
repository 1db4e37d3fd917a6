"""The messages a node (and the gateway) put on the wire, built for tests from the wire
contract's own numbers (firmware/edgeline_node/wire.py; docs/wire-format.md is their prose),
and paho clients that publish and collect them on a real broker.

Import as `from wire_messages import ...` (tests/conftest.py puts this folder on the path).
Each builder's defaults describe one node: `s1/l1/m1`, boot 1, a single `vibration` sensor
in g with features `mean` and `rms`, scored by the control chart (`spc`); a test passes only
what it means to vary. `*_map` builders return the map (to mutate or compare), the others its
CBOR encoding, key order as the node writes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from edgeline.firmware.edgeline_node import wire as w
from paho.mqtt.enums import CallbackAPIVersion

VIBRATION: tuple[tuple[str, str, Sequence[str]], ...] = (("vibration", "g", ("mean", "rms")),)
TRACE = bytes(range(1, 17))  # W3C trace id: 16 bytes, not all zero
SPAN = bytes(range(1, 9))  # W3C span id: 8 bytes


def _header(kind: int, node: str, boot: int) -> dict[int, Any]:
    return {w.K_V: w.SCHEMA_VERSION, w.K_KIND: kind, w.K_NODE: node, w.K_BOOT: boot}


def birth_map(
    node: str,
    machine: str = "m1",
    *,
    site: str = "s1",
    line: str = "l1",
    boot: int = 1,
    fw: str = "test",
    model_sha: bytes | None = None,
    sensors: Iterable[tuple[str, str, Sequence[str]]] = VIBRATION,
    drops: dict[int, int] | None = None,
    window: list[int] | None = None,
) -> dict[int, Any]:
    """A node's birth certificate; `sensors` as (name, unit, feature names). Drop counters and
    the window ([rate Hz, samples]) only when given, after the rest."""
    m = _header(w.KIND_BIRTH, node, boot) | {
        w.K_FW: fw,
        w.K_MODEL_SHA: model_sha,
        w.K_SENSORS: [[name, unit, list(features)] for name, unit, features in sensors],
        w.K_SITE: site,
        w.K_LINE: line,
        w.K_MACHINE: machine,
    }
    if drops is not None:
        m[w.K_DROPS] = drops
    if window is not None:
        m[w.K_WINDOW] = window
    return m


def birth(node: str, machine: str = "m1", **kw: Any) -> bytes:
    """`birth_map`, encoded."""
    return cbor2.dumps(birth_map(node, machine, **kw))


def event_map(
    node: str,
    seq: int,
    *,
    boot: int = 1,
    trace: bytes = TRACE,
    span: bytes = SPAN,
    t_wall_us: int = 0,
    t_mono_us: int = 0,
    features: dict[str, list[float]] | None = None,
    scores: dict[str, float] | None = None,
    anomaly: bool = False,
    causes: list[str] | None = None,
    detector: str = "spc",
) -> dict[int, Any]:
    """One scored window (evt). Unless given: features {"vibration": [0.0, 1.0]}, scores
    {"vibration": 0.5}, no causes."""
    return _header(w.KIND_EVT, node, boot) | {
        w.K_SEQ: seq,
        w.K_TRACE: trace,
        w.K_SPAN: span,
        w.K_T_WALL: t_wall_us,
        w.K_T_MONO: t_mono_us,
        w.K_FEATURES: {"vibration": [0.0, 1.0]} if features is None else features,
        w.K_SCORES: {"vibration": 0.5} if scores is None else scores,
        w.K_ANOMALY: anomaly,
        w.K_CAUSES: [] if causes is None else causes,
        w.K_DETECTOR: detector,
    }


def event(node: str, seq: int, **kw: Any) -> bytes:
    """`event_map`, encoded."""
    return cbor2.dumps(event_map(node, seq, **kw))


def death(node: str, boot: int = 1) -> bytes:
    """A node's death (its last will, or published when it stops cleanly)."""
    return cbor2.dumps(_header(w.KIND_DEATH, node, boot))


def gateway_online() -> bytes:
    """The gateway's retained state message saying it is online (published under its reserved
    node id on `w.topic(site, w.GATEWAY_NODE, w.KIND_STATE)`)."""
    return cbor2.dumps(
        {w.K_V: w.SCHEMA_VERSION, w.K_KIND: w.KIND_STATE, w.K_NODE: w.GATEWAY_NODE, w.K_ONLINE: True}
    )


# -- on a broker ---------------------------------------------------------------------------------
def publisher(host: str, port: int, client_id: str, *, max_inflight: int | None = None) -> mqtt.Client:
    """A connected paho client with its network loop running; `disconnect` it when done."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    if max_inflight is not None:
        c.max_inflight_messages_set(max_inflight)
    c.connect(host, port)
    c.loop_start()
    return c


def disconnect(client: mqtt.Client) -> None:
    client.loop_stop()
    client.disconnect()


class Collector:
    """A paho client subscribed (QoS 1) to `topic` that keeps every payload it receives, passed
    through `decode` (default: the bytes as they came), in `messages`; read that under `lock`
    while messages may still arrive. `arrived` is set by each one."""

    def __init__(
        self, host: str, port: int, client_id: str, topic: str, decode: Callable[[bytes], Any] = bytes
    ) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self._decode = decode
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        item = self._decode(bytes(msg.payload))
        with self.lock:
            self.messages.append(item)
        self.arrived.set()

    def close(self) -> None:
        disconnect(self.client)
