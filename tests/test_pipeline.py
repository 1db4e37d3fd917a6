"""The whole path, end to end, against both brokers: virtual nodes (real firmware under the
MicroPython unix port) -> MQTT -> gateway -> OPC-UA server -> a subscribed OPC-UA client."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.demo import Demo, DemoOptions
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.ports import free_tcp_port
from paho.mqtt.enums import CallbackAPIVersion


@pytest.mark.micropython
def test_demo_path_end_to_end(broker: Any) -> None:
    opts = DemoOptions(duration=16, nodes=3, broker=broker.url, window_ms=200, live=False)
    summary = asyncio.run(Demo(opts).run())
    failed = [k for k, ok in summary["checks"].items() if not ok]
    assert not failed, (failed, summary)
    ev = summary["events"]
    assert ev["lost"] == 0 and ev["duplicated"] == 0
    assert all(n["sent"] > 20 for n in summary["per_node"])
    fault_machine = summary["fault"]["machine"]
    assert summary["anomalies"]["by_machine"].get(fault_machine, 0) > 0
    assert set(summary["anomalies"]["by_machine"]) == {fault_machine}
    assert summary["opcua"]["events_seen"] > 0
    assert summary["opcua"]["trace_ids_matched"] == summary["opcua"]["events_seen"]
    assert summary["latency_ms"]["window_to_opcua_client"]["n"] > 0


def _birth(node: str) -> bytes:
    return cbor2.dumps(
        {
            w.K_V: 1,
            w.K_KIND: w.KIND_BIRTH,
            w.K_NODE: node,
            w.K_BOOT: 1,
            w.K_FW: "test",
            w.K_MODEL_SHA: None,
            w.K_SENSORS: [["vibration", "g", ["mean", "rms"]]],
            w.K_SITE: "s1",
            w.K_LINE: "l1",
            w.K_MACHINE: "m1",
        }
    )


def _event(node: str, seq: int) -> bytes:
    return cbor2.dumps(
        {
            w.K_V: 1,
            w.K_KIND: w.KIND_EVT,
            w.K_NODE: node,
            w.K_BOOT: 1,
            w.K_SEQ: seq,
            w.K_TRACE: bytes(range(1, 17)),
            w.K_SPAN: bytes(range(1, 9)),
            w.K_T_WALL: time.time_ns() // 1000,
            w.K_T_MONO: 1,
            w.K_FEATURES: {"vibration": [0.0, 1.0]},
            w.K_SCORES: {"vibration": 0.5},
            w.K_ANOMALY: False,
            w.K_CAUSES: [],
            w.K_DETECTOR: "spc",
        }
    )


def test_malformed_payload_does_not_stop_the_gateway(broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgeline.gateway")
    dead: list[bytes] = []
    got_dead = threading.Event()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        dead.append(bytes(msg.payload))
        got_dead.set()

    async def scenario() -> Gateway:
        gw = Gateway(
            GatewayConfig(
                broker_host=broker.host, broker_port=broker.port, site="s1", opcua_port=free_tcp_port()
            )
        )
        await gw.start()
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-dead")
        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe(gw.dead_topic, qos=1)
        sub.loop_start()
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-pub")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            await asyncio.sleep(0.5)  # subscriptions in place
            base = "edgeline/v1/s1/n1"
            for topic, payload in [
                (f"{base}/birth", _birth("n1")),
                (f"{base}/evt", _event("n1", 1)),
                (f"{base}/evt", b"\xff\xfe not cbor"),
                (f"{base}/evt", _event("n1", 2)),
            ]:
                pub.publish(topic, payload, qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while gw.stats.accepted < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(got_dead.wait, 5)
        finally:
            pub.loop_stop()
            pub.disconnect()
            sub.loop_stop()
            sub.disconnect()
            await gw.stop()
        return gw

    gw = asyncio.run(scenario())
    assert gw.stats.malformed == 1
    assert gw.stats.accepted == 2, "the good event after the bad one must still arrive"
    assert gw.state.nodes["n1"].last_seq == 2
    assert dead, "the bad payload must be published on the dead-letter topic"
    letter = cbor2.loads(dead[0])
    assert letter[w.K_TOPIC] == "edgeline/v1/s1/n1/evt"
    assert "not valid CBOR" in letter[w.K_REASON]
    assert letter[w.K_PAYLOAD] == b"\xff\xfe not cbor"
    logged = [r.getMessage() for r in caplog.records if r.name == "edgeline.gateway"]
    assert any("edgeline/v1/s1/n1/evt" in m and "not valid CBOR" in m for m in logged), logged
