"""`edgeline provision` and MQTT over mutual TLS with its output (host/provision.py,
firmware/edgeline_node/tls.py).

1. Under CPython: the files it writes (chain, names, key usage, permissions, DER for the
   nodes, the ACL, node configs the firmware's config loader accepts), re-runs that extend a
   site without invalidating it, and bad arguments.
2. End to end on Mosquitto (`mosquitto` marker: amqtt cannot require client certificates,
   DESIGN.md): a TLS listener with require_certificate and use_identity_as_username and the
   provisioned ACL; the node under the MicroPython unix port connects with its DER client
   certificate and publishes; paho, holding the gateway certificate, receives it and commands
   the node back; a message to another node's topic is not delivered (ACL); a client without
   a certificate, with a certificate from another CA, or trusting another CA is refused.
3. The node application itself, `edgeline node sim --config <bundle config>`: it publishes
   its events over mutual TLS to a gateway (paho, gateway certificate) that announced itself
   online; the same node without its client certificate in the config is refused at every
   attempt, logs it, and delivers nothing (its measurements stay on its flash queue).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from edgeline.firmware.edgeline_node import config as node_config
from edgeline.firmware.edgeline_node import tls
from edgeline.firmware.edgeline_node import wire as w
from edgeline.firmware.edgeline_node.mqtt import MQTTClient, MQTTError
from edgeline.hil.mosquitto import MosquittoProcess
from edgeline.host.ports import free_tcp_port
from edgeline.host.provision import Layout, add_parser, mosquitto_tls_lines
from paho.mqtt.enums import CallbackAPIVersion

from brokers import _require_mosquitto
from micropython_runner import run_micropython

SITE = "plant-a"


def provision(*argv: str) -> int:
    """Run `edgeline provision ARGV` through the parser add_parser() registers."""
    p = argparse.ArgumentParser(prog="edgeline")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["provision", *argv])
    return int(args.func(args))


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# -- 1. the files -------------------------------------------------------------------------------
def test_provision_writes_pki_acl_and_node_bundles(tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert (
        provision("--out", str(out), "--site", SITE, "--node", "node-1", "--node", "node-2=line-2/fan-1") == 0
    )
    lay = Layout(out)
    ca = x509.load_pem_x509_certificate(lay.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(lay.server_cert.read_bytes())
    gateway = x509.load_pem_x509_certificate(lay.gateway_cert.read_bytes())
    node = x509.load_der_x509_certificate((lay.node_dir("node-1") / "client.der").read_bytes())
    for leaf in (server, gateway, node):
        leaf.verify_directly_issued_by(ca)
    assert x509.load_der_x509_certificate((lay.node_dir("node-1") / "ca.der").read_bytes()) == ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = x509.ExtendedKeyUsage
    assert list(server.extensions.get_extension_for_class(eku).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for client in (gateway, node):
        assert list(client.extensions.get_extension_for_class(eku).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cn(gateway), cn(node)) == ("_gateway", "node-1")  # the MQTT user names
    key = load_der_private_key((lay.node_dir("node-1") / "client.key.der").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    secrets = (lay.ca_key, lay.server_key, lay.gateway_key, lay.node_dir("node-1") / "client.key.der")
    for secret in (*secrets, lay.device_keys, lay.node_key("node-1")):  # southbound keys too
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    # The node config: accepted by the firmware's own loader, TLS files beside it.
    cfg = node_config.load(str(lay.node_config("node-2")))
    assert (cfg["node_id"], cfg["site"], cfg["line"], cfg["machine"]) == ("node-2", SITE, "line-2", "fan-1")
    assert (cfg["broker"]["host"], cfg["broker"]["port"]) == ("127.0.0.1", 8883)
    for name in cfg["broker"]["tls"].values():
        assert (lay.node_dir("node-2") / name).is_file()
    assert tls.from_config(cfg["broker"]["tls"], str(lay.node_dir("node-2"))) is not None  # CPython path
    acl = lay.acl.read_text()
    assert (
        "user node-1\n"
        "topic write edgeline/v1/plant-a/node-1/#\n"
        "topic read edgeline/v1/plant-a/node-1/cmd/#\n"
        "topic read edgeline/v1/plant-a/_gateway/state\n"
    ) in acl
    assert "user _gateway\ntopic read edgeline/v1/plant-a/#\n" in acl
    assert acl.index("user ") < acl.index("topic ")  # no rule applies to anonymous clients
    assert f"acl_file {lay.acl.resolve()}" in lay.mosquitto_conf.read_text()
    manifest = json.loads(lay.manifest.read_text())
    assert sorted(manifest["nodes"]) == ["node-1", "node-2"] and manifest["site"] == SITE


def test_rerun_extends_the_site_and_keeps_deployed_identities(tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert provision("--out", str(out), "--site", SITE, "--node", "node-1") == 0
    lay = Layout(out)
    ca_before = lay.ca_cert.read_bytes()
    key_before = (lay.node_dir("node-1") / "client.key.der").read_bytes()
    assert provision("--out", str(out), "--site", SITE, "--node", "node-3", "--key-type", "rsa") == 0
    assert lay.ca_cert.read_bytes() == ca_before
    assert (lay.node_dir("node-1") / "client.key.der").read_bytes() == key_before
    key3 = load_der_private_key((lay.node_dir("node-3") / "client.key.der").read_bytes(), None)
    assert isinstance(key3, rsa.RSAPrivateKey) and key3.key_size == 2048
    acl = lay.acl.read_text()
    assert "user node-1\n" in acl and "user node-3\n" in acl
    assert provision("--out", str(out), "--site", SITE, "--node", "node-1", "--renew") == 0
    assert (lay.node_dir("node-1") / "client.key.der").read_bytes() != key_before
    assert lay.ca_cert.read_bytes() == ca_before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--site", "plant-b", "--node", "node-1"], "was provisioned for site 'plant-a'"),
        (["--site", SITE, "--node", "_gateway"], "node id '_gateway' is not a valid name"),
        (["--site", SITE, "--node", "a/b"], "node id 'a/b' is not a valid name"),
        (["--site", SITE, "--node", "n1", "--node", "n1"], "a node id is given twice"),
        (["--site", SITE, "--broker-host", "bad host!"], "neither an IP address nor a host name"),
    ],
    ids=["other-site", "reserved-id", "slash", "twice", "bad-host"],
)
def test_bad_arguments_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "site"
    assert provision("--out", str(out), "--site", SITE) == 0
    assert provision("--out", str(out), *argv) == 2
    assert message in capsys.readouterr().err


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert provision("--out", str(tmp_path), "--site", SITE) == 2
    assert "is not empty and has no manifest.json" in capsys.readouterr().err


def test_lazy_context_reports_a_bad_file_at_every_attempt(tmp_path: Path) -> None:
    # The node builds its context at boot and again at each connect until it loads: a bad
    # file costs connections (each one says why), never the node.
    ctx = tls.LazyContext({"ca": "ca.der", "cert": None, "key": None}, str(tmp_path))
    for attempt in (ctx.load, lambda: ctx.wrap_socket(None, server_hostname="x")):
        with pytest.raises(tls.TLSConfigError, match=r"CA certificate \(broker\.tls\.ca\)"):
            attempt()
    assert provision("--out", str(tmp_path / "site"), "--site", SITE, "--node", "node-1") == 0
    d = Layout(tmp_path / "site").node_dir("node-1")
    (tmp_path / "ca.der").write_bytes((d / "ca.der").read_bytes())  # the file arrives
    assert ctx.load() is ctx.load() is not None  # built once, then kept


# -- 2. mutual TLS on Mosquitto -------------------------------------------------------------------
class TlsBroker:
    def __init__(self, root: Path, key_type: str) -> None:
        self.out = root / "site"
        assert (
            provision(
                "--out",
                str(self.out),
                "--site",
                SITE,
                "--key-type",
                key_type,
                "--node",
                "node-1",
                "--node",
                "node-2",
            )
            == 0
        )
        self.lay = Layout(self.out)
        self.tls_port = free_tcp_port()
        self.mosquitto = MosquittoProcess(extra_config=mosquitto_tls_lines(self.lay, self.tls_port))


@pytest.fixture(params=["ec", "rsa"])
def tls_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsBroker]:
    _require_mosquitto()
    b = TlsBroker(tmp_path, request.param)
    with b.mosquitto:
        yield b


class Gateway:
    """paho-mqtt with the gateway's certificate, on the TLS listener."""

    def __init__(self, b: TlsBroker) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._ready = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex[:6]}")
        self.c.tls_set(
            ca_certs=str(b.lay.gateway_ca), certfile=str(b.lay.gateway_cert), keyfile=str(b.lay.gateway_key)
        )
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.on_subscribe = lambda *a: self._ready.set()
        self.c.connect("127.0.0.1", b.tls_port)
        self.c.loop_start()
        self.c.subscribe(f"edgeline/v1/{SITE}/#", qos=1)
        assert self._ready.wait(5), "the gateway could not subscribe over TLS"

    def take(self, timeout: float = 5.0) -> paho.MQTTMessage | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


