"""`edgeline gateway run --config FILE`: the TOML config, validated at start.

Errors name the key and say what it must be.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import GatewayConfig


class GatewayConfigError(ValueError):
    pass


_SCHEMA: dict[str, dict[str, type]] = {
    "gateway": {"id": str, "site": str},
    "mqtt": {"host": str, "port": int, "user": str, "password": str},
    "opcua": {"host": str, "port": int},
}


def _check(raw: dict[str, Any]) -> None:
    for section, value in raw.items():
        if section not in _SCHEMA:
            raise GatewayConfigError(f"unknown section [{section}]; known: {', '.join(_SCHEMA)}")
        if not isinstance(value, dict):
            raise GatewayConfigError(f"[{section}] must be a table")
        for key, v in value.items():
            typ = _SCHEMA[section].get(key)
            if typ is None:
                raise GatewayConfigError(
                    f"unknown key {section}.{key}; known: {', '.join(_SCHEMA[section])}"
                )
            if not isinstance(v, typ) or isinstance(v, bool):
                raise GatewayConfigError(f"{section}.{key} must be a {typ.__name__}, got {v!r}")
    for section in ("mqtt", "opcua"):
        port = raw.get(section, {}).get("port")
        if port is not None and not 1 <= port <= 65535:
            raise GatewayConfigError(f"{section}.port must be 1..65535, got {port}")
    site = raw.get("gateway", {}).get("site", "+")
    if site != "+" and not w.valid_name(site):
        raise GatewayConfigError(f"gateway.site must be '+' or a valid name, got {site!r}")


def parse(raw: dict[str, Any]) -> GatewayConfig:
    _check(raw)
    g, m, o = raw.get("gateway", {}), raw.get("mqtt", {}), raw.get("opcua", {})
    d = GatewayConfig()
    return GatewayConfig(
        broker_host=m.get("host", d.broker_host),
        broker_port=m.get("port", d.broker_port),
        broker_user=m.get("user"),
        broker_password=m.get("password"),
        site=g.get("site", d.site),
        gateway_id=g.get("id", d.gateway_id),
        opcua_host=o.get("host", d.opcua_host),
        opcua_port=o.get("port", d.opcua_port),
    )


def load(path: Path) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise GatewayConfigError(f"cannot read gateway config {path}: {e}") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GatewayConfigError(f"gateway config {path} is not valid TOML: {e}") from e
    return parse(raw)
