"""Gateway side of the wire contract: topic parsing, CBOR decoding and validation.

The numbers come from the firmware's own `wire` module so node and gateway cannot drift;
docs/wire-format.md is the prose. Anything that fails here is a dead letter, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cbor2
from edgeline.firmware.edgeline_node import wire as w

MAX_PAYLOAD = 16 * 1024  # bytes; a window event is ~300, a birth ~400
MAX_SENSORS = 64
MAX_FEATURES = 64
_U64 = 2**64 - 1
DETECTOR_CAUSES = ("model",)  # causes that are a detector over all sensors, not one sensor


class WireError(ValueError):
    """A message broke the wire contract; the text says which field and how."""


@dataclass(frozen=True)
class Topic:
    site: str
    node: str
    kind: str


@dataclass
class Birth:
    node: str
    boot: int
    site: str
    line: str
    machine: str
    firmware: str
    model_sha256: bytes | None
    sensors: list[tuple[str, str, list[str]]]
    drops: dict[int, int]
    window: tuple[int, int] | None


@dataclass
class Event:
    kind: int
    node: str
    boot: int
    seq: int
    trace_id: bytes
    span_id: bytes
    t_wall_us: int
    t_mono_us: int
    features: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    anomaly: bool = False
    causes: list[str] = field(default_factory=list)
    detector: str = ""
    extra: dict[int, Any] = field(default_factory=dict)

    @property
    def trace_hex(self) -> str:
        return self.trace_id.hex()


@dataclass
class Death:
    node: str
    boot: int


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != w.TOPIC_ROOT:
        raise WireError(f"topic {topic!r} is not {w.TOPIC_ROOT}/<site>/<node>/<kind>")
    site, node, kind = parts[2], parts[3], parts[4]
    if kind not in ("evt", "tel", "birth", "death"):
        raise WireError(f"topic {topic!r}: kind {kind!r} is not evt, tel, birth or death")
    if not _name_ok(site) or not _name_ok(node):
        raise WireError(f"topic {topic!r}: site and node must be valid names")
    return Topic(site, node, kind)


def _get(m: dict[Any, Any], key: int, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in m:
        raise WireError(f"missing key {key} ({what})")
    v = m[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise WireError(f"key {key} ({what}) has type {type(v).__name__}")
    return v


def _uint(m: dict[Any, Any], key: int, what: str, hi: int = _U64) -> int:
    v = _get(m, key, int, what)
    if not 0 <= v <= hi:
        raise WireError(f"key {key} ({what}) = {v} is out of range 0..{hi}")
    return int(v)


def _name(m: dict[Any, Any], key: int, what: str) -> str:
    v = _get(m, key, str, what)
    if not _name_ok(v):
        raise WireError(f"key {key} ({what}) = {v!r} is not a valid name")
    return str(v)


_NAMES_OK: set[str] = set()  # names already validated: most messages repeat the same few


def _name_ok(s: Any) -> bool:
    if s in _NAMES_OK:
        return True
    if not w.valid_name(s):
        return False
    if len(_NAMES_OK) < 65536:  # bounded: a flood of new names costs time, not memory
        _NAMES_OK.add(s)
    return True


def _finite_list(vals: list[Any], what: str) -> list[float]:
    """All finite numbers (not bools), as floats. Fast path: one type scan and one sum."""
    for x in vals:
        t = type(x)
        if t is not float and t is not int:
            return [_finite(x, what) for x in vals]  # reports the offending value
    total = sum(vals)
    if math.isfinite(total):  # NaN or an infinity anywhere makes the sum non-finite; an
        # overflow of finite values too, and then the slow path below accepts them
        return [float(x) for x in vals]
    return [_finite(x, what) for x in vals]


def _finite(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise WireError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def decode(payload: bytes) -> dict[Any, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        m = cbor2.loads(payload)
    except Exception as e:  # cbor2 raises several types; all mean "not CBOR we accept"
        raise WireError(f"not valid CBOR: {e}") from e
    if not isinstance(m, dict):
        raise WireError(f"payload is a CBOR {type(m).__name__}, not a map")
    v = m.get(w.K_V)
    if v != w.SCHEMA_VERSION:
        raise WireError(f"schema version {v!r} is not supported (this gateway speaks {w.SCHEMA_VERSION})")
    return m


def _check_identity(m: dict[Any, Any], topic: Topic, kind: int) -> tuple[str, int]:
    got_kind = _uint(m, w.K_KIND, "kind", 255)
    if got_kind != kind:
        raise WireError(f"kind {got_kind} does not match topic kind {topic.kind!r}")
    node = _name(m, w.K_NODE, "node id")
    if node != topic.node:
        raise WireError(f"node id {node!r} does not match the topic's {topic.node!r}")
    return node, _uint(m, w.K_BOOT, "boot id", 2**32 - 1)


def parse_event(m: dict[Any, Any], topic: Topic) -> Event:
    kind = w.KIND_EVT if topic.kind == "evt" else w.KIND_TEL
    node, boot = _check_identity(m, topic, kind)
    trace = _get(m, w.K_TRACE, bytes, "trace id")
    span = _get(m, w.K_SPAN, bytes, "span id")
    if len(trace) != 16 or trace == bytes(16):
        raise WireError("trace id must be 16 bytes and not all zero")
    if len(span) != 8 or span == bytes(8):
        raise WireError("span id must be 8 bytes and not all zero")
    ev = Event(
        kind=kind,
        node=node,
        boot=boot,
        seq=_uint(m, w.K_SEQ, "seq"),
        trace_id=bytes(trace),
        span_id=bytes(span),
        t_wall_us=_uint(m, w.K_T_WALL, "wall time"),
        t_mono_us=_uint(m, w.K_T_MONO, "monotonic time"),
    )
    if ev.seq == 0:
        raise WireError("seq must start at 1")
    if kind == w.KIND_EVT:
        feats = _get(m, w.K_FEATURES, dict, "features")
        scores = _get(m, w.K_SCORES, dict, "scores")
        if len(feats) > MAX_SENSORS or len(scores) > MAX_SENSORS:
            raise WireError(f"more than {MAX_SENSORS} sensors in one event")
        for s, vals in feats.items():
            if not _name_ok(s) or not isinstance(vals, list) or len(vals) > MAX_FEATURES:
                raise WireError(f"features of sensor {s!r} must be a list of at most {MAX_FEATURES}")
            ev.features[s] = _finite_list(vals, f"feature of {s}")
        for s, sc in scores.items():
            if not _name_ok(s):
                raise WireError(f"score for invalid sensor name {s!r}")
            ev.scores[s] = _finite(sc, f"score of {s}")
        ev.anomaly = bool(_get(m, w.K_ANOMALY, bool, "anomaly flag"))
        causes = _get(m, w.K_CAUSES, list, "causes")
        if not all(isinstance(c, str) and (c in ev.features or c in DETECTOR_CAUSES) for c in causes):
            raise WireError("causes must name sensors present in the features, or 'model'")
        ev.causes = list(causes)
        ev.detector = str(_get(m, w.K_DETECTOR, str, "detector"))[:32]
    else:
        ev.extra = {k: m[k] for k in (w.K_UPTIME_S, w.K_HEAP_FREE, w.K_QUEUE_DEPTH, w.K_DROPS) if k in m}
    return ev


def parse_birth(m: dict[Any, Any], topic: Topic) -> Birth:
    node, boot = _check_identity(m, topic, w.KIND_BIRTH)
    sensors_raw = _get(m, w.K_SENSORS, list, "sensors")
    if not 0 < len(sensors_raw) <= MAX_SENSORS:
        raise WireError(f"a birth must list 1..{MAX_SENSORS} sensors")
    sensors: list[tuple[str, str, list[str]]] = []
    for s in sensors_raw:
        if not (
            isinstance(s, list)
            and len(s) == 3
            and w.valid_name(s[0])
            and isinstance(s[1], str)
            and isinstance(s[2], list)
            and all(isinstance(f, str) for f in s[2])
        ):
            raise WireError(f"sensor entry {s!r} is not [name, unit, [feature names]]")
        sensors.append((s[0], s[1][:16], list(s[2])))
    sha = m.get(w.K_MODEL_SHA)
    if sha is not None and (not isinstance(sha, bytes) or len(sha) != 32):
        raise WireError("model sha256 must be 32 bytes or null")
    drops = m.get(w.K_DROPS, {})
    if not isinstance(drops, dict) or not all(
        isinstance(k, int) and isinstance(v, int) and v >= 0 for k, v in drops.items()
    ):
        raise WireError("drops must map priority -> count")
    win = m.get(w.K_WINDOW)
    window = None
    if win is not None:
        if not (isinstance(win, list) and len(win) == 2 and all(isinstance(x, int) for x in win)):
            raise WireError("window must be [sample rate, samples]")
        window = (win[0], win[1])
    site = _name(m, w.K_SITE, "site")
    if site != topic.site:
        raise WireError(f"site {site!r} does not match the topic's {topic.site!r}")
    return Birth(
        node=node,
        boot=boot,
        site=site,
        line=_name(m, w.K_LINE, "line"),
        machine=_name(m, w.K_MACHINE, "machine"),
        firmware=str(_get(m, w.K_FW, str, "firmware"))[:32],
        model_sha256=sha,
        sensors=sensors,
        drops=dict(drops),
        window=window,
    )


def parse_death(m: dict[Any, Any], topic: Topic) -> Death:
    node, boot = _check_identity(m, topic, w.KIND_DEATH)
    return Death(node, boot)


def encode(m: dict[int, Any]) -> bytes:
    """Gateway-side encoder: cbor2 with preferred (canonical) serialization."""
    return cbor2.dumps(m, canonical=True)
