"""The host feature pipeline equals the node's `features.compute`, under CPython and under the
MicroPython unix port, for float64 windows and for float32 windows (the node keeps its samples
in `array('f')`). Tolerance rtol 1e-9; in practice the results agree to the last bit, because
the host accumulates its sums in the node's order."""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable

import numpy as np
import pytest
from edgeline.firmware.edgeline_node import features as node_features
from edgeline.quantize import features as host_features
from edgeline.quantize import synthetic

from micropython_runner import run_micropython

RTOL = 1e-9

_MP_SCRIPT = """
import sys, json
from array import array
from edgeline_node import features
req = json.loads(sys.stdin.read())
out = []
for w in req["windows"]:
    buf = array(req["typecode"], w)
    f = [0.0] * len(features.FEATURE_NAMES)
    features.compute(buf, f)
    out.append(f)
print(json.dumps({"names": list(features.FEATURE_NAMES), "features": out}))
"""

_MP_SENSOR_SCRIPT = """
import sys, json
from array import array
from edgeline_node import features
req = json.loads(sys.stdin.read())
out = []
names = {}
for sensor, w in req["windows"]:
    buf = array(req["typecode"], w)
    fx = features.Features(sensor, len(buf))
    f = [0.0] * len(fx.names)
    fx.compute(buf, f)
    names[sensor] = list(fx.names)
    out.append(f)
print(json.dumps({"names": names, "features": out}))
"""

NodeFn = Callable[[list[np.ndarray], str], np.ndarray]
SensorFn = Callable[[list[tuple[str, np.ndarray]], str], list[np.ndarray]]


def _cpython(windows: list[np.ndarray], typecode: str) -> np.ndarray:
    out = []
    for w in windows:
        f = [0.0] * len(node_features.FEATURE_NAMES)
        node_features.compute(array(typecode, w.tolist()), f)
        out.append(f)
    return np.array(out)


def _micropython(windows: list[np.ndarray], typecode: str) -> np.ndarray:
    req = {"typecode": typecode, "windows": [w.tolist() for w in windows]}
    r = run_micropython(_MP_SCRIPT, stdin=json.dumps(req).encode())
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert res["names"] == list(host_features.FEATURE_NAMES)
    return np.array(res["features"])


@pytest.fixture(
    params=[
        pytest.param(_cpython, id="cpython"),
        pytest.param(_micropython, id="micropython", marks=pytest.mark.micropython),
    ]
)
def node(request: pytest.FixtureRequest) -> NodeFn:
    fn: NodeFn = request.param
    return fn


def _cpython_sensor(windows: list[tuple[str, np.ndarray]], typecode: str) -> list[np.ndarray]:
    out = []
    for sensor, w in windows:
        fx = node_features.Features(sensor, len(w))
        assert fx.names == host_features.feature_names(sensor)
        out.append(np.array(fx.compute(array(typecode, w.tolist()), [0.0] * len(fx.names))))
    return out


def _micropython_sensor(windows: list[tuple[str, np.ndarray]], typecode: str) -> list[np.ndarray]:
    req = {"typecode": typecode, "windows": [[s, w.tolist()] for s, w in windows]}
    r = run_micropython(_MP_SENSOR_SCRIPT, stdin=json.dumps(req).encode())
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    for sensor, names in res["names"].items():
        assert tuple(names) == host_features.feature_names(sensor)
    return [np.array(f) for f in res["features"]]


@pytest.fixture(
    params=[
        pytest.param(_cpython_sensor, id="cpython"),
        pytest.param(_micropython_sensor, id="micropython", marks=pytest.mark.micropython),
    ]
)
def node_sensor(request: pytest.FixtureRequest) -> SensorFn:
    fn: SensorFn = request.param
    return fn


def _windows() -> list[np.ndarray]:
    rng = np.random.default_rng(2024)
    sim = synthetic.generate(4, seed=5, schedule=["none", "bearing_outer", "imbalance", "misalignment"])
    ws = [
        rng.normal(0.0, 1.0, 256),
        rng.normal(38.0, 0.05, 256),  # an offset-heavy temperature: s2/n - mean^2 cancels hard
        rng.uniform(-1e-3, 1e-3, 64),
        np.full(32, 2.5),  # a flat window: variance rounds to (about) zero
        np.zeros(16),  # rms 0: crest defined as 0
        np.array([-3.0]),  # one sample
        np.array([1e6, -1e6, 3.0, 0.5]),
        rng.standard_cauchy(128),  # heavy tails: big peaks and crest
    ]
    ws += [sim.samples[k, s] for k in range(4) for s in range(3)]
    return ws


def test_feature_names_match_the_node() -> None:
    assert tuple(node_features.FEATURE_NAMES) == host_features.FEATURE_NAMES


def test_float64_windows_match_the_node(node: NodeFn) -> None:
    ws = _windows()
    got = node(ws, "d")
    want = np.array([host_features.window_features(w) for w in ws])
    np.testing.assert_allclose(want, got, rtol=RTOL, atol=0.0)


