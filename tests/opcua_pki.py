"""Test helpers for the gateway's OPC-UA security: a PKI folder with users and client identities,
and the messages a node sends (birth, scored window, death) for driving `Gateway.handle`."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.opcua_alarms import AlarmConfig
from edgeline.host.opcua_security import (
    SecurityConfig,
    add_user,
    make_application_certificate,
    write_certificate,
)
from edgeline.host.opcua_server import OpcuaServer
from edgeline.host.opcua_watch import ClientCredentials
from edgeline.host.ports import free_tcp_port

PASSWORDS = {"olga": "operator-pw-1", "victor": "viewer-pw-2"}


@dataclass
class Pki:
    cfg: SecurityConfig
    operator: ClientCredentials  # trusted certificate, operator account
    viewer: ClientCredentials  # trusted certificate, viewer account
    untrusted: ClientCredentials  # certificate NOT in the trust list, operator account


def client_identity(
    root: Path, name: str, username: str, password: str, *, trust: SecurityConfig | None
) -> ClientCredentials:
    uri = f"urn:edgeline:test:{name}"
    cert, key = make_application_certificate(
        uri, name, client=True, hostnames=["localhost", socket.gethostname()]
    )
    d = root / "clients" / name
    write_certificate(cert, key, d / "cert.der", d / "key.pem")
    if trust is not None:
        trust.trust(cert)
    return ClientCredentials(d / "cert.der", d / "key.pem", uri, username, password)


def make_pki(root: Path) -> Pki:
    cfg = SecurityConfig(root / "pki")
    add_user(cfg.users_path, "olga", "operator", PASSWORDS["olga"])
    add_user(cfg.users_path, "victor", "viewer", PASSWORDS["victor"])
    return Pki(
        cfg,
        client_identity(root, "scada", "olga", PASSWORDS["olga"], trust=cfg),
        client_identity(root, "hmi", "victor", PASSWORDS["victor"], trust=cfg),
        client_identity(root, "stranger", "olga", PASSWORDS["olga"], trust=None),
    )


@contextlib.asynccontextmanager
async def gateway(
    security: SecurityConfig | None, alarms: AlarmConfig | None = None
) -> AsyncIterator[Gateway]:
    """A gateway whose OPC-UA server runs (with `security`, None = unsecured), fed through
    `Gateway.handle` without MQTT."""
    port = free_tcp_port()
    gw = Gateway(GatewayConfig(opcua_port=port, site=SITE))
    # Until GatewayConfig carries the OPC-UA security settings, the tests put the server in.
    gw.opcua = OpcuaServer("127.0.0.1", port, security=security, alarms=alarms)
    await gw.opcua.start()
    try:
        yield gw
    finally:
        await gw.opcua.stop()
        gw.store.close()


async def send(gw: Gateway, node: str, kind: str, payload: bytes) -> None:
    await gw.handle(topic(node, kind), payload, time.time_ns() // 1000)


# -- node messages ------------------------------------------------------------------------------
SITE, LINE = "s1", "l1"


def topic(node: str, kind: str) -> str:
    return f"{w.TOPIC_ROOT}/{SITE}/{node}/{kind}"


SENSORS = {"vibration": ("g", ["mean", "rms"]), "current": ("A", ["mean", "rms"])}


def birth(
    node: str, machine: str, boot: int = 1, sensors: tuple[str, ...] = ("vibration", "current")
) -> bytes:
    return cbor2.dumps(
        {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: w.KIND_BIRTH,
            w.K_NODE: node,
            w.K_BOOT: boot,
            w.K_FW: "test",
            w.K_MODEL_SHA: None,
            w.K_SENSORS: [[name, *SENSORS[name]] for name in sensors],
            w.K_SITE: SITE,
            w.K_LINE: LINE,
            w.K_MACHINE: machine,
        }
    )


def death(node: str, boot: int = 1) -> bytes:
    return cbor2.dumps({w.K_V: w.SCHEMA_VERSION, w.K_KIND: w.KIND_DEATH, w.K_NODE: node, w.K_BOOT: boot})


def trace_of(node: str, seq: int) -> bytes:
    return (node.encode() + seq.to_bytes(4, "big")).ljust(16, b"\x5a")[:16]


def window(
    node: str, seq: int, score: float, boot: int = 1, sensors: tuple[str, ...] = ("vibration", "current")
) -> bytes:
    """A scored window: `score` on the first sensor (0.5 on the others); features [0.1 * seq, score]."""
    anomaly = score > 3.0
    first = sensors[0]
    return cbor2.dumps(
        {
            w.K_V: w.SCHEMA_VERSION,
            w.K_KIND: w.KIND_EVT,
            w.K_NODE: node,
            w.K_BOOT: boot,
            w.K_SEQ: seq,
            w.K_TRACE: trace_of(node, seq),
            w.K_SPAN: bytes(range(1, 9)),
            w.K_T_WALL: time.time_ns() // 1000,
            w.K_T_MONO: seq,
            w.K_FEATURES: {s: [0.1 * seq, score if s == first else 0.5] for s in sensors},
            w.K_SCORES: {s: score if s == first else 0.5 for s in sensors},
            w.K_ANOMALY: anomaly,
            w.K_CAUSES: [first] if anomaly else [],
            w.K_DETECTOR: "spc",
        }
    )