NODE = """
import json, time
from edgeline_node import config, tls
from edgeline_node.mqtt import MQTTClient
from edgeline_node.mqtt_resilient import ResilientMQTT
cfg = config.load(CONFIG)
b = cfg['broker']
ctx = tls.from_config(b['tls'], CONFIG.rsplit('/', 1)[0])
root = 'edgeline/v1/%s/' % cfg['site']
me = root + cfg['node_id'] + '/'
c = MQTTClient(cfg['node_id'], b['host'], b['port'], keepalive=b['keepalive'], ssl_context=ctx)
c.set_last_will(me + 'death', b'gone', qos=1, retain=True)
r = ResilientMQTT(c, backoff_min_ms=100, backoff_max_ms=400)
acked = []
got = []
r.on_ack = acked.append
r.on_message = lambda t, p, ret: got.append([t, p.decode()])
r.set_birth(me + 'birth', b'hello')
r.subscribe(me + 'cmd/#', 1)
r.subscribe(root + 'node-2/cmd/#', 1)  # another node's commands: the ACL keeps them from us
t0 = time.ticks_ms()
while not r.connected and time.ticks_diff(time.ticks_ms(), t0) < 5000:
    r.service(50)
r.send(root + 'node-2/evt', b'forged', 'forged')  # not ours: the broker must not deliver it
r.send(me + 'evt', b'event-1', 'evt')
while (len(acked) < 2 or not got) and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    r.service(50)
r.disconnect()
print(json.dumps({'acked': acked, 'got': got, 'refused': r.subs_refused, 'connects': r.connects,
                  'error': r.last_error}))
"""


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_node_over_mutual_tls_with_acl(tls_broker: TlsBroker) -> None:
    b = tls_broker
    gw = Gateway(b)
    try:
        cfg_path = b.lay.node_config("node-1")
        cfg = json.loads(cfg_path.read_text())
        cfg["broker"]["port"] = b.tls_port
        cfg_path.write_text(json.dumps(cfg))
        done: list[Any] = []

        def node() -> None:
            r = run_micropython(f"CONFIG = {str(cfg_path)!r}\n" + NODE, timeout=30)
            assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
            done.append(json.loads(r.stdout.decode().strip().splitlines()[-1]))

        t = threading.Thread(target=node)
        t.start()
        seen = []
        while (m := gw.take()) is not None:
            seen.append((m.topic, m.payload))
            if m.topic.endswith("node-1/evt"):
                # Same publisher, so in this order: if node-2's command reached node-1 at
                # all, it would come first.
                gw.c.publish(f"edgeline/v1/{SITE}/node-2/cmd/config", b"not-yours", qos=1)
                gw.c.publish(f"edgeline/v1/{SITE}/node-1/cmd/config", b"v2", qos=1)
                break
        t.join(30)
        assert done, "the MicroPython node did not finish"
        out = done[0]
    finally:
        gw.close()
    root = f"edgeline/v1/{SITE}"
    assert seen == [(f"{root}/node-1/birth", b"hello"), (f"{root}/node-1/evt", b"event-1")], (seen, out)
    assert sorted(out["acked"]) == ["evt", "forged"]  # 3.1.1 cannot refuse a PUBLISH: acked, dropped
    assert out["got"] == [[f"{root}/node-1/cmd/config", "v2"]], out  # its command, not node-2's
    # Mosquitto 2.0 grants a subscription its ACL denies (SUBACK QoS 1, not 0x80) and
    # filters delivery instead, as the line above shows.
    assert out["refused"] == 0, out
    assert out["connects"] == 1
    assert "as node-1" in b.mosquitto.log_tail(50)  # identified by its certificate