def test_float32_windows_match_the_node(node: NodeFn) -> None:
    ws32 = [w.astype(np.float32) for w in _windows()]
    # The node stores each window in array('f'); the host gets the same float32 samples.
    got = node([w.astype(np.float64) for w in ws32], "f")
    want = np.array([host_features.window_features(w) for w in ws32])
    np.testing.assert_allclose(want, got, rtol=RTOL, atol=0.0)


def test_stacked_windows_equal_one_by_one() -> None:
    ws = np.random.default_rng(1).normal(size=(5, 100))
    stacked = host_features.window_features(ws)
    assert stacked.shape == (5, len(host_features.FEATURE_NAMES))
    for k in range(5):
        np.testing.assert_array_equal(stacked[k], host_features.window_features(ws[k]))


def test_feature_values_by_hand() -> None:
    # x = [3, -4]: mean -0.5, s2/n = 12.5, var = 12.25, std 3.5, rms sqrt(12.5), peak 4.
    f = dict(
        zip(host_features.FEATURE_NAMES, host_features.window_features(np.array([3.0, -4.0])), strict=True)
    )
    assert f["mean"] == -0.5
    assert f["std"] == 3.5
    assert f["rms"] == pytest.approx(12.5**0.5, rel=1e-15)
    assert f["peak"] == 4.0
    assert f["crest"] == pytest.approx(4.0 / 12.5**0.5, rel=1e-15)


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        host_features.window_features(np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        host_features.window_features(np.zeros((2, 2, 2)))


def test_causal_mean_uses_only_past_rows() -> None:
    x = np.array([1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(host_features.causal_mean(x, 2), [1.0, 1.5, 2.5, 6.5])
    y = x.copy()
    y[3] = -100.0  # changing the future leaves the past alone
    np.testing.assert_array_equal(host_features.causal_mean(y, 2)[:3], host_features.causal_mean(x, 2)[:3])
    with pytest.raises(ValueError, match=">= 1"):
        host_features.causal_mean(x, 0)


def _sensor_windows(dtype: type[np.floating]) -> list[tuple[str, np.ndarray]]:
    # Every window gets the kurtosis (as a temperature); a power-of-two one >= 8 samples also
    # the band energies (as a vibration), the node's radix-2 FFT against numpy's rfft.
    out = []
    for w in _windows():
        w = w.astype(dtype).astype(np.float64)
        out.append(("temperature", w))
        n = len(w)
        if n >= 8 and n & (n - 1) == 0:
            out.append(("vibration", w))
    t = np.arange(512) / 1000.0
    out.append(("vibration", np.sin(2 * np.pi * 300.0 * t).astype(dtype).astype(np.float64)))
    return out


def _assert_sensor_features_match(got: np.ndarray, w: np.ndarray, sensor: str) -> None:
    want = host_features.sensor_features(w, sensor)
    assert got.shape == want.shape
    # mean .. kurtosis: the same sums in the same order, so rtol alone.
    np.testing.assert_allclose(got[:6], want[:6], rtol=RTOL, atol=0.0, err_msg=sensor)
    if sensor == "vibration":
        # Band energies: the node's radix-2 FFT and numpy's rfft round differently, and FFT
        # rounding is relative to the whole window's energy, not to each band: a band with
        # (almost) nothing in it (a flat window's band1..3, ~1e-33) is compared to 1e-12 of
        # the mean square instead; every band with real energy still meets rtol 1e-9.
        ms = float(np.mean(w * w))
        np.testing.assert_allclose(got[6:], want[6:], rtol=RTOL, atol=1e-12 * ms, err_msg=sensor)


@pytest.mark.parametrize("typecode,dtype", [("d", np.float64), ("f", np.float32)], ids=["float64", "float32"])
def test_kurtosis_and_bands_match_the_node(
    node_sensor: SensorFn, typecode: str, dtype: type[np.floating]
) -> None:
    ws = _sensor_windows(dtype)
    got = node_sensor(ws, typecode)
    assert len(got) == len(ws)
    for f, (sensor, w) in zip(got, ws, strict=True):
        _assert_sensor_features_match(f, w, sensor)


def test_sensor_feature_names() -> None:
    assert host_features.feature_names("temperature") == (*host_features.FEATURE_NAMES, "kurtosis")
    assert host_features.feature_names("vibration") == (
        *host_features.FEATURE_NAMES,
        "kurtosis",
        "band0",
        "band1",
        "band2",
        "band3",
    )
    for s in ("vibration", "temperature", "current"):
        assert node_features.feature_names(s) == host_features.feature_names(s)
    # The first five are FEATURE_NAMES, unchanged: the committed model binds to them.
    assert host_features.feature_names("vibration")[:5] == host_features.FEATURE_NAMES


def test_stacked_sensor_features_equal_one_by_one() -> None:
    ws = np.random.default_rng(2).normal(size=(4, 64))
    stacked = host_features.sensor_features(ws, "vibration")
    assert stacked.shape == (4, 10)
    for k in range(4):
        np.testing.assert_array_equal(stacked[k], host_features.sensor_features(ws[k], "vibration"))


def test_band_energies_refuse_a_window_that_is_no_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        host_features.band_energies(np.zeros(100))
    with pytest.raises(ValueError, match="power of two"):
        host_features.sensor_features(np.zeros(4), "vibration")
