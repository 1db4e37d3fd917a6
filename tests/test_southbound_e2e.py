"""Southbound end to end: host/southbound.py's Southbound pushes to a virtual node (the real
firmware under the MicroPython unix port) through Mosquitto, and the node verifies, swaps,
rolls back, applies and acks (firmware/edgeline_node/node.py, docs/southbound.md).

- The committed demo model, pushed to a node that runs control charts only: acked "ok", the
  node's next birth carries its sha256, its events are scored by it from then on.
- A tampered push (a byte of the model changed in flight), a forged one (tagged with another
  key), a replayed older version and an authentic model that cannot run on this node (the
  SKAB model: its inputs are not this node's features) are refused with their status; the
  demo model keeps running and the birth keeps its sha256.
- A config push is applied live (control-chart limits, telemetry period), a bad one refused.
- Time requests are answered; the node logs the round trip.
- After a restart the node runs the pushed model (its A/B slot) and the pushed config.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from edgeline.firmware.edgeline_node import southbound as node_sb
from edgeline.firmware.edgeline_node import wire as w
from edgeline.hil.mosquitto import MosquittoProcess
from edgeline.host.southbound import (
    Ack,
    DeviceKeys,
    Push,
    Southbound,
    SouthboundConfig,
    model_messages,
    new_cmd_id,
)
from edgeline.host.virtual_node import VirtualNode
from paho.mqtt.enums import CallbackAPIVersion

from micropython_runner import REPO

SITE = "sb"
NODE = "sb-1"
DEMO = (REPO / "models" / "demo-rotating-machine.tflite").read_bytes()
SKAB = (REPO / "models" / "skab-pump-anomaly-free.tflite").read_bytes()
DEMO_SHA = hashlib.sha256(DEMO).digest()


class Watcher:
    """paho: keeps the node's births and events; announces the gateway online (retained)."""

    def __init__(self, host: str, port: int) -> None:
        self.births: list[dict[int, Any]] = []
        self.events: list[dict[int, Any]] = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="sb-watcher")
        self.c.on_message = self._on_message
        self.c.connect(host, port)
        self.c.loop_start()
        self.c.subscribe([(w.topic(SITE, NODE, w.KIND_BIRTH), 1), (w.topic(SITE, NODE, w.KIND_EVT), 1)])
        online = {w.K_V: 1, w.K_KIND: w.KIND_STATE, w.K_NODE: w.GATEWAY_NODE, w.K_ONLINE: True}
        topic = w.topic(SITE, w.GATEWAY_NODE, w.KIND_STATE)
        self.c.publish(topic, cbor2.dumps(online), qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        m = cbor2.loads(msg.payload)
        with self._lock:
            (self.births if msg.topic.endswith("/birth") else self.events).append(m)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def wait_until(cond: Callable[[], bool], timeout: float, what: str, vn: VirtualNode) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or not vn.alive():
            raise AssertionError(
                f"timed out waiting for {what}; node stderr {vn.stderr_tail[-5:]}; last lines {vn.lines[-5:]}"
            )
        time.sleep(0.05)


def ack_of(sb: Southbound, push: Push) -> Ack:
    ack = sb.wait_ack(push, timeout=20)
    assert ack is not None, f"no ack for push {push.cmd_id}"
    return ack


def publish_raw(
    sb: Southbound,
    payloads: list[bytes],
    cmd_id: int,
    version: int,
    sha: bytes,
    *,
    site: str = SITE,
    node: str = NODE,
    kind: int = node_sb.KIND_CMD_MODEL,
) -> Push:
    """Send hand-made cmd/model (or `kind`) messages through Southbound's own connection."""
    topic = node_sb.topic(site, node, kind)
    push = Push(site, node, cmd_id, version, sha, len(payloads))
    push.infos = [sb._mqtt.publish(topic, p, qos=1) for p in payloads]
    return push


def status(vn: VirtualNode) -> dict[str, Any]:
    n = len(vn.events("status"))
    vn.command("status")
    wait_until(lambda: len(vn.events("status")) > n, 10, "a status line", vn)
    return vn.events("status")[-1]


@pytest.mark.micropython
def test_model_and_config_pushes_end_to_end(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    keys = DeviceKeys.ensure(tmp_path / "device-keys.json", [NODE])
    workdir = tmp_path / "node"
    workdir.mkdir()
    keys.write_node_key(NODE, workdir / "device.key")  # beside the config VirtualNode writes
    cfg = {
        "node_id": NODE,
        "site": SITE,
        "line": "l1",
        "machine": "m1",
        "broker": {"host": mosquitto.host, "port": mosquitto.port, "keepalive": 10},
        "window": {"samples": 256, "period_ms": 100},
        "telemetry_every": 10,
        "data_dir": "data",
        "southbound": {"key": "device.key"},  # relative to the config file's folder
    }
    watcher = Watcher(mosquitto.host, mosquitto.port)
    sb = Southbound(SouthboundConfig(broker_host=mosquitto.host, broker_port=mosquitto.port, site=SITE), keys)
    sb.start()
    vn = VirtualNode(cfg, workdir)
    vn2: VirtualNode | None = None
    try:
        vn.start()
        wait_until(lambda: bool(vn.events("gateway")) and bool(watcher.births), 15, "the node online", vn)
        assert watcher.births[-1][w.K_MODEL_SHA] is None  # control charts only, to begin with
        wait_until(lambda: bool(vn.events("time")), 15, "a time answer", vn)

        # 1. The demo model: verified, written to slot a, self-tested, swapped in, acked.
        births = len(watcher.births)
        ack = ack_of(sb, sb.push_model(SITE, NODE, DEMO, version=1))
        assert (ack.status, ack.version, ack.boot) == ("ok", 1, 1), ack
        wait_until(lambda: len(watcher.births) > births, 10, "a new birth", vn)
        assert watcher.births[-1][w.K_MODEL_SHA] == DEMO_SHA
        (installed,) = vn.events("model")
        assert installed == {
            "ev": "model",
            "status": "ok",
            "sha256": DEMO_SHA.hex(),
            "version": 1,
            "slot": "a",
        }
        n_evt = len(watcher.events)
        wait_until(lambda: len(watcher.events) > n_evt + 3, 10, "events scored by the model", vn)
        assert all(e[w.K_DETECTOR] == "spc+model" and "model" in e[w.K_SCORES] for e in watcher.events[-2:])

        # 2. Refusals; the demo model keeps running.
        births = len(watcher.births)
        cmd_id = new_cmd_id()
        msgs = model_messages(DEMO, node=NODE, key=keys.key_for(NODE), version=2, cmd_id=cmd_id)
        last = cbor2.loads(msgs[-1])
        data = bytearray(last[node_sb.K_DATA])
        data[100] ^= 0x01  # one bit changed on the way: the tag still verifies, the hash does not
        last[node_sb.K_DATA] = bytes(data)
        tampered = publish_raw(sb, [*msgs[:-1], cbor2.dumps(last, canonical=True)], cmd_id, 2, DEMO_SHA)
        assert ack_of(sb, tampered).status == node_sb.BAD_SHA

        forger = DeviceKeys({NODE: bytes(32)})
        cmd_id = new_cmd_id()
        forged = publish_raw(
            sb, model_messages(DEMO, node=NODE, key=forger.key_for(NODE), version=3, cmd_id=cmd_id),
            cmd_id, 3, DEMO_SHA,
        )  # fmt: skip
        assert ack_of(sb, forged).status == node_sb.BAD_TAG

        assert ack_of(sb, sb.push_model(SITE, NODE, DEMO, version=0)).status == node_sb.STALE_VERSION
        ack = ack_of(sb, sb.push_model(SITE, NODE, SKAB, version=4))
        assert ack.status == node_sb.SELF_TEST and "model input" in ack.reason, ack  # rolled back
        st = status(vn)
        assert st["model"] == DEMO_SHA.hex()
        time.sleep(0.5)  # a birth would have followed the swap at once
        assert len(watcher.births) == births, "no swap, no new birth"
        n_evt = len(watcher.events)
        wait_until(lambda: len(watcher.events) > n_evt + 2, 10, "more events", vn)
        assert watcher.events[-1][w.K_DETECTOR] == "spc+model"

        # 3. Config: applied live where it can be, refused when it is not a valid config.
        push = sb.push_config(SITE, NODE, {"spc": {"k_sigma": 4.5}, "telemetry_every": 4}, version=1)
        ack = ack_of(sb, push)
        assert ack.status == "ok" and ack.reason == "live: spc.k_sigma, telemetry_every; next boot: -", ack
        (applied,) = vn.events("config")
        assert applied["live"] == ["spc.k_sigma", "telemetry_every"]
        w0 = vn.events("window")[-1]["seq"]
        wait_until(lambda: sum(t["seq"] > w0 for t in vn.events("telemetry")) >= 3, 10, "telemetry", vn)
        periods = {
            b["windows"] - a["windows"]
            for a, b in zip(vn.events("telemetry")[-3:-1], vn.events("telemetry")[-2:], strict=True)
        }
        assert periods == {4}
        ack = ack_of(sb, sb.push_config(SITE, NODE, {"spc": {"k_sigma": -1}}, version=2))
        assert ack.status == node_sb.BAD_CONFIG and "spc.k_sigma" in ack.reason, ack
        ack = ack_of(sb, sb.push_config(SITE, NODE, {"node_id": "sb-2"}, version=2))
        assert ack.status == node_sb.BAD_CONFIG and "node_id" in ack.reason, ack
        ack = ack_of(sb, sb.push_config(SITE, NODE, {"broker": {"keepalive": 20}}, version=2))
        assert ack.reason == "live: -; next boot: broker.keepalive", ack

        # 4. A restart: the pushed model from its slot, the pushed config from data_dir.
        vn.stop()
        births = len(watcher.births)
        vn2 = VirtualNode(cfg, workdir)
        vn2.start()
        wait_until(lambda: len(watcher.births) > births, 15, "the birth after the restart", vn2)
        assert watcher.births[-1][w.K_MODEL_SHA] == DEMO_SHA and watcher.births[-1][w.K_BOOT] == 2
        wait_until(lambda: len(vn2.events("telemetry")) >= 2, 15, "telemetry after the restart", vn2)
        assert [t["windows"] for t in vn2.events("telemetry")[:2]] == [4, 8]
        assert not vn2.events("error"), vn2.events("error")
        ack = ack_of(sb, sb.push_model(SITE, NODE, DEMO, version=1))  # the version it runs: allowed
        assert ack.status == "ok" and vn2.events("model")[-1]["slot"] == "b"
    finally:
        for v in (vn, vn2):
            if v is not None:
                v.stop()
        sb.stop()
        watcher.close()
    assert vn.events("error") == [], vn.events("error")
    times = vn.events("time")
    assert times and all(0 <= t["rtt_us"] < 500_000 for t in times)
    print(
        f"\nsouthbound: model push acked in {len(vn.events('ack'))} acks; time round trips "
        f"{[t['rtt_us'] for t in times]} us; acks counted by the gateway side {dict(sb.counts)}"
    )
