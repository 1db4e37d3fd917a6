"""The whole path, end to end, against both brokers: virtual nodes (real firmware under the
MicroPython unix port) -> MQTT -> gateway -> OPC-UA server -> a subscribed OPC-UA client."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import cbor2
import pytest
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.demo import Demo, DemoOptions
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.ports import free_tcp_port

from wire_messages import Collector, birth, disconnect, event, publisher


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


def test_malformed_payload_does_not_stop_the_gateway(broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgeline.gateway")

    async def scenario() -> tuple[Gateway, Collector]:
        gw = Gateway(
            GatewayConfig(
                broker_host=broker.host, broker_port=broker.port, site="s1", opcua_port=free_tcp_port()
            )
        )
        await gw.start()
        dead = Collector(broker.host, broker.port, "t-dead", gw.dead_topic)
        pub = publisher(broker.host, broker.port, "t-pub")
        try:
            await asyncio.sleep(0.5)  # subscriptions in place
            base = "edgeline/v1/s1/n1"
            for topic, payload in [
                (f"{base}/birth", birth("n1")),
                (f"{base}/evt", event("n1", 1, t_wall_us=time.time_ns() // 1000, t_mono_us=1)),
                (f"{base}/evt", b"\xff\xfe not cbor"),
                (f"{base}/evt", event("n1", 2, t_wall_us=time.time_ns() // 1000, t_mono_us=1)),
            ]:
                pub.publish(topic, payload, qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while gw.stats.accepted < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(dead.arrived.wait, 5)
        finally:
            disconnect(pub)
            dead.close()
            await gw.stop()
        return gw, dead

    gw, dead = asyncio.run(scenario())
    assert gw.stats.malformed == 1
    assert gw.stats.accepted == 2, "the good event after the bad one must still arrive"
    assert gw.state.nodes["n1"].last_seq == 2
    assert dead.messages, "the bad payload must be published on the dead-letter topic"
    letter = cbor2.loads(dead.messages[0])
    assert letter[w.K_TOPIC] == "edgeline/v1/s1/n1/evt"
    assert "not valid CBOR" in letter[w.K_REASON]
    assert letter[w.K_PAYLOAD] == b"\xff\xfe not cbor"
    logged = [r.getMessage() for r in caplog.records if r.name == "edgeline.gateway"]
    assert any("edgeline/v1/s1/n1/evt" in m and "not valid CBOR" in m for m in logged), logged