REFUSED = """
import json
from edgeline_node import tls
from edgeline_node.mqtt import MQTTClient, MQTTError
def der(p):
    with open(p, 'rb') as f:
        return f.read()
out = {}
for name, ca, cert, key in CASES:
    ctx = tls.client_context(der(ca), cert and der(cert), key and der(key))
    c = MQTTClient('node-1', '127.0.0.1', PORT, ssl_context=ctx, timeout_ms=3000)
    try:
        c.connect()
        out[name] = 'connected'
        c.disconnect()
    except MQTTError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_refused_without_a_valid_client_certificate(tmp_path: Path) -> None:
    _require_mosquitto()
    b = TlsBroker(tmp_path / "a", "ec")
    assert provision("--out", str(tmp_path / "other"), "--site", SITE, "--node", "node-1") == 0
    good = b.lay.node_dir("node-1")
    foreign = Layout(tmp_path / "other").node_dir("node-1")
    cases = [
        ("ok", str(good / "ca.der"), str(good / "client.der"), str(good / "client.key.der")),
        ("no-cert", str(good / "ca.der"), None, None),
        ("foreign-cert", str(good / "ca.der"), str(foreign / "client.der"), str(foreign / "client.key.der")),
        ("foreign-ca", str(foreign / "ca.der"), str(good / "client.der"), str(good / "client.key.der")),
    ]
    with b.mosquitto:
        r = run_micropython(f"CASES = {cases!r}\nPORT = {b.tls_port}\n" + REFUSED, timeout=30)
        assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
        out = json.loads(r.stdout.decode().strip().splitlines()[-1])
        log = b.mosquitto.log_tail(60)
    assert out["ok"] == "connected", out
    for case in ("no-cert", "foreign-cert"):
        assert out[case].startswith(f"TLS handshake with 127.0.0.1:{b.tls_port} failed: 32 EPIPE"), out
    assert "peer did not return a certificate" in log
    # The node checks the broker too: a broker certificate from another CA is rejected.
    assert (
        "TLS handshake" in out["foreign-ca"] and "not correctly signed by the trusted CA" in out["foreign-ca"]
    )


@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_cpython_client_with_the_node_bundle(tmp_path: Path) -> None:
    # The same DER bundle through tls.py's CPython path (tools and unit tests use it).
    _require_mosquitto()
    b = TlsBroker(tmp_path, "ec")
    d = b.lay.node_dir("node-2")
    cfg = json.loads((d / "config.json").read_text())
    with b.mosquitto:
        ctx = tls.from_config(cfg["broker"]["tls"], str(d))
        c = MQTTClient("node-2", "127.0.0.1", b.tls_port, ssl_context=ctx)
        c.connect()
        assert c.publish(f"edgeline/v1/{SITE}/node-2/evt", b"x", qos=1) == 1
        c.disconnect()
        bare = MQTTClient(
            "node-2", "127.0.0.1", b.tls_port, ssl_context=tls.client_context((d / "ca.der").read_bytes())
        )
        with pytest.raises(MQTTError):
            bare.connect()
            bare.publish(f"edgeline/v1/{SITE}/node-2/evt", b"x", qos=1)


TAKEOVER = """
import json
from edgeline_node import tls
from edgeline_node.mqtt import MQTTClient, MQTTError
def der(p):
    with open(p, 'rb') as f:
        return f.read()
