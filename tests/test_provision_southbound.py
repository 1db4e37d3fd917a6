"""`edgeline provision` and the per-device southbound keys (host/provision.py,
host/southbound.py `DeviceKeys`, host/gateway_config.py `[southbound] keys_file`,
docs/southbound.md).

1. Under CPython: each provisioned node's bundle holds its own key (`device.key`, named by
   the node config's `southbound.key`), the same key the gateway's store
   (`gateway/device-keys.json`) holds for it; keys differ between nodes; every key file is
   0600; re-runs (adding nodes, `--renew`) keep every key; only `--rotate-southbound-key`
   replaces one, for the nodes it names; a bundle key that differs from the store's stops
   the run before anything is written; a lost store is rebuilt from the bundles; a gateway
   config's `[southbound] keys_file` loads the store, and a bad one is refused by name.
2. End to end on Mosquitto with the provisioned TLS listener and ACL: two virtual nodes (the
   firmware under the MicroPython unix port) run their provisioned bundles, copied to a
   "board" folder; a `Southbound` holding the gateway's certificate and the store a gateway
   config points at pushes a model to one and a config to the other: both accepted; the
   same pushes signed with the other node's key are refused (`bad-tag`).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest
from edgeline.firmware.edgeline_node import config as node_config
from edgeline.firmware.edgeline_node import southbound as node_sb
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway_config import GatewayConfigError, load, load_southbound_keys
from edgeline.host.provision import Layout
from edgeline.host.southbound import (
    DeviceKeys,
    Southbound,
    SouthboundConfig,
    config_message,
    key_id,
    model_messages,
    new_cmd_id,
)
from edgeline.host.virtual_node import VirtualNode
from paho.mqtt.enums import CallbackAPIVersion

from brokers import _require_mosquitto
from test_provision_tls import SITE, TlsBroker, provision
from test_southbound_e2e import DEMO, DEMO_SHA, ack_of, publish_raw, wait_until

NODES = ("node-1", "node-2")


def node_key(lay: Layout, node: str) -> bytes:
    """The bundle's key, read the way the node reads it."""
    key: bytes = node_sb.load_key(str(lay.node_key(node)))
    return key


def gateway_toml(path: Path, keys_file: Path | str) -> Path:
    """A minimal gateway config pointing at a key store (relative to the config's folder)."""
    path.write_text(f'[opcua]\nsecurity = "none"\n\n[southbound]\nkeys_file = "{keys_file}"\n')
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. the files -------------------------------------------------------------------------------
def test_each_node_bundle_holds_the_key_the_gateway_store_holds_for_it(tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0], "--node", NODES[1]) == 0
    lay = Layout(out)
    assert lay.device_keys == out / "gateway" / "device-keys.json"
    store = DeviceKeys.load(lay.device_keys)
    assert sorted(store.keys) == list(NODES)
    for node in NODES:
        key = store.key_for(node)
        assert len(key) == 32
        assert node_key(lay, node) == key
        # The node finds it through its config, as firmware/edgeline_node/node.py does.
        cfg = node_config.load(str(lay.node_config(node)))
        assert cfg["southbound"]["key"] == "device.key"
        assert lay.node_dir(node) / cfg["southbound"]["key"] == lay.node_key(node)
    assert store.key_for(NODES[0]) != store.key_for(NODES[1])
    for secret in (lay.device_keys, *(lay.node_key(n) for n in NODES)):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    # The manifest names the keys (key ids), never holds them.
    manifest = json.loads(lay.manifest.read_text())
    assert manifest["gateway"]["device_keys"] == "gateway/device-keys.json"
    text = lay.manifest.read_text()
    for node in NODES:
        assert manifest["nodes"][node]["southbound_key_id"] == key_id(store.key_for(node))
        assert store.key_for(node).hex() not in text
    # A gateway config beside the store points at it.
    toml = gateway_toml(out / "gateway" / "gateway.toml", "device-keys.json")
    load(toml)  # validated at start
    loaded = load_southbound_keys(toml)
    assert loaded is not None and loaded.keys == store.keys


