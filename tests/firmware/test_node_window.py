"""One node window, end to end inside the node: per-sensor features, the individuals chart and
the X-bar/R chart, into the event and the birth. The same scenario runs the real `Node` (no
broker: windows are taken by hand and the stored messages captured) under CPython and under
the MicroPython unix port, through one parametrised fixture.

The HAL is scripted so that each chart's answer is known: every window is the same until the
temperature's sample-to-sample spread triples with its mean unchanged. The individuals chart
(on the temperature's window mean) cannot see that; the X-bar/R chart's R chart must, and
its score and cause must reach the event as the wire contract says (docs/wire-format.md).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from edgeline.firmware.edgeline_node import cbor, features
from edgeline.firmware.edgeline_node import node as node_mod

from micropython_runner import run_micropython

CALIBRATION = 20

# Given: N (the node module), cbor, math, req. run() returns a JSON-able dict.
_SCENARIO = """
class ScriptedHAL:
    # vibration and current: the same sines every window; temperature: 38 +- a, alternating.
    def __init__(self):
        self.a = 0.05

    def sensors(self):
        return (("vibration", "g"), ("temperature", "degC"), ("current", "A"))

    def read_window(self, bufs):
        vib = bufs[0]
        temp = bufs[1]
        cur = bufs[2]
        a = self.a
        for i in range(len(vib)):
            vib[i] = 0.5 * math.sin(2.0 * math.pi * 25.0 * i / 1000.0)
            temp[i] = 38.0 + (a if i & 1 else -a)
            cur[i] = 12.7 * math.sin(2.0 * math.pi * 50.0 * i / 1000.0)

    def set_fault(self, name):
        self.a = 0.15 if name == "spread" else 0.05


def run():
    N.log = lambda event, **fields: None
    node = N.Node(N.validate(req["cfg"]))
    node.hal = ScriptedHAL()
    events = []
    node._store = lambda prio, kind, m: events.append(m) if kind == 1 else None
    for _ in range(req["calibration"] + 2):
        node.window()
    node.hal.set_fault("spread")
    for _ in range(2):
        node.window()
    out = []
    for m in events:
        out.append({"features": {s: len(v) for s, v in m[10].items()}, "scores": m[11], "anomaly": m[12],
                    "causes": m[13], "detector": m[14]})
    return {"birth": cbor.loads(node.birth())[22], "events": out, "last": events[-1][10],
            "size": len(cbor.dumps(events[-1])),
            "scratch": [len(node.fx[0]._fft_scratch.re), len(node.fx[0]._fft_scratch.cos_q)]}
"""

_MP_MAIN = """
import sys, json, math
from edgeline_node import node as N, cbor
req = json.loads(sys.stdin.read())
"""


def _request(tmp: Path) -> dict[str, Any]:
    cfg = {
        "node_id": "n1",
        "machine": "m1",
        "data_dir": str(tmp / "data"),
        "broker": {"port": 1},  # never connected: the test takes the windows itself
        "window": {"samples": 256, "period_ms": 0},
        "spc": {"calibration": CALIBRATION, "k_sigma": 3.0, "run": 2},
        "telemetry_every": 0,
    }
    return {"cfg": cfg, "calibration": CALIBRATION}


def _cpython(tmp: Path) -> dict[str, Any]:
    import math

    g: dict[str, Any] = {"N": node_mod, "cbor": cbor, "math": math, "req": _request(tmp)}
    exec(_SCENARIO, g)
    res: dict[str, Any] = json.loads(json.dumps(g["run"]()))
    return res


def _micropython(tmp: Path) -> dict[str, Any]:
    script = _MP_MAIN + _SCENARIO + "\nprint(json.dumps(run()))\n"
    r = run_micropython(script, stdin=json.dumps(_request(tmp)).encode(), timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    res: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return res


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(_cpython, id="cpython"),
        pytest.param(_micropython, id="micropython", marks=pytest.mark.micropython),
    ],
)
def result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    res: dict[str, Any] = request.param(tmp_path_factory.mktemp("node"))
    return res


def test_birth_names_each_sensors_own_features(result: dict[str, Any]) -> None:
    assert result["birth"] == [
        ["vibration", "g", list(features.feature_names("vibration"))],
        ["temperature", "degC", list(features.feature_names("temperature"))],
        ["current", "A", list(features.feature_names("current"))],
    ]
    for ev in result["events"]:
        assert ev["features"] == {"vibration": 10, "temperature": 6, "current": 6}
    # The vibration FFT works in the shared scratch: n/2 re (and im), n/4 + 1 cosines.
    assert result["scratch"] == [128, 65]


def test_features_travel_as_float32(result: dict[str, Any]) -> None:
    # The node keeps its features in array('f'), like its samples: every value is a float32,
    # which the CBOR codec writes in 5 bytes (preferred serialization) on every port.
    for sensor, vals in result["last"].items():
        assert vals == [struct.unpack("<f", struct.pack("<f", v))[0] for v in vals], sensor
    floats = sum(len(v) for v in result["last"].values())
    assert floats == 22
    assert result["size"] < 300  # 22 features x 5 bytes, 4 scores, ids, trace: ~280 bytes


def test_xbar_r_score_is_reported_beside_the_sensor_scores(result: dict[str, Any]) -> None:
    evs = result["events"]
    for ev in evs:
        assert set(ev["scores"]) == {"vibration", "temperature", "current", node_mod.XR_SCORE_KEY}
        assert ev["detector"] == "spc"
    for ev in evs[:CALIBRATION]:  # calibrating: no score yet
        assert ev["scores"][node_mod.XR_SCORE_KEY] == 0.0
    for ev in evs[CALIBRATION : CALIBRATION + 2]:  # the same windows again: in control
        assert ev["scores"][node_mod.XR_SCORE_KEY] < 1.0
        assert not ev["anomaly"] and ev["causes"] == []


def test_xbar_r_sees_a_spread_the_individuals_chart_cannot(result: dict[str, Any]) -> None:
    first, second = result["events"][-2:]
    # Same window mean: the temperature's individuals chart stays at 0 sigma.
    assert first["scores"]["temperature"] == 0.0 and second["scores"]["temperature"] == 0.0
    # R triples: (3 R-bar - R-bar) / ((D4 - 1) R-bar / 3) = 6 / 1.114 = 5.4 sigma for n = 5.
    assert first["scores"]["xbar_r"] == pytest.approx(6 / 1.114, rel=1e-3)
    assert not first["anomaly"] and first["causes"] == []  # one window beyond: not yet (run 2)
    assert second["anomaly"] and second["causes"] == ["temperature"]