def client(node, cid):
    d = ROOT + '/nodes/' + node + '/'
    ctx = tls.client_context(der(d + 'ca.der'), der(d + 'client.der'), der(d + 'client.key.der'))
    return MQTTClient(cid, '127.0.0.1', PORT, ssl_context=ctx, timeout_ms=3000)
victim = client('node-2', 'node-2')
victim.connect()
thief = client('node-1', 'node-2')  # node-1's certificate, node-2's client id
thief.connect()
victim.publish('edgeline/v1/plant-a/node-2/evt', b'still here', qos=1)
print(json.dumps({'victim': victim.connected}))
"""


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_a_node_cannot_take_over_another_nodes_client_id(tmp_path: Path) -> None:
    # use_username_as_clientid: the client id is the certificate's CN whatever the node
    # says, so node-1 claiming "node-2" does not disconnect node-2 (nor take its session).
    _require_mosquitto()
    b = TlsBroker(tmp_path, "ec")
    with b.mosquitto:
        r = run_micropython(f"ROOT = {str(b.out)!r}\nPORT = {b.tls_port}\n" + TAKEOVER, timeout=30)
        log = b.mosquitto.log_tail(30)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    assert json.loads(r.stdout.decode().strip().splitlines()[-1]) == {"victim": True}, log
    assert "as node-1" in log and "as node-2" in log


# -- 3. the node application itself over mutual TLS -------------------------------------------
class NodeSim:
    """`edgeline node sim --config FILE` as a child process (it becomes the MicroPython node);
    keeps its JSON log lines, stopped with its `stop` command or by PID."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.lines: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeline.host.cli", "node", "sim", "--config", str(config)],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if x.get("ev") == ev]

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                ended = self.proc.poll() is not None and self.proc.stderr is not None
                err = self.proc.stderr.read().decode() if ended and self.proc.stderr else ""
                raise AssertionError(f"timed out waiting for {what}; last lines {self.lines[-5:]}; {err}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._t.join(2)
        return self.proc.returncode


def sim_config(b: TlsBroker, node: str, tmp_path: Path, *, client_cert: bool = True) -> Path:
    """The node's provisioned config.json, pointed at the test listener, with fast windows;
    written beside the DER files (they are found relative to the config file)."""
    d = b.lay.node_dir(node)
    cfg = json.loads((d / "config.json").read_text())
    cfg["broker"]["port"] = b.tls_port
    cfg["window"] = {"samples": 64, "period_ms": 100}
    cfg["data_dir"] = str(tmp_path / f"{node}-data")
    if not client_cert:
        cfg["broker"]["tls"] = {"ca": "ca.der"}  # trusts the broker, presents nothing
    path = d / ("config.json" if client_cert else "config-no-cert.json")
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt cannot require client certificates
def test_the_node_sim_publishes_over_mutual_tls_and_is_refused_without_its_certificate(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    b = tls_broker
    gw = Gateway(b)
    root = f"edgeline/v1/{SITE}"
    nodes: list[NodeSim] = []
    try:
        # The gateway is online (retained state), so the node sends what it measures.
        online = cbor2.dumps({w.K_V: 1, w.K_KIND: w.KIND_STATE, w.K_NODE: w.GATEWAY_NODE, w.K_ONLINE: True})
        gw.c.publish(f"{root}/{w.GATEWAY_NODE}/state", online, qos=1, retain=True).wait_for_publish(5)
        good = NodeSim(sim_config(b, "node-1", tmp_path), tmp_path)
        bare = NodeSim(sim_config(b, "node-2", tmp_path, client_cert=False), tmp_path)
        nodes += [good, bare]
        evts: list[dict[int, Any]] = []
        births = 0
        deadline = time.monotonic() + 20
        while len(evts) < 10 and time.monotonic() < deadline:
            m = gw.take(0.5)
            if m is None or m.topic.endswith("/state"):
                continue
            assert not m.topic.startswith(f"{root}/node-2/"), f"node-2 got through uncertified: {m.topic}"
            if m.topic == f"{root}/node-1/evt":
                evts.append(cbor2.loads(m.payload))
            births += m.topic == f"{root}/node-1/birth"
        bare.wait_for(lambda: len(bare.events("disconnected")) >= 2, 20, "node-2 to be refused twice")
        assert good.stop() == 0
        assert bare.stop() == 0
        # Anything node-2 managed to send would be on its way by now.
        while (m := gw.take(0.5)) is not None:
            assert not m.topic.startswith(f"{root}/node-2/"), m.topic
    finally:
        for n in nodes:
            n.stop()
        gw.close()
    assert births >= 1 and len(evts) >= 10
    assert [e[w.K_SEQ] for e in evts] == sorted(e[w.K_SEQ] for e in evts)
    assert {e[w.K_NODE] for e in evts} == {"node-1"}
    (connected,) = good.events("connected")
    assert connected["tls"] is True
    assert good.events("gateway")[0]["online"] is True
    stopped = good.events("stopped")[-1]
    assert stopped["sent"] >= 10 and stopped["queue"] == 0
    # Refused at the handshake, over and over (with backoff), never connected, delivered nothing.
    assert bare.events("connected") == [] and bare.events("gateway") == []
    refusals = bare.events("disconnected")
    assert all(r["connected"] is False and "TLS handshake" in r["reason"] for r in refusals), refusals
    left = bare.events("stopped")[-1]
    assert left["sent"] == 0 and left["queue"] == len(bare.events("logged")) > 0  # all still on flash
    assert "peer did not return a certificate" in b.mosquitto.log_tail(200)