def test_reruns_keep_every_key_and_only_rotation_replaces_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "site"
    lay = Layout(out)
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0], "--node", NODES[1]) == 0
    before = DeviceKeys.load(lay.device_keys).keys
    bundles = {n: lay.node_key(n).read_bytes() for n in NODES}

    # The same nodes again, a new one, and certificate renewal: no key changes.
    argv = ["--out", str(out), "--site", SITE, "--node", NODES[0], "--node", NODES[1], "--node", "node-3"]
    assert provision(*argv) == 0
    assert provision(*argv, "--renew") == 0
    after = DeviceKeys.load(lay.device_keys).keys
    assert {n: after[n] for n in NODES} == before
    assert {n: lay.node_key(n).read_bytes() for n in NODES} == bundles
    assert node_key(lay, "node-3") == after["node-3"] and after["node-3"] not in before.values()

    # Rotation: the named node only, in the store and its bundle alike.
    capsys.readouterr()
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0], "--rotate-southbound-key") == 0
    assert "copy each rotated node's device.key to its board" in capsys.readouterr().out
    rotated = DeviceKeys.load(lay.device_keys).keys
    assert rotated[NODES[0]] != before[NODES[0]]
    assert node_key(lay, NODES[0]) == rotated[NODES[0]]
    assert rotated[NODES[1]] == before[NODES[1]] and rotated["node-3"] == after["node-3"]
    manifest = json.loads(lay.manifest.read_text())
    assert manifest["nodes"][NODES[0]]["southbound_key_id"] == key_id(rotated[NODES[0]])
    for secret in (lay.device_keys, lay.node_key(NODES[0])):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_a_bundle_key_that_differs_from_the_store_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "site"
    lay = Layout(out)
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0]) == 0
    lay.node_key(NODES[0]).write_text("00" * 32 + "\n")  # replaced by hand
    files = snapshot(out)
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0], "--node", NODES[1]) == 2
    err = capsys.readouterr().err
    assert f"{lay.node_key(NODES[0])}" in err and "is not the one" in err
    assert "--rotate-southbound-key --node node-1" in err
    assert snapshot(out) == files, "a refused run writes nothing"
    # The way out the message names.
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0], "--rotate-southbound-key") == 0
    assert node_key(lay, NODES[0]) == DeviceKeys.load(lay.device_keys).key_for(NODES[0]) != bytes(32)


def test_a_lost_store_is_rebuilt_from_the_bundles(tmp_path: Path) -> None:
    out = tmp_path / "site"
    lay = Layout(out)
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0]) == 0
    deployed = node_key(lay, NODES[0])
    lay.device_keys.unlink()
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0]) == 0
    assert DeviceKeys.load(lay.device_keys).key_for(NODES[0]) == deployed == node_key(lay, NODES[0])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("store", "device keys file"),
        ("node-key", "cannot read the node key"),
    ],
)
def test_unreadable_key_files_exit_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, message: str
) -> None:
    out = tmp_path / "site"
    lay = Layout(out)
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0]) == 0
    path = lay.device_keys if damage == "store" else lay.node_key(NODES[0])
    path.write_text("not a key\n")
    assert provision("--out", str(out), "--site", SITE, "--node", NODES[0]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_rotation_needs_the_nodes_it_rotates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision("--out", str(tmp_path / "site"), "--site", SITE, "--rotate-southbound-key") == 2
    assert "--rotate-southbound-key needs the nodes" in capsys.readouterr().err


def test_gateway_config_refuses_a_keys_file_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match=r"southbound\.keys_file: cannot read device keys file"):
        load(gateway_toml(tmp_path / "gw.toml", "missing.json"))
    (tmp_path / "bad.json").write_text('{"version": 1, "keys": {"node-1": "abcd"}}')
    with pytest.raises(GatewayConfigError, match=r"southbound\.keys_file: .*at least 16 bytes"):
        load(gateway_toml(tmp_path / "gw.toml", "bad.json"))
    (tmp_path / "gw.toml").write_text("[southbound]\nkeys_file = 3\n")
    with pytest.raises(GatewayConfigError, match=r"southbound\.keys_file must be a str"):
        load(tmp_path / "gw.toml")
    (tmp_path / "gw.toml").write_text('[opcua]\nsecurity = "none"\n')
    assert load_southbound_keys(tmp_path / "gw.toml") is None  # no store: southbound off


