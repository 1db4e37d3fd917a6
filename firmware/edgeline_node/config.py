# Device code. The node's one JSON config file, validated at boot: an error names the key.
import json

from . import wire
from .features import BAND_SENSORS
from .hal_config import HAL_DEFAULTS, check_hal

DEFAULTS = {
    "node_id": None,
    "site": "site",
    "line": "line",
    "machine": None,
    # broker.tls: None (plain MQTT) or {"ca": ..., "cert": ..., "key": ...}, DER file names
    # relative to the config file's folder (what `edgeline provision` writes; see tls.py).
    # broker.inflight: QoS 1 records sent ahead of their PUBACK (the flash queue's in-flight
    # window); the MQTT client gets one more slot for the birth and one for command acks.
    "broker": {"host": "127.0.0.1", "port": 1883, "user": None, "password": None, "keepalive": 30,
               "tls": None, "inflight": 8},
    "hal": HAL_DEFAULTS,  # hal_config.py documents and checks this section
    # window.period_ms 0: no waiting between windows, as fast as the HAL delivers them (the
    # sim HAL then runs in simulated time, faster than real time: soak and heap tests).
    # window.samples: a power of two when a vibration sensor is configured (its FFT band
    # energies, docs/features.md); any 8..4096 otherwise.
    "window": {"samples": 256, "period_ms": 500},
    "spc": {"calibration": 20, "k_sigma": 3.0, "run": 2},
    "telemetry_every": 10,
    "data_dir": "data",
    # The int8 detector (a .tflite from models/): path null = control charts only. sha256,
    # when given, must match the file: the node refuses a model nobody commissioned.
    "model": {"path": None, "sha256": None},
    # The flash queue (docs/store-and-forward.md). dir: relative to data_dir unless it starts
    # with "/". max_messages is from the RAM queue it replaced: still accepted, not used.
    "queue": {"dir": "queue", "capacity_bytes": 262144, "segment_bytes": 16384, "commit_every": 32,
              "commit_ms": 5000, "max_messages": 256},
    # Southbound commands (docs/southbound.md). key: the per-device key file (64 hex digits),
    # relative to the config file's folder; null = southbound off (no cmd/ subscription, no
    # time requests). max_model_bytes: the size of each of the two model slots in data_dir.
    # time_every_s: how often to ask the gateway for the time (and once after every connect).
    "southbound": {"key": None, "max_model_bytes": 65536, "time_every_s": 60},
}

# What a config push (cmd/config) may not change: who the node is, where it keeps its state,
# and the key that authenticates pushes. Everything else is validated as a whole config.
PUSH_REFUSED = ("node_id", "site", "data_dir", "southbound")
# What a push changes at once, without a reboot; anything else it changes takes effect at the
# next boot (the node persists the push in data_dir).
PUSH_LIVE = ("spc.k_sigma", "spc.run", "telemetry_every", "window.period_ms")


# Score keys of an event that are not sensors (docs/wire-format.md): no sensor may be named so.
RESERVED_SENSOR_NAMES = ("model", "xbar_r", "gateway")


class ConfigError(ValueError):
    pass


def sensor_names(hal):
    """The names of the sensors the validated "hal" section gives, in the HAL's order, with
    the config key that names each: [(name, key), ...]."""
    kind = hal["kind"]
    if kind == "sim":
        from .hal_sim import SENSORS  # the sim node imports it anyway

        return [(name, "hal.kind") for name, _unit in SENSORS]
    if kind == "stdin":
        return [(s[0], "hal.stdin.sensors") for s in hal["stdin"]["sensors"]]
    out = []  # a board: hal_board.BoardHAL's order
    if hal["accel"]["chip"]:
        out.append(("vibration", "hal.accel.chip"))
    if hal["temperature"]["chip"]:
        out.append(("temperature", "hal.temperature.chip"))
    if hal["current"]["chip"]:
        out.append(("current", "hal.current.chip"))
    if hal["adc"]["pin"] is not None:
        out.append((hal["adc"]["name"], "hal.adc.name"))
    return out


def _check_window(cfg):
    # A band sensor's FFT is radix 2: refuse other window sizes at boot (and in a push), naming
    # the key and the nearest sizes, rather than silently computing bands on part of a window.
    n = cfg["window"]["samples"]
    for name, key in sensor_names(cfg["hal"]):
        _need(name not in RESERVED_SENSOR_NAMES, key, "gives a sensor named %r, which is reserved for a score "
              "in events (%s): name it otherwise" % (name, ", ".join(RESERVED_SENSOR_NAMES)))
        if name in BAND_SENSORS and n & (n - 1):
            lo = 8
            while lo * 2 < n:
                lo *= 2
            _need(False, "window.samples", "must be a power of two when a %s sensor is configured (its FFT "
                  "band energies need one), got %d: set %d or %d (docs/features.md)" % (name, n, lo, lo * 2))


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


