# Device code. The node's one JSON config file, validated at boot: an error names the key.
import json

from . import wire

DEFAULTS = {
    "node_id": None,
    "site": "site",
    "line": "line",
    "machine": None,
    "broker": {"host": "127.0.0.1", "port": 1883, "user": None, "password": None, "keepalive": 30},
    "hal": {"kind": "sim", "seed": 1, "rate_hz": 1000},
    "window": {"samples": 256, "period_ms": 500},
    "spc": {"calibration": 20, "k_sigma": 3.0, "run": 2},
    "telemetry_every": 10,
    "data_dir": "data",
    "queue": {"max_messages": 256},
}


class ConfigError(ValueError):
    pass


def _merge(defaults, given, prefix):
    out = {}
    for key in given:
        if key not in defaults:
            raise ConfigError("config key %r is unknown; known keys: %s" % (
                prefix + key, ", ".join(sorted(defaults))))
    for key, default in defaults.items():
        value = given.get(key, default)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError("config key %r must be an object" % (prefix + key))
            value = _merge(default, value, prefix + key + ".")
        out[key] = value
    return out


def _need(cond, key, what):
    if not cond:
        raise ConfigError("config key %r %s" % (key, what))


def _int_in(cfg, key, lo, hi):
    section, _, name = key.rpartition(".")
    value = cfg[section][name] if section else cfg[name]
    _need(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
          key, "must be an integer from %d to %d, got %r" % (lo, hi, value))


def validate(given):
    if not isinstance(given, dict):
        raise ConfigError("config must be a JSON object")
    cfg = _merge(DEFAULTS, given, "")
    for key in ("node_id", "site", "line", "machine"):
        _need(wire.valid_name(cfg[key]), key,
              "must be 1-32 characters of A-Z a-z 0-9 _ - not starting with '_', got %r" % (cfg[key],))
    _need(isinstance(cfg["broker"]["host"], str) and cfg["broker"]["host"], "broker.host",
          "must be a host name or address")
    _int_in(cfg, "broker.port", 1, 65535)
    _int_in(cfg, "broker.keepalive", 5, 3600)
    _need(cfg["hal"]["kind"] == "sim", "hal.kind", "must be 'sim' on this build, got %r" % (cfg["hal"]["kind"],))
    _int_in(cfg, "hal.seed", 0, 2**30)
    _int_in(cfg, "hal.rate_hz", 1, 100000)
    _int_in(cfg, "window.samples", 8, 4096)
    _int_in(cfg, "window.period_ms", 10, 3600000)
    _int_in(cfg, "spc.calibration", 2, 100000)
    _int_in(cfg, "spc.run", 1, 100)
    k = cfg["spc"]["k_sigma"]
    _need(isinstance(k, (int, float)) and 0 < k <= 20, "spc.k_sigma", "must be a number in (0, 20], got %r" % (k,))
    _int_in(cfg, "telemetry_every", 0, 100000)
    _int_in(cfg, "queue.max_messages", 1, 100000)
    _need(isinstance(cfg["data_dir"], str), "data_dir", "must be a path")
    return cfg


def load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read config file %r: %s" % (path, e))
    try:
        given = json.loads(text)
    except ValueError as e:
        raise ConfigError("config file %r is not valid JSON: %s" % (path, e))
    return validate(given)