# -- 2. end to end ------------------------------------------------------------------------------
def announce_gateway_online(b: TlsBroker) -> None:
    """The retained gateway `state` (a node acks only while the gateway is online), from a
    client holding the gateway certificate, gone again before the Southbound connects: the
    broker makes the CN the client id, so two `_gateway` connections knock each other off."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-announce")
    c.tls_set(
        ca_certs=str(b.lay.gateway_ca), certfile=str(b.lay.gateway_cert), keyfile=str(b.lay.gateway_key)
    )
    c.connect("127.0.0.1", b.tls_port)
    c.loop_start()
    try:
        online = cbor2.dumps({w.K_V: 1, w.K_KIND: w.KIND_STATE, w.K_NODE: w.GATEWAY_NODE, w.K_ONLINE: True})
        info = c.publish(w.topic(SITE, w.GATEWAY_NODE, w.KIND_STATE), online, qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def board(b: TlsBroker, node: str, root: Path) -> tuple[dict[str, Any], Path]:
    """The node's bundle copied to its "board" as is, and its config pointed at the test
    listener, with fast windows (VirtualNode writes it back beside the copied files)."""
    dest = root / "boards" / node
    shutil.copytree(b.lay.node_dir(node), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["broker"]["port"] = b.tls_port
    cfg["window"] = {"samples": 256, "period_ms": 100}
    cfg["data_dir"] = "data"
    return cfg, dest


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_provisioned_keys_sign_pushes_the_provisioned_nodes_accept(tmp_path: Path) -> None:
    _require_mosquitto()
    b = TlsBroker(tmp_path, "ec")  # provisions node-1 and node-2 of plant-a
    keys = load_southbound_keys(
        gateway_toml(tmp_path / "gateway.toml", b.lay.device_keys.relative_to(tmp_path))
    )
    assert keys is not None and sorted(keys.keys) == list(NODES)
    one, two = NODES
    with b.mosquitto:
        announce_gateway_online(b)
        sb = Southbound(
            SouthboundConfig(
                broker_host="127.0.0.1",
                broker_port=b.tls_port,
                site=SITE,
                tls_ca=str(b.lay.gateway_ca),
                tls_cert=str(b.lay.gateway_cert),
                tls_key=str(b.lay.gateway_key),
            ),
            keys,
        )
        sb.start()
        vns = {n: VirtualNode(*board(b, n, tmp_path)) for n in NODES}
        try:
            for vn in vns.values():
                vn.start()
            for vn in vns.values():
                wait_until(lambda vn=vn: bool(vn.events("gateway")), 20, "the node online over TLS", vn)
                assert vn.events("connected")[0]["tls"] is True

            # node-1, a model: signed with node-2's key, refused; with its own, installed.
            cmd_id = new_cmd_id()
            msgs = model_messages(DEMO, node=one, key=keys.key_for(two), version=1, cmd_id=cmd_id)
            forged = publish_raw(sb, msgs, cmd_id, 1, DEMO_SHA, site=SITE, node=one)
            assert ack_of(sb, forged).status == node_sb.BAD_TAG
            ack = ack_of(sb, sb.push_model(SITE, one, DEMO, version=1))
            assert (ack.status, ack.version) == ("ok", 1), ack
            assert vns[one].events("model")[-1]["sha256"] == DEMO_SHA.hex()

            # node-2, a config: signed with node-1's key, refused; with its own, applied.
            change = {"telemetry_every": 4}
            cmd_id = new_cmd_id()
            msg = config_message(change, node=two, key=keys.key_for(one), version=1, cmd_id=cmd_id)
            forged = publish_raw(sb, [msg], cmd_id, 1, b"", site=SITE, node=two, kind=node_sb.KIND_CMD_CONFIG)
            assert ack_of(sb, forged).status == node_sb.BAD_TAG
            ack = ack_of(sb, sb.push_config(SITE, two, change, version=1))
            assert ack.status == "ok" and "telemetry_every" in ack.reason, ack
            assert vns[two].events("config")[-1]["live"] == ["telemetry_every"]
        finally:
            for vn in vns.values():
                vn.stop()
            sb.stop()
    for node, vn in vns.items():
        assert vn.events("error") == [], (node, vn.events("error"))
        assert [a["status"] for a in vn.events("ack")] == [node_sb.BAD_TAG, "ok"], (node, vn.events("ack"))
