"""`edgeline gateway run --config FILE`: the TOML config, validated at start.

Errors name the key and say what it must be. Example:

    [gateway]
    id = "line-1-gw"
    site = "plant-a"          # or "+" for every site on the broker
    state_dir = "/var/lib/edgeline"
    model = "models/demo-rotating-machine.tflite"   # optional gateway model

    [mqtt]
    host = "127.0.0.1"
    port = 1883

    [opcua]
    host = "0.0.0.0"
    port = 4840
    security = "sign-and-encrypt"   # the default; "none" is an explicit opt-out
    pki_dir = "opcua-pki"           # own/, trusted/, rejected/ (see docs/opcua.md)
    users_file = "opcua-users.toml"

    [alarms]                  # optional; scores in sigma units (docs/opcua.md)
    raise_threshold = 3.0
    clear_threshold = 2.0

    [metrics]                 # optional: Prometheus text at http://host:port/metrics
    port = 9108

    [uplink]                  # optional; kind = "none" | "mqtt" | "kafka"
    kind = "mqtt"
    host = "uplink.example"
    port = 8883

    [southbound]              # optional: the per-device keys that sign model/config pushes
    keys_file = "pki/plant-a/gateway/device-keys.json"   # what `edgeline provision` writes

`southbound.keys_file` is checked at load (a missing or malformed store fails the start,
naming the key); `southbound_keys()` / `load_southbound_keys()` return the `DeviceKeys` for
host/southbound.py's `Southbound`. `GatewayConfig` has no field for it yet, and
`edgeline gateway run` does not start a `Southbound` yet (docs/southbound.md).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import GatewayConfig
from edgeline.host.opcua_alarms import AlarmConfig
from edgeline.host.opcua_security import SecurityConfigError, security_from_config
from edgeline.host.southbound import DeviceKeys, SouthboundError
from edgeline.host.uplink import UplinkConfig


class GatewayConfigError(ValueError):
    pass


# section -> key -> (accepted types, GatewayConfig/UplinkConfig attribute)
_STR, _INT, _NUM, _TABLE = (str,), (int,), (int, float), (dict,)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "gateway": {
        "id": (_STR, "gateway_id"),
        "site": (_STR, "site"),
        "state_dir": (_STR, "state_dir"),
        "max_batch": (_INT, "max_batch"),
        "model": (_STR, "model_path"),
    },
    "metrics": {"host": (_STR, "metrics_host"), "port": (_INT, "metrics_port")},
    "mqtt": {
        "host": (_STR, "broker_host"),
        "port": (_INT, "broker_port"),
        "user": (_STR, "broker_user"),
        "password": (_STR, "broker_password"),
    },
    # security, pki_dir, users_file, hostnames: read by opcua_security.security_from_config
    "opcua": {
        "host": (_STR, "opcua_host"),
        "port": (_INT, "opcua_port"),
        "security": (_STR, ""),
        "pki_dir": (_STR, ""),
        "users_file": (_STR, ""),
        "hostnames": ((list,), ""),
    },
    "alarms": {
        "raise_threshold": (_NUM, "raise_threshold"),
        "clear_threshold": (_NUM, "clear_threshold"),
        "raise_count": (_INT, "raise_count"),
        "clear_count": (_INT, "clear_count"),
        "severity": (_INT, "severity"),
    },
    "uplink": {
        "kind": (_STR, "kind"),
        "host": (_STR, "host"),
        "port": (_INT, "port"),
        "client_id": (_STR, "client_id"),
        "username": (_STR, "username"),
        "password": (_STR, "password"),
        "tls_ca": (_STR, "tls_ca"),
        "tls_cert": (_STR, "tls_cert"),
        "tls_key": (_STR, "tls_key"),
        "bootstrap_servers": (_STR, "bootstrap_servers"),
        "topic": (_STR, "topic"),
        "kafka_config": (_TABLE, "kafka_config"),
        "max_bytes": (_INT, "max_bytes"),
        "max_age_s": (_NUM, "max_age_s"),
    },
    # keys_file: read by southbound_keys(), relative to the config file's folder
    "southbound": {"keys_file": (_STR, "")},
}


def _check_types(raw: dict[str, Any]) -> None:
    for section, value in raw.items():
        if section not in _SCHEMA:
            raise GatewayConfigError(f"unknown section [{section}]; known: {', '.join(_SCHEMA)}")
        if not isinstance(value, dict):
            raise GatewayConfigError(f"[{section}] must be a table")
        for key, v in value.items():
            spec = _SCHEMA[section].get(key)
            if spec is None:
                raise GatewayConfigError(f"unknown key {section}.{key}; known: {', '.join(_SCHEMA[section])}")
            types = spec[0]
            if not isinstance(v, types) or isinstance(v, bool):
                names = " or ".join(t.__name__ for t in types)
                raise GatewayConfigError(f"{section}.{key} must be a {names}, got {v!r}")


def _check_values(cfg: GatewayConfig) -> None:
    for key, port in (
        ("mqtt.port", cfg.broker_port),
        ("opcua.port", cfg.opcua_port),
        ("uplink.port", cfg.uplink.port),
    ):
        if not 1 <= port <= 65535:
            raise GatewayConfigError(f"{key} must be 1..65535, got {port}")
    if cfg.site != "+" and not w.valid_name(cfg.site):
        raise GatewayConfigError(f"gateway.site must be '+' or a valid name, got {cfg.site!r}")
    if not w.valid_name(cfg.gateway_id):
        raise GatewayConfigError(f"gateway.id must be 1-32 of A-Z a-z 0-9 _ -, got {cfg.gateway_id!r}")
    if not 1 <= cfg.max_batch <= 100_000:
        raise GatewayConfigError(f"gateway.max_batch must be 1..100000, got {cfg.max_batch}")
    if cfg.uplink.kind not in ("none", "mqtt", "kafka"):
        raise GatewayConfigError(f"uplink.kind must be 'none', 'mqtt' or 'kafka', got {cfg.uplink.kind!r}")
    if cfg.uplink.kind == "kafka" and not cfg.uplink.bootstrap_servers:
        raise GatewayConfigError("uplink.bootstrap_servers is required when uplink.kind = 'kafka'")
    if cfg.uplink.max_bytes <= 0 or cfg.uplink.max_age_s <= 0:
        raise GatewayConfigError("uplink.max_bytes and uplink.max_age_s must be positive")


def southbound_keys(raw: dict[str, Any], base_dir: Path | None = None) -> DeviceKeys | None:
    """The southbound key store `[southbound] keys_file` names (relative to `base_dir`, the
    config file's folder), or None when the config names none.

    :raises GatewayConfigError: naming the key and the file, when it cannot be used.
    """
    _check_types(raw)
    name = raw.get("southbound", {}).get("keys_file")
    if name is None:
        return None
    path = (base_dir or Path.cwd()) / Path(name).expanduser()
    try:
        return DeviceKeys.load(path)
    except SouthboundError as e:
        raise GatewayConfigError(
            f"southbound.keys_file: {e} (`edgeline provision` writes <site>/gateway/device-keys.json)"
        ) from e


def parse(raw: dict[str, Any], base_dir: Path | None = None) -> GatewayConfig:
    """A validated GatewayConfig; relative paths (OPC-UA PKI, users file) are relative to
    `base_dir` (the config file's folder), else to the working directory."""
    _check_types(raw)
    cfg = GatewayConfig()
    for section in ("gateway", "mqtt", "opcua", "metrics"):
        for key, v in raw.get(section, {}).items():
            attr = _SCHEMA[section][key][1]
            if attr:
                setattr(cfg, attr, v)
    try:
        cfg.opcua_security = security_from_config(raw.get("opcua", {}), base_dir=base_dir or Path.cwd())
    except SecurityConfigError as e:
        raise GatewayConfigError(str(e)) from e
    try:
        cfg.opcua_alarms = AlarmConfig(**{k: v for k, v in raw.get("alarms", {}).items()})
    except ValueError as e:
        raise GatewayConfigError(f"[alarms]: {e}") from e
    up = UplinkConfig()
    for key, v in raw.get("uplink", {}).items():
        setattr(up, _SCHEMA["uplink"][key][1], v)
    cfg.uplink = up
    _check_values(cfg)
    southbound_keys(raw, base_dir)  # fail at start on a store that cannot be used
    return cfg


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise GatewayConfigError(f"cannot read gateway config {path}: {e}") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GatewayConfigError(f"gateway config {path} is not valid TOML: {e}") from e


def load(path: Path) -> GatewayConfig:
    return parse(_read(path), base_dir=path.parent)


def load_southbound_keys(path: Path) -> DeviceKeys | None:
    """The `[southbound] keys_file` store of the gateway config at `path`, or None.

    :raises GatewayConfigError: the config or the store cannot be read.
    """
    return southbound_keys(_read(path), base_dir=path.parent)
