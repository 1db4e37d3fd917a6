"""Host code. Gateway -> node commands over MQTT: model and config pushes, time sync.

docs/southbound.md is the contract. A push is authenticated per device: its tag is
HMAC-SHA256(device key, sha256 || u32be(version) || node id), so a tag made for one node
(or one version) verifies nowhere else. The keys come from the gateway's key store that
`edgeline provision` writes (`DeviceKeys`, `<site>/gateway/device-keys.json`; each node's
bundle gets its own key as `nodes/<node>/device.key`); the node checks them with
firmware/edgeline_node/southbound.py, whose key numbers this module uses (they are proposed
for wire.py and move there together).

    keys = DeviceKeys.load(Path("site/gateway/device-keys.json"))
    sb = Southbound(SouthboundConfig(broker_host="127.0.0.1", broker_port=1883), keys)
    # against a provisioned broker: broker_port=8883 and tls_ca/tls_cert/tls_key = the
    # gateway's files from <site>/gateway/ (ca.crt.pem, gateway.crt.pem, gateway.key.pem)
    sb.start()                                       # also answers cmd/time/req from now on
    push = sb.push_model("plant-a", "node-1", model_bytes, version=3)
    ack = sb.wait_ack(push, timeout=30)              # the node's cmd/ack, or None
    sb.stop()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from edgeline.firmware.edgeline_node import southbound as sb
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.machine_state import MachineState
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("edgeline.southbound")

MAX_CHUNK = 2048  # model bytes per message: with its header, well inside a node's 4 KiB packet buffer
MAX_CONFIG = 2048  # bytes of CBOR config in one cmd/config message
KEY_BYTES = 32
KEYS_FILE_VERSION = 1
_U32 = 2**32 - 1


class SouthboundError(ValueError):
    """A command could not be made or sent, or a node's message broke the contract."""


# -- per-device keys ------------------------------------------------------------------------
def key_id(key: bytes) -> str:
    """A short public name for a key (16 hex digits of its sha256): safe to print and to keep
    in the provisioning manifest, to tell which key a node has without reading the secret."""
    return hashlib.sha256(key).hexdigest()[:16]


