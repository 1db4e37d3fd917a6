"""A flood of 10,000 malformed payloads: the gateway keeps serving, its memory stays bounded,
and every one is counted and published on the dead-letter topic. Runs on both brokers."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import edgeline.host.gateway as gateway_module
import paho.mqtt.client as mqtt
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.ports import free_tcp_port
from paho.mqtt.enums import CallbackAPIVersion

N_BAD = 10_000


def _bad_payloads(n: int, seed: int = 5) -> list[bytes]:
    """Every way a payload can be wrong, cycled: not CBOR, not a map, wrong version, wrong
    kind, wrong node, missing keys, wrong types, huge, deep, NaN, bad trace id."""
    rng = random.Random(seed)
    good = {
        w.K_V: 1,
        w.K_KIND: w.KIND_EVT,
        w.K_NODE: "n1",
        w.K_BOOT: 1,
        w.K_SEQ: 1,
        w.K_TRACE: os.urandom(16),
        w.K_SPAN: os.urandom(8),
        w.K_T_WALL: 0,
        w.K_T_MONO: 0,
        w.K_FEATURES: {"vibration": [1.0]},
        w.K_SCORES: {"vibration": 0.1},
        w.K_ANOMALY: False,
        w.K_CAUSES: [],
        w.K_DETECTOR: "spc",
    }
    makers = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) + b"\xff",
        lambda: cbor2.dumps([1, 2, 3]),
        lambda: cbor2.dumps(good | {w.K_V: 9}),
        lambda: cbor2.dumps(good | {w.K_KIND: w.KIND_TEL}),
        lambda: cbor2.dumps(good | {w.K_NODE: "other"}),
        lambda: cbor2.dumps({k: v for k, v in good.items() if k != w.K_SEQ}),
        lambda: cbor2.dumps(good | {w.K_SEQ: "1"}),
        lambda: b"\x5a\xff\xff\xff\xff",  # declares a 4 GiB byte string
        lambda: b"\x81" * 20_000,  # nesting far past any limit
        lambda: cbor2.dumps(good | {w.K_FEATURES: {"vibration": [float("nan")]}}),
        lambda: cbor2.dumps(good | {w.K_TRACE: b"\x00" * 16}),
        lambda: b"\x00" * 20_000,  # over the size limit
    ]
    return [makers[i % len(makers)]() for i in range(n)]


HOST_DIR = str(Path(gateway_module.__file__).resolve().parent)


def _gateway_bytes() -> int:
    """Memory held by allocations made in the gateway's own code (host/), not by the test's
    publisher and subscriber or by an in-process broker (amqtt keeps the dead letters it
    queues for the subscriber), which share this process."""
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, HOST_DIR + "/*")])
    return sum(stat.size for stat in snap.statistics("filename"))


def test_flood_of_malformed_payloads(broker: Any) -> None:
    dead: list[bytes] = []
    dead_lock = threading.Lock()

    def on_dead(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with dead_lock:
            dead.append(bytes(msg.payload))

    async def scenario() -> tuple[Gateway, int, int]:
        gw = Gateway(
            GatewayConfig(
                broker_host=broker.host, broker_port=broker.port, site="s1", opcua_port=free_tcp_port()
            )
        )
        await gw.start()
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-dead")
        sub.on_message = on_dead
        sub.connect(broker.host, broker.port)
        sub.subscribe(gw.dead_topic, qos=1)
        sub.loop_start()
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-flood")
        pub.max_inflight_messages_set(100)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        tracemalloc.start()
        try:
            await asyncio.sleep(0.5)
            birth = cbor2.dumps(
                {
                    w.K_V: 1,
                    w.K_KIND: w.KIND_BIRTH,
                    w.K_NODE: "n1",
                    w.K_BOOT: 1,
                    w.K_FW: "t",
                    w.K_MODEL_SHA: None,
                    w.K_SENSORS: [["vibration", "g", ["mean"]]],
                    w.K_SITE: "s1",
                    w.K_LINE: "l1",
                    w.K_MACHINE: "m1",
                }
            )
            pub.publish("edgeline/v1/s1/n1/birth", birth, qos=1, retain=True).wait_for_publish(5)
            bad = _bad_payloads(N_BAD)
            deadline = time.monotonic() + 120
            mem_mid = 0
            for i, p in enumerate(bad):
                info = pub.publish("edgeline/v1/s1/n1/evt", p, qos=1)
                if i % 200 == 199:
                    info.wait_for_publish(30)
                    await asyncio.sleep(0)
                if i == N_BAD // 2:
                    mem_mid = _gateway_bytes()
            while gw.stats.malformed < N_BAD and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # Still serving: a good event right after the flood is processed.
            good = cbor2.dumps(
                {
                    w.K_V: 1,
                    w.K_KIND: w.KIND_EVT,
                    w.K_NODE: "n1",
                    w.K_BOOT: 1,
                    w.K_SEQ: 1,
                    w.K_TRACE: os.urandom(16),
                    w.K_SPAN: os.urandom(8),
                    w.K_T_WALL: 0,
                    w.K_T_MONO: 0,
                    w.K_FEATURES: {"vibration": [1.0]},
                    w.K_SCORES: {"vibration": 0.1},
                    w.K_ANOMALY: False,
                    w.K_CAUSES: [],
                    w.K_DETECTOR: "spc",
                }
            )
            pub.publish("edgeline/v1/s1/n1/evt", good, qos=1).wait_for_publish(10)
            while gw.stats.accepted < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while len(dead) < N_BAD and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            mem_end = _gateway_bytes()
        finally:
            tracemalloc.stop()
            pub.loop_stop()
            pub.disconnect()
            sub.loop_stop()
            sub.disconnect()
            await gw.stop()
        return gw, mem_mid, mem_end

    gw, mem_mid, mem_end = asyncio.run(scenario())
    assert gw.stats.malformed == N_BAD
    assert gw.stats.accepted == 1, "the good event after the flood must be processed"
    assert gw.state.nodes["n1"].last_seq == 1
    with dead_lock:
        assert len(dead) == N_BAD
        reasons = {cbor2.loads(d)[w.K_REASON].split(":")[0] for d in dead}
    assert len(reasons) >= 8, reasons  # the different faults are told apart
    # Bounded memory: the gateway did not keep what the second half of the flood brought.
    assert mem_end - mem_mid < 8 * 1024 * 1024, (mem_mid, mem_end)
    assert sum(gw.stats.dead_reasons.values()) == N_BAD