def _check_tls(tls):
    if tls is None:
        return
    _need(isinstance(tls, dict), "broker.tls", "must be null or an object with ca, cert, key")
    for key in tls:
        _need(key in ("ca", "cert", "key"), "broker.tls." + key, "is unknown; known keys: ca, cert, key")
    _need(isinstance(tls.get("ca"), str) and tls["ca"], "broker.tls.ca",
          "must name the CA certificate file (DER)")
    for key in ("cert", "key"):
        _need(tls.get(key) is None or (isinstance(tls[key], str) and tls[key]), "broker.tls." + key,
              "must name a DER file, or be null")
    _need((tls.get("cert") is None) == (tls.get("key") is None), "broker.tls",
          "needs both cert and key (a client certificate and its key), or neither")


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
    _check_tls(cfg["broker"]["tls"])
    _int_in(cfg, "broker.inflight", 1, 64)
    check_hal(cfg["hal"], ConfigError)
    _int_in(cfg, "window.samples", 8, 4096)
    _check_window(cfg)
    p = cfg["window"]["period_ms"]
    _need(p == 0 or (isinstance(p, int) and not isinstance(p, bool) and 10 <= p <= 3600000), "window.period_ms",
          "must be 0 (as fast as possible) or an integer from 10 to 3600000, got %r" % (p,))
    _int_in(cfg, "spc.calibration", 2, 100000)
    _int_in(cfg, "spc.run", 1, 100)
    k = cfg["spc"]["k_sigma"]
    _need(isinstance(k, (int, float)) and 0 < k <= 20, "spc.k_sigma", "must be a number in (0, 20], got %r" % (k,))
    _int_in(cfg, "telemetry_every", 0, 100000)
    _int_in(cfg, "queue.max_messages", 1, 100000)
    q = cfg["queue"]
    _need(isinstance(q["dir"], str) and q["dir"] and "\x00" not in q["dir"], "queue.dir",
          "must be a folder name or path, got %r" % (q["dir"],))
    # A segment holds at least one record of the largest message (2 KiB) plus its header.
    _int_in(cfg, "queue.segment_bytes", 4096, 1048576)
    _int_in(cfg, "queue.capacity_bytes", 8192, 2**30)
    _need(q["capacity_bytes"] >= 2 * q["segment_bytes"], "queue.capacity_bytes",
          "must be at least 2 * queue.segment_bytes (%d), got %d" % (2 * q["segment_bytes"], q["capacity_bytes"]))
    _int_in(cfg, "queue.commit_every", 1, 100000)
    _int_in(cfg, "queue.commit_ms", 0, 3600000)
    _need(isinstance(cfg["data_dir"], str), "data_dir", "must be a path")
    mp = cfg["model"]["path"]
    _need(mp is None or (isinstance(mp, str) and mp), "model.path", "must be a .tflite file path or null")
    sha = cfg["model"]["sha256"]
    _need(sha is None or (isinstance(sha, str) and len(sha) == 64
                          and all(c in "0123456789abcdef" for c in sha)),
          "model.sha256", "must be 64 lowercase hex characters or null, got %r" % (sha,))
    sb = cfg["southbound"]
    _need(sb["key"] is None or (isinstance(sb["key"], str) and sb["key"]), "southbound.key",
          "must name the device key file (from provisioning), or be null (southbound off)")
    _int_in(cfg, "southbound.max_model_bytes", 1024, 4194304)
    _int_in(cfg, "southbound.time_every_s", 5, 86400)
    return cfg


def overlay(cfg, patch, prefix=""):
    """A copy of the config `cfg` with the (partial) config `patch` merged in, section by
    section: what a config push sends. Validate the result (validate() names a bad key)."""
    if not isinstance(patch, dict):
        raise ConfigError("config %s must be an object" % (repr(prefix[:-1]) if prefix else "push"))
    out = {}
    for key in cfg:
        out[key] = cfg[key]
    for key in patch:
        if not isinstance(key, str):
            raise ConfigError("config push key %r is not a string" % (key,))
        if key in cfg and isinstance(cfg[key], dict) and isinstance(patch[key], dict):
            out[key] = overlay(cfg[key], patch[key], prefix + key + ".")
        else:
            out[key] = patch[key]
    return out


def changed(old, new, prefix=""):
    """The dotted keys whose values differ between two validated configs, sorted."""
    out = []
    for key in new:
        a = old.get(key)
        b = new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed(a, b, prefix + key + "."))
        elif a != b:
            out.append(prefix + key)
    out.sort()
    return out


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
