"""A flood of 10,000 malformed payloads: the gateway keeps serving, its memory stays bounded,
and every one is counted and published on the dead-letter topic. Runs on both brokers."""

from __future__ import annotations

import asyncio
import os
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import edgeline.host.gateway as gateway_module
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.ports import free_tcp_port

from wire_messages import Collector, birth, disconnect, event_map, publisher

N_BAD = 10_000


def _good_event() -> dict[int, Any]:
    return event_map(
        "n1",
        1,
        trace=os.urandom(16),
        span=os.urandom(8),
        features={"vibration": [1.0]},
        scores={"vibration": 0.1},
    )


def _bad_payloads(n: int, seed: int = 5) -> list[bytes]:
    """Every way a payload can be wrong, cycled: not CBOR, not a map, wrong version, wrong
    kind, wrong node, missing keys, wrong types, huge, deep, NaN, bad trace id."""
    rng = random.Random(seed)
    good = _good_event()
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
    async def scenario() -> tuple[Gateway, Collector, int, int]:
        gw = Gateway(
            GatewayConfig(
                broker_host=broker.host, broker_port=broker.port, site="s1", opcua_port=free_tcp_port()
            )
        )
        await gw.start()
        dead = Collector(broker.host, broker.port, "t-dead", gw.dead_topic)
        pub = publisher(broker.host, broker.port, "t-flood", max_inflight=100)
        tracemalloc.start()
        try:
            await asyncio.sleep(0.5)
            node_birth = birth("n1", fw="t", sensors=[("vibration", "g", ["mean"])])
            pub.publish("edgeline/v1/s1/n1/birth", node_birth, qos=1, retain=True).wait_for_publish(5)
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
            good = cbor2.dumps(_good_event())
            pub.publish("edgeline/v1/s1/n1/evt", good, qos=1).wait_for_publish(10)
            while gw.stats.accepted < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while len(dead.messages) < N_BAD and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            mem_end = _gateway_bytes()
        finally:
            tracemalloc.stop()
            disconnect(pub)
            dead.close()
            await gw.stop()
        return gw, dead, mem_mid, mem_end

    gw, dead, mem_mid, mem_end = asyncio.run(scenario())
    assert gw.stats.malformed == N_BAD
    assert gw.stats.accepted == 1, "the good event after the flood must be processed"
    assert gw.state.nodes["n1"].last_seq == 1
    with dead.lock:
        assert len(dead.messages) == N_BAD
        reasons = {cbor2.loads(d)[w.K_REASON].split(":")[0] for d in dead.messages}
    assert len(reasons) >= 8, reasons  # the different faults are told apart
    # Bounded memory: the gateway did not keep what the second half of the flood brought.
    assert mem_end - mem_mid < 8 * 1024 * 1024, (mem_mid, mem_end)
    assert sum(gw.stats.dead_reasons.values()) == N_BAD
