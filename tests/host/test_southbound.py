"""Gateway -> node commands (host/southbound.py): keys file, messages, and the MQTT round trips
against both real brokers, with a node played by a paho client running the firmware's
verification helpers (the same module that runs on the board)."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from edgeline.firmware.edgeline_node import southbound as node_sb
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.machine_state import MachineState
from edgeline.host.southbound import (
    MAX_CONFIG,
    DeviceKeys,
    Southbound,
    SouthboundConfig,
    SouthboundError,
    config_message,
    model_messages,
    parse_cmd_topic,
)
from paho.mqtt.enums import CallbackAPIVersion

SITE = "plant-a"
MODEL = bytes((i * 7 + 3) & 0xFF for i in range(10_000))


# -- keys file ------------------------------------------------------------------------------
def test_keys_file_is_made_private_and_kept_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "gateway" / "device-keys.json"
    first = DeviceKeys.ensure(path, ["node-1", "node-2"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.key_for("node-1")) == 32 and first.key_for("node-1") != first.key_for("node-2")
    again = DeviceKeys.ensure(path, ["node-2", "node-3"])
    assert again.key_for("node-1") == first.key_for("node-1")  # existing keys survive
    assert again.key_for("node-2") == first.key_for("node-2")
    assert set(DeviceKeys.load(path).keys) == {"node-1", "node-2", "node-3"}
    node_key = tmp_path / "model.key"
    again.write_node_key("node-3", node_key)
    assert node_sb.load_key(str(node_key)) == again.key_for("node-3")  # what the node reads
    assert stat.S_IMODE(node_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "is not JSON"),
        ('{"version": 2, "keys": {}}', "expected"),
        ('{"version": 1, "keys": []}', "must map node id"),
        ('{"version": 1, "keys": {"_gw": "00112233445566778899aabbccddeeff"}}', "not a valid node id"),
        ('{"version": 1, "keys": {"node-1": "abcd"}}', "at least 16 bytes"),
        ('{"version": 1, "keys": {"node-1": "zz"}}', "at least 16 bytes"),
    ],
)
def test_bad_keys_file_names_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(SouthboundError, match=match) as e:
        DeviceKeys.load(path)
    assert str(path) in str(e.value)


def test_unknown_node_names_node_and_file(tmp_path: Path) -> None:
    keys = DeviceKeys.ensure(tmp_path / "k.json", ["node-1"])
    with pytest.raises(SouthboundError, match=r"no device key for node 'node-9' in .*k\.json"):
        keys.key_for("node-9")


# -- messages -------------------------------------------------------------------------------
def test_model_messages_layout_and_tag() -> None:
    key = bytes(range(32))
    msgs = model_messages(MODEL, node="node-1", key=key, version=3, cmd_id=42, max_chunk=4096)
    maps = [cbor2.loads(m) for m in msgs]
    assert [m[node_sb.K_INDEX] for m in maps] == [0, 1, 2]
    assert all(m[node_sb.K_TOTAL] == 3 and m[node_sb.K_SIZE] == len(MODEL) for m in maps)
    assert b"".join(m[node_sb.K_DATA] for m in maps) == MODEL
    sha = hashlib.sha256(MODEL).digest()
    want = hmac.new(key, sha + struct.pack(">I", 3) + b"node-1", hashlib.sha256).digest()
    assert all(m[node_sb.K_SHA256] == sha and m[node_sb.K_TAG] == want for m in maps)
    assert maps[0][w.K_KIND] == node_sb.KIND_CMD_MODEL and maps[0][w.K_NODE] == "node-1"
    assert all(len(m) < 4096 for m in model_messages(MODEL, node="node-1", key=key, version=3, cmd_id=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": b""}, "empty model"),
        ({"node": "_gateway"}, "not a valid node id"),
        ({"version": -1}, "version"),
        ({"version": 2**32}, "version"),
        ({"max_chunk": 0}, "max_chunk"),
    ],
)
def test_model_messages_refuse_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"model": MODEL, "node": "node-1", "key": bytes(32), "version": 1, "cmd_id": 1}
    with pytest.raises(SouthboundError, match=match):
        model_messages(**(args | kwargs))


def test_oversized_config_is_refused() -> None:
    with pytest.raises(SouthboundError, match="exceeds"):
        config_message({"x": "y" * MAX_CONFIG}, node="node-1", key=bytes(32), version=1, cmd_id=1)
    with pytest.raises(SouthboundError, match="must be a map"):
        config_message([1, 2], node="node-1", key=bytes(32), version=1, cmd_id=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "edgeline/v1/s/n/cmd/model",
        "edgeline/v1/s/n/evt",
        "edgeline/v2/s/n/cmd/ack",
        "edgeline/v1/s/_gateway/cmd/ack",
        "edgeline/v1/s/n/cmd/time/resp",
    ],
)
def test_only_node_topics_are_parsed(topic: str) -> None:
    with pytest.raises(SouthboundError):
        parse_cmd_topic(topic)


# -- a node played by paho + the firmware helpers ----------------------------------------------
class FakeNode:
    """Subscribes to its cmd/#, verifies model and config pushes with the firmware module and
    acks them; sends time requests and keeps the answers."""

    def __init__(self, broker: Any, node: str, key: bytes) -> None:
        self.node = node
        self.key = key
        self.slots: list[bytearray] = []
        self.results: list[Any] = []
        self.configs: list[Any] = []
        self.time_answers: queue.Queue[tuple[dict[int, Any], int]] = queue.Queue()
        self.receiver = node_sb.ModelReceiver(node, key, self._open_slot, max_size=1 << 20)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"t-{node}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        r = self.client.subscribe(f"{w.TOPIC_ROOT}/{SITE}/{node}/cmd/#", qos=1)
        assert r[0] == mqtt.MQTT_ERR_SUCCESS
        self.client.loop_start()

    def _open_slot(self) -> Any:
        buf = bytearray()
        self.slots.append(buf)

        class Slot:
            def write(self, b: bytes) -> None:
                buf.extend(b)

            def close(self) -> None:
                pass

        return Slot()

    def _ack(self, cmd_id: int, version: int, status: str, reason: str = "") -> None:
        m = node_sb.ack(self.node, 1, cmd_id, version, status, reason)
        self.client.publish(node_sb.topic(SITE, self.node, node_sb.KIND_CMD_ACK), cbor2.dumps(m), qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        t4 = node_sb.ticks_us()
        m = cbor2.loads(msg.payload)
        what = msg.topic.split("/cmd/")[1]
        if what == "time/resp":
            self.time_answers.put((m, t4))
        elif what == "model":
            try:
                r = self.receiver.chunk(m)
            except node_sb.SouthboundError as e:
                self.results.append(e.status)
                self._ack(m[node_sb.K_CMD_ID], m.get(node_sb.K_VERSION, 0), e.status, str(e))
                return
            self.results.append(r)
            if r == node_sb.DONE:
                self._ack(m[node_sb.K_CMD_ID], m[node_sb.K_VERSION], node_sb.OK)
        elif what == "config":
            try:
                cmd_id, version, data = node_sb.verify_config(m, self.node, self.key)
            except node_sb.SouthboundError as e:
                self._ack(m[node_sb.K_CMD_ID], m[node_sb.K_VERSION], e.status, str(e))
                return
            self.configs.append(cbor2.loads(data))
            self._ack(cmd_id, version, node_sb.OK)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def keys(tmp_path: Path) -> DeviceKeys:
    return DeviceKeys.ensure(tmp_path / "device-keys.json", ["node-1", "node-2", "node-3"])


@pytest.fixture
def southbound(broker: Any, keys: DeviceKeys) -> Iterator[Southbound]:
    s = Southbound(SouthboundConfig(broker_host=broker.host, broker_port=broker.port, site=SITE), keys)
    s.start()
    yield s
    s.stop()


def _nodes(broker: Any, keys: DeviceKeys, *names: str) -> list[FakeNode]:
    nodes = [FakeNode(broker, n, keys.key_for(n)) for n in names]
    time.sleep(0.3)  # subscriptions in place
    return nodes


def test_model_push_is_verified_and_acked(broker: Any, southbound: Southbound, keys: DeviceKeys) -> None:
    [node] = _nodes(broker, keys, "node-1")
    try:
        push = southbound.push_model(SITE, "node-1", MODEL, version=2)
        assert push.messages == 5 and push.wait_published(10)
        ack = southbound.wait_ack(push, timeout=10)
        assert ack is not None and ack.ok, (ack, node.results)
        assert (ack.cmd_id, ack.version) == (push.cmd_id, 2)
        assert node.slots == [bytearray(MODEL)]
        assert node.results == [node_sb.MORE] * 4 + [node_sb.DONE]
    finally:
        node.close()


def test_machine_push_uses_each_nodes_own_key(broker: Any, southbound: Southbound, keys: DeviceKeys) -> None:
    nodes = _nodes(broker, keys, "node-1", "node-2")
    machine = MachineState(SITE, "line-1", "pump-1", nodes={"node-1", "node-2"})
    try:
        pushes = southbound.push_model_to_machine(machine, MODEL[:3000], version=1)
        assert sorted(p.node for p in pushes) == ["node-1", "node-2"]
        acks = [southbound.wait_ack(p, timeout=10) for p in pushes]
        assert all(a is not None and a.ok for a in acks), acks
        assert all(n.slots == [bytearray(MODEL[:3000])] for n in nodes)
    finally:
        for n in nodes:
            n.close()
    machine.nodes.add("node-9")
    with pytest.raises(SouthboundError, match="node-9"):
        southbound.push_model_to_machine(machine, MODEL, version=1)


def test_push_with_a_wrong_key_is_refused_by_the_node(
    broker: Any, southbound: Southbound, keys: DeviceKeys
) -> None:
    # The gateway's keys file holds another key for node-3 than the node has.
    [node] = _nodes(broker, keys, "node-3")
    node.receiver.key = bytes(32)
    try:
        push = southbound.push_model(SITE, "node-3", MODEL, version=1)
        ack = southbound.wait_ack(push, timeout=10)
        assert ack is not None and ack.status == "bad-tag"
        assert node.slots == []
        deadline = time.monotonic() + 5
        while len(node.results) < push.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.results == ["bad-tag"] + [node_sb.IGNORED] * (push.messages - 1)
    finally:
        node.close()


def test_config_push_round_trip(broker: Any, southbound: Southbound, keys: DeviceKeys) -> None:
    [node] = _nodes(broker, keys, "node-2")
    try:
        cfg = {"window": {"period_ms": 250}}
        push = southbound.push_config(SITE, "node-2", cfg, version=7)
        ack = southbound.wait_ack(push, timeout=10)
        assert ack is not None and ack.ok and ack.version == 7
        assert node.configs == [cfg]
    finally:
        node.close()


def test_time_sync_round_trip(broker: Any, southbound: Southbound, keys: DeviceKeys) -> None:
    [node] = _nodes(broker, keys, "node-1")
    clock = node_sb.WallClock()
    try:
        for _ in range(3):
            req = clock.request("node-1", 1)
            topic = node_sb.topic(SITE, "node-1", node_sb.KIND_TIME_REQ)
            node.client.publish(topic, cbor2.dumps(req), qos=0)
            m, t4 = node.time_answers.get(timeout=5)
            rtt = clock.sync(m, "node-1", t4)  # refuses a round trip over 500 ms
            assert rtt >= 0 and m[node_sb.K_T2] <= m[node_sb.K_T3]
        # The node's wall clock now agrees with ours within half the round trip (NTP's bound
        # for an asymmetric path), plus a little for reading the two clocks.
        assert abs(clock.now_us() - time.time_ns() // 1000) <= clock.rtt_us // 2 + 20_000
        assert southbound.counts["time_answered"] == 3
    finally:
        node.close()


def test_malformed_node_messages_are_dead_lettered(broker: Any, southbound: Southbound) -> None:
    dead: queue.Queue[bytes] = queue.Queue()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-dead")
    sub.on_message = lambda _c, _u, msg: dead.put(bytes(msg.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"{w.TOPIC_ROOT}/{SITE}/{w.GATEWAY_NODE}/dead", qos=1)
    sub.loop_start()
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t-bad")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        time.sleep(0.3)
        base = f"{w.TOPIC_ROOT}/{SITE}/node-1/cmd"
        spoofed = cbor2.dumps(node_sb.time_request("node-2", 1, 5))  # node-1's topic, node-2 inside
        for topic, payload in [(f"{base}/time/req", b"\xff junk"), (f"{base}/time/req", spoofed)]:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        reasons = [cbor2.loads(dead.get(timeout=5))[w.K_REASON] for _ in range(2)]
        assert "not valid CBOR" in reasons[0]
        assert "does not match the topic" in reasons[1]
        assert southbound.counts["refused"] == 2
        # Still answering after that.
        req = cbor2.dumps(node_sb.time_request("node-1", 1, 5))
        got: queue.Queue[bytes] = queue.Queue()
        sub.on_message = lambda _c, _u, msg: got.put(bytes(msg.payload))
        sub.subscribe(f"{base}/time/resp", qos=0)
        time.sleep(0.3)
        pub.publish(f"{base}/time/req", req, qos=0)
        assert cbor2.loads(got.get(timeout=5))[node_sb.K_T1] == 5
    finally:
        for c in (sub, pub):
            c.loop_stop()
            c.disconnect()


def test_start_without_broker_says_so(keys: DeviceKeys) -> None:
    from edgeline.host.ports import free_tcp_port

    s = Southbound(SouthboundConfig(broker_port=free_tcp_port()), keys)
    with pytest.raises(ConnectionError, match="could not connect"):
        s.start(timeout=1.0)


def test_keys_file_json_shape(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    DeviceKeys.ensure(path, ["node-1"])
    body = json.loads(path.read_text())
    assert body["version"] == 1 and len(bytes.fromhex(body["keys"]["node-1"])) == 32
