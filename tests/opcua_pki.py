"""Test helpers for the gateway's OPC-UA security: a PKI folder with users and client identities,
and the births and scored windows of the machines these tests watch (built with wire_messages),
for driving `Gateway.handle`."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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

import wire_messages

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
    return wire_messages.birth(
        node, machine, site=SITE, line=LINE, boot=boot, sensors=[(name, *SENSORS[name]) for name in sensors]
    )


def trace_of(node: str, seq: int) -> bytes:
    return (node.encode() + seq.to_bytes(4, "big")).ljust(16, b"\x5a")[:16]


def window(
    node: str, seq: int, score: float, boot: int = 1, sensors: tuple[str, ...] = ("vibration", "current")
) -> bytes:
    """A scored window: `score` on the first sensor (0.5 on the others); features [0.1 * seq, score]."""
    anomaly = score > 3.0
    first = sensors[0]
    return wire_messages.event(
        node,
        seq,
        boot=boot,
        trace=trace_of(node, seq),
        t_wall_us=time.time_ns() // 1000,
        t_mono_us=seq,
        features={s: [0.1 * seq, score if s == first else 0.5] for s in sensors},
        scores={s: score if s == first else 0.5 for s in sensors},
        anomaly=anomaly,
        causes=[first] if anomaly else [],
    )