def _write_secret(path: Path, text: str) -> None:
    """Atomically (a temporary file renamed over `path`), mode 0600 whatever was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a leftover .tmp keeps its old mode through O_CREAT
        f.write(text)
    os.replace(tmp, path)


@dataclass
class DeviceKeys:
    """The per-device HMAC keys: the gateway's key store, written by `edgeline provision` as
    `<site>/gateway/device-keys.json` (JSON, mode 0600):

    {"version": 1, "keys": {"node-1": "<64 hex digits>", ...}}
    """

    keys: dict[str, bytes] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> DeviceKeys:
        """:raises SouthboundError: the file is missing, not JSON, or a key is malformed."""
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise SouthboundError(f"cannot read device keys file {path}: {e}") from e
        except ValueError as e:
            raise SouthboundError(f"device keys file {path} is not JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("version") != KEYS_FILE_VERSION:
            raise SouthboundError(f"device keys file {path}: expected {{'version': 1, 'keys': {{...}}}}")
        entries = raw.get("keys")
        if not isinstance(entries, dict):
            raise SouthboundError(f"device keys file {path}: 'keys' must map node id -> hex key")
        keys: dict[str, bytes] = {}
        for node, text in entries.items():
            if not w.valid_name(node):
                raise SouthboundError(f"device keys file {path}: {node!r} is not a valid node id")
            try:
                key = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                key = b""
            if len(key) < 16:
                raise SouthboundError(
                    f"device keys file {path}: key of node {node!r} must be at least 16 bytes of hex"
                )
            keys[node] = key
        return cls(keys, path)

    @classmethod
    def ensure(cls, path: Path, node_ids: Iterable[str]) -> DeviceKeys:
        """Load `path` (if it exists), add a fresh random key for each node that has none,
        and write it back. Existing keys are kept: re-running provisioning does not
        invalidate deployed nodes."""
        keys = cls.load(path) if path.exists() else cls(path=path)
        for node in node_ids:
            if not w.valid_name(node):
                raise SouthboundError(f"{node!r} is not a valid node id")
            if node not in keys.keys:
                keys.keys[node] = secrets.token_bytes(KEY_BYTES)
        keys.save(path)
        return keys

    def save(self, path: Path) -> None:
        """Atomically, with mode 0600 (it holds secrets)."""
        body = {"version": KEYS_FILE_VERSION, "keys": {n: k.hex() for n, k in sorted(self.keys.items())}}
        _write_secret(path, json.dumps(body, indent=2) + "\n")
        self.path = path

    def key_for(self, node: str) -> bytes:
        """:raises SouthboundError: naming the node and the keys file when it has no key."""
        try:
            return self.keys[node]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise SouthboundError(
                f"no device key for node {node!r}{where}: provision it before pushing to it"
            ) from None

    def write_node_key(self, node: str, path: Path) -> None:
        """The node's own copy (`device.key` beside its config, named by the node config's
        `southbound.key`): its key as 64 hex digits and a newline, atomically, mode 0600."""
        _write_secret(path, self.key_for(node).hex() + "\n")


# -- messages -------------------------------------------------------------------------------
def _check_target(node: str, version: int) -> None:
    if not w.valid_name(node):
        raise SouthboundError(f"{node!r} is not a valid node id")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= _U32:
        raise SouthboundError(f"version must be an integer 0..2**32-1, got {version!r}")


def _encode(m: dict[int, Any]) -> bytes:
    return cbor2.dumps(m, canonical=True)


def new_cmd_id() -> int:
    return secrets.randbelow(_U32 + 1)


def model_messages(
    model: bytes, *, node: str, key: bytes, version: int, cmd_id: int, max_chunk: int = MAX_CHUNK
) -> list[bytes]:
    """The cmd/model payloads of one push of `model` to `node`, in order.

    :raises SouthboundError: on an empty model, a bad node id, version or chunk size.
    """
    _check_target(node, version)
    if not model:
        raise SouthboundError("refusing to push an empty model")
    if not 1 <= max_chunk <= 64 * 1024:
        raise SouthboundError(f"max_chunk {max_chunk} must be 1..65536 bytes")
    sha = hashlib.sha256(model).digest()
    tag = sb.command_tag(key, sha, version, node)
    total = math.ceil(len(model) / max_chunk)
    head = {
        w.K_V: w.SCHEMA_VERSION,
        w.K_KIND: sb.KIND_CMD_MODEL,
        w.K_NODE: node,
        w.K_BOOT: 0,
        sb.K_CMD_ID: cmd_id,
        sb.K_VERSION: version,
        sb.K_SHA256: sha,
        sb.K_TAG: tag,
        sb.K_TOTAL: total,
        sb.K_SIZE: len(model),
    }
    view = memoryview(model)
    return [
        _encode(head | {sb.K_INDEX: i, sb.K_DATA: bytes(view[i * max_chunk : (i + 1) * max_chunk])})
        for i in range(total)
    ]


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """What a config push carries and hashes: the config as canonical CBOR."""
    return cbor2.dumps(dict(config), canonical=True)


def config_message(config: Mapping[str, Any], *, node: str, key: bytes, version: int, cmd_id: int) -> bytes:
    """The cmd/config payload: the config as CBOR bytes, their sha256 and the node's tag.

    :raises SouthboundError: on a config that is not a map or is over MAX_CONFIG bytes.
    """
    _check_target(node, version)
    if not isinstance(config, Mapping):
        raise SouthboundError(f"a config must be a map, got {type(config).__name__}")
    data = config_bytes(config)
    if len(data) > MAX_CONFIG:
        raise SouthboundError(f"config of {len(data)} bytes exceeds the {MAX_CONFIG}-byte limit")
    sha = hashlib.sha256(data).digest()
    return _encode(
        {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: sb.KIND_CMD_CONFIG,
            w.K_NODE: node,
            w.K_BOOT: 0,
            sb.K_CMD_ID: cmd_id,
            sb.K_VERSION: version,
            sb.K_SHA256: sha,
            sb.K_TAG: sb.command_tag(key, sha, version, node),
            sb.K_DATA: data,
        }
    )


@dataclass(frozen=True)
class CmdTopic:
    site: str
    node: str
    what: str  # "time/req" or "ack"


def parse_cmd_topic(topic: str) -> CmdTopic:
    """edgeline/v1/{site}/{node}/cmd/time/req or .../cmd/ack (what a node sends southbound)."""
    parts = topic.split("/")
    if "/".join(parts[:2]) != w.TOPIC_ROOT or len(parts) not in (6, 7) or parts[4] != "cmd":
        raise SouthboundError(f"topic {topic!r} is not {w.TOPIC_ROOT}/<site>/<node>/cmd/...")
    what = "/".join(parts[5:])
    if what not in ("time/req", "ack"):
        raise SouthboundError(f"topic {topic!r}: a node sends only cmd/time/req and cmd/ack")
    if not w.valid_name(parts[2]) or not w.valid_name(parts[3]):
        raise SouthboundError(f"topic {topic!r}: site and node must be valid names")
    return CmdTopic(parts[2], parts[3], what)


def _node_map(payload: bytes, t: CmdTopic, kind: int) -> dict[Any, Any]:
    if len(payload) > 1024:
        raise SouthboundError(f"payload of {len(payload)} bytes is too big for a {t.what} message")
    try:
        m = cbor2.loads(payload)
    except Exception as e:  # cbor2 raises several types; all mean "not CBOR we accept"
        raise SouthboundError(f"not valid CBOR: {e}") from e
    if not isinstance(m, dict) or m.get(w.K_V) != w.SCHEMA_VERSION:
        raise SouthboundError(f"not a schema {w.SCHEMA_VERSION} CBOR map")
    if m.get(w.K_KIND) != kind:
        raise SouthboundError(f"kind {m.get(w.K_KIND)!r} does not match topic cmd/{t.what}")
    if m.get(w.K_NODE) != t.node:
        raise SouthboundError(f"node id {m.get(w.K_NODE)!r} does not match the topic's {t.node!r}")
    return m


def _uint(m: dict[Any, Any], key: int, what: str, hi: int = _U32) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise SouthboundError(f"key {key} ({what}) must be an integer 0..{hi}, got {v!r}")
    return v


def time_response(payload: bytes, t: CmdTopic, t2_us: int, t3_us: int) -> bytes:
    """The cmd/time/resp payload for a node's cmd/time/req: t1 echoed, t2 and t3 our wall clock.

    :raises SouthboundError: the request broke the contract.
    """
    m = _node_map(payload, t, sb.KIND_TIME_REQ)
    t1 = _uint(m, sb.K_T1, "t1", 2**64 - 1)  # the node's ticks: wrap at 2**30, or 2**62 on unix
    return _encode(
        {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: sb.KIND_TIME_RESP,
            w.K_NODE: t.node,
            w.K_BOOT: 0,
            sb.K_T1: t1,
            sb.K_T2: t2_us,
            sb.K_T3: t3_us,
        }
    )


@dataclass(frozen=True)
class Ack:
    node: str
    boot: int
    cmd_id: int
    version: int
    status: str  # "ok" or a refusal code (firmware southbound.py lists them)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == sb.OK


def parse_ack(payload: bytes, t: CmdTopic) -> Ack:
    """:raises SouthboundError: the ack broke the contract."""
    m = _node_map(payload, t, sb.KIND_CMD_ACK)
    status = m.get(sb.K_STATUS)
    if not isinstance(status, str) or not 0 < len(status) <= 32:
        raise SouthboundError(f"key {sb.K_STATUS} (status) must be a short text, got {status!r}")
    reason = m.get(w.K_REASON, "")
    return Ack(
        node=t.node,
        boot=_uint(m, w.K_BOOT, "boot id"),
        cmd_id=_uint(m, sb.K_CMD_ID, "command id"),
        version=_uint(m, sb.K_VERSION, "version"),
        status=status,
        reason=reason[:200] if isinstance(reason, str) else "",
    )


# -- the MQTT side ----------------------------------------------------------------------------
@dataclass
class SouthboundConfig:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_user: str | None = None
    broker_password: str | None = None
    site: str = "+"  # whose time requests and acks to serve; "+" = every site
    gateway_id: str = "gateway"
    max_chunk: int = MAX_CHUNK
    # MQTT over mutual TLS (PEM files; `edgeline provision` writes them to <site>/gateway/):
    # tls_ca alone = check the broker only; with tls_cert and tls_key = present a client
    # certificate too. None = plain MQTT.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass
class Push:
    """One command sent to one node: what to wait for."""

    site: str
    node: str
    cmd_id: int
    version: int
    sha256: bytes
    messages: int
    infos: list[mqtt.MQTTMessageInfo] = field(default_factory=list, repr=False)

    def wait_published(self, timeout: float = 10.0) -> bool:
        """True once the broker acknowledged every message of the push (QoS1 PUBACK)."""
        deadline = time.monotonic() + timeout
        for info in self.infos:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(left)
            if not info.is_published():
                return False
        return True


AckListener = Callable[[Ack], None]


class Southbound:
    """Sends commands to nodes on its own MQTT connection and serves what nodes send back.

    Its own connection (clean session, client id `edgeline-southbound-<gateway id>`) keeps
    time answers off the gateway's ingest path: a time request is answered from paho's
    network thread at once, so t2/t3 are not delayed by event processing.
    """

    def __init__(
        self, cfg: SouthboundConfig, keys: DeviceKeys, *, clock_us: Callable[[], int] | None = None
    ) -> None:
        if not 1 <= cfg.max_chunk <= 64 * 1024:
            raise SouthboundError(f"max_chunk {cfg.max_chunk} must be 1..65536 bytes")
        self.cfg = cfg
        self.keys = keys
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self.counts: Counter[str] = Counter()  # time_answered, time_refused, acks, acks_refused
        self.acks: dict[tuple[str, int], Ack] = {}
        self.ack_listeners: list[AckListener] = []
        self._ack_cv = threading.Condition()
        self._connected = threading.Event()
        self._mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edgeline-southbound-{cfg.gateway_id}",
            clean_session=True,
        )
        if cfg.broker_user:
            self._mqtt.username_pw_set(cfg.broker_user, cfg.broker_password)
        if (cfg.tls_cert is None) != (cfg.tls_key is None) or (cfg.tls_cert and not cfg.tls_ca):
            raise SouthboundError("TLS needs tls_ca, and tls_cert and tls_key together (or neither)")
        if cfg.tls_ca:
            try:
                self._mqtt.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise SouthboundError(
                    f"cannot use the TLS files ca={cfg.tls_ca} cert={cfg.tls_cert} key={cfg.tls_key}: {e}"
                ) from e
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; blocks until subscribed (call via asyncio.to_thread from a loop).

        :raises ConnectionError: no broker within `timeout`.
        """
        self._mqtt.connect_async(self.cfg.broker_host, self.cfg.broker_port, keepalive=30)
        self._mqtt.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise ConnectionError(
                f"southbound could not connect to MQTT broker {self.cfg.broker_host}:{self.cfg.broker_port} "
                f"within {timeout:.0f} s"
            )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._connected.clear()

    # -- commands -------------------------------------------------------------------------
    def push_model(self, site: str, node: str, model: bytes, version: int) -> Push:
        """Publish `model` to one node as cmd/model chunks (QoS1); returns at once.

        :raises SouthboundError: no key for the node, or a bad argument.
        """
        if not w.valid_name(site):
            raise SouthboundError(f"{site!r} is not a valid site name")
        cmd_id = new_cmd_id()
        payloads = model_messages(
            model,
            node=node,
            key=self.keys.key_for(node),
            version=version,
            cmd_id=cmd_id,
            max_chunk=self.cfg.max_chunk,
        )
        topic = sb.topic(site, node, sb.KIND_CMD_MODEL)
        push = Push(site, node, cmd_id, version, hashlib.sha256(model).digest(), len(payloads))
        push.infos = [self._mqtt.publish(topic, p, qos=1) for p in payloads]
        log.info(
            "model push %d to %s/%s: version %d, %d bytes in %d chunks",
            cmd_id, site, node, version, len(model), len(payloads),
        )  # fmt: skip
        return push

    def push_model_to_machine(self, machine: MachineState, model: bytes, version: int) -> list[Push]:
        """One push per node of the machine, each with that node's own tag.

        :raises SouthboundError: before anything is sent, when a node of it has no key.
        """
        nodes = sorted(machine.nodes)
        if not nodes:
            raise SouthboundError(f"machine {machine.key} has no nodes")
        for n in nodes:
            self.keys.key_for(n)
        return [self.push_model(machine.site, n, model, version) for n in nodes]

    def push_config(self, site: str, node: str, config: Mapping[str, Any], version: int) -> Push:
        """Publish a config change to one node as one cmd/config message (QoS1)."""
        if not w.valid_name(site):
            raise SouthboundError(f"{site!r} is not a valid site name")
        cmd_id = new_cmd_id()
        key = self.keys.key_for(node)
        payload = config_message(config, node=node, key=key, version=version, cmd_id=cmd_id)
        push = Push(site, node, cmd_id, version, hashlib.sha256(config_bytes(config)).digest(), 1)
        push.infos = [self._mqtt.publish(sb.topic(site, node, sb.KIND_CMD_CONFIG), payload, qos=1)]
        log.info("config push %d to %s/%s: version %d", cmd_id, site, node, version)
        return push

    def wait_ack(self, push: Push, timeout: float = 30.0) -> Ack | None:
        """The node's ack of `push`, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        key = (push.node, push.cmd_id)
        with self._ack_cv:
            while key not in self.acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._ack_cv.wait(left)
            return self.acks[key]

    # -- paho thread ----------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("MQTT broker refused the southbound connection: %s", rc)
            return
        site = self.cfg.site
        root = f"{w.TOPIC_ROOT}/{site}/+/cmd"
        client.subscribe([(f"{root}/time/req", 0), (f"{root}/ack", 1)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        t2 = self._clock_us()
        try:
            t = parse_cmd_topic(msg.topic)
            if t.what == "time/req":
                self._answer_time(client, t, bytes(msg.payload), t2)
            else:
                self._on_ack(parse_ack(bytes(msg.payload), t))
        except SouthboundError as e:
            self.counts["refused"] += 1
            self._dead_letter(client, msg.topic, bytes(msg.payload), str(e))
        except Exception:  # a bug must not kill paho's thread
            log.exception("southbound failed on a message from %s", msg.topic)

    def _answer_time(self, client: mqtt.Client, t: CmdTopic, payload: bytes, t2: int) -> None:
        # t3 is read right before the answer is encoded and sent (the encode takes ~10 us).
        body = time_response(payload, t, t2, self._clock_us())
        client.publish(f"{w.TOPIC_ROOT}/{t.site}/{t.node}/cmd/time/resp", body, qos=0)
        self.counts["time_answered"] += 1

    def _on_ack(self, ack: Ack) -> None:
        self.counts["acks"] += 1
        (log.info if ack.ok else log.warning)(
            "node %s acked command %d (version %d): %s %s",
            ack.node, ack.cmd_id, ack.version, ack.status, ack.reason,
        )  # fmt: skip
        with self._ack_cv:
            self.acks[(ack.node, ack.cmd_id)] = ack
            if len(self.acks) > 10_000:  # bounded: forget the oldest
                self.acks.pop(next(iter(self.acks)))
            self._ack_cv.notify_all()
        for listener in self.ack_listeners:
            try:
                listener(ack)
            except Exception:
                log.exception("ack listener failed")

    def _dead_letter(self, client: mqtt.Client, topic: str, payload: bytes, reason: str) -> None:
        log.warning("dead letter from topic %s: %s", topic, reason)
        parts = topic.split("/")
        site = parts[2] if len(parts) > 2 and w.valid_name(parts[2]) else "gateway"
        body = {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: w.KIND_DEAD_LETTER,
            w.K_TOPIC: topic,
            w.K_REASON: reason,
            w.K_PAYLOAD: payload[:256],
        }
        client.publish(f"{w.TOPIC_ROOT}/{site}/{w.GATEWAY_NODE}/dead", _encode(body), qos=1)
