"""The node's per-sensor features (kurtosis, FFT band energies) and its X-bar/R chart, run by
the same scenario script under CPython and under the MicroPython unix port (one micropython
process for every scenario), checked here against numpy."""

from __future__ import annotations

import json
import math
from array import array
from typing import Any

import numpy as np
import pytest
from edgeline.firmware.edgeline_node import features, hal_sim, spc

from micropython_runner import run_micropython

N = 256
RATE = 1000.0
# Sines centred on a bin, one per band: bands are [b, b+1) * RATE / 8 = 125 Hz wide.
SINE_BINS = (13, 46, 77, 115)  # 50.8, 179.7, 300.8, 449.2 Hz

# The scenarios, in the subset of Python both runtimes share. `features`, `spc`, `hal_sim`
# and `req` (the windows sent by the test) are given; `run()` returns a JSON-able dict.
_SCENARIOS = """
import math, random
from array import array

def gauss_window(buf, mu, sigma):
    # Box-Muller, in place (no allocation beyond floats).
    n = len(buf)
    i = 0
    while i < n:
        u1 = random.random() or 1e-12
        u2 = random.random()
        r = math.sqrt(-2.0 * math.log(u1)) * sigma
        buf[i] = mu + r * math.cos(2.0 * math.pi * u2)
        if i + 1 < n:
            buf[i + 1] = mu + r * math.sin(2.0 * math.pi * u2)
        i += 2

def given_windows():
    out = []
    for w in req["windows"]:
        fx = features.Features("vibration", len(w))
        out.append(fx.compute(array("d", w), [0.0] * len(fx.names)))
    return out

def bearing():
    m = hal_sim.SimulatedMachine(seed=4)
    bufs = [array("f", [0.0] * req["n"]) for _ in range(3)]
    fx = features.Features("vibration", req["n"])
    f = [0.0] * len(fx.names)
    res = {}
    for fault in ("none", "bearing"):
        m.set_fault(fault)
        k = 0.0
        b3 = 0.0
        for _ in range(5):
            m.read_window(bufs)
            fx.compute(bufs[0], f)
            k += f[5] / 5
            b3 += f[9] / 5
        res[fault] = [k, b3]
    return res

def noise_alarms(windows):
    random.seed(11)
    buf = array("f", [0.0] * req["n"])
    chart = spc.XbarRChart(calibration=20, subgroup=5, run=2)
    alarms = 0
    first = -1
    for i in range(windows):
        gauss_window(buf, 10.0, 1.0)
        score, out = chart.update_window(buf)
        if out:
            alarms += 1
            if first < 0:
                first = i
    return chart, buf, alarms, first

def after_calibration(mu, sigma):
    chart, buf, _, _ = noise_alarms(20)
    res = []
    for _ in range(4):
        gauss_window(buf, mu, sigma)
        score, out = chart.update_window(buf)
        res.append([score, out, chart.xbar, chart.r])
    return {"points": res, "limits": [chart.x_lcl, chart.x_ucl, chart.r_lcl, chart.r_ucl],
            "rbar": chart.rbar, "xbarbar": chart.xbarbar}

def sim_vibration_alarms(windows):
    m = hal_sim.SimulatedMachine(seed=2)
    bufs = [array("f", [0.0] * req["n"]) for _ in range(3)]
    charts = [spc.XbarRChart(calibration=20) for _ in range(3)]
    alarms = 0
    for _ in range(windows):
        m.read_window(bufs)
        for c, b in zip(charts, bufs):
            if c.update_window(b)[1]:
                alarms += 1
    return alarms

def heap(windows):
    try:
        import gc
        gc.mem_alloc
    except (ImportError, AttributeError):
        return None  # CPython: no gc.mem_alloc
    random.seed(5)
    fxs = [features.Features(s, req["n"]) for s in ("vibration", "temperature")]
    outs = [[0.0] * len(fx.names) for fx in fxs]
    chart = spc.XbarRChart(calibration=20)
    buf = array("f", [0.0] * req["n"])
    def one():
        gauss_window(buf, 0.0, 1.0)
        for fx, o in zip(fxs, outs):
            fx.compute(buf, o)
        chart.update_window(buf)
    for _ in range(25):  # through calibration, every code path taken once
        one()
    gc.collect()
    before = gc.mem_alloc()
    for _ in range(windows):
        one()
    gc.collect()
    return [before, gc.mem_alloc()]

def run():
    _, _, alarms, first = noise_alarms(2000)
    return {
        "names": {s: list(features.feature_names(s)) for s in ("vibration", "temperature", "current")},
        "given": given_windows(),
        "bearing": bearing(),
        "noise": [alarms, first],
        "shift": after_calibration(12.0, 1.0),
        "spread": after_calibration(10.0, 3.0),
        "sim": sim_vibration_alarms(300),
        "heap": heap(200),
    }
"""

_MP_MAIN = """
import sys, json
from edgeline_node import features, spc, hal_sim
req = json.loads(sys.stdin.read())
"""


def _request() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    t = np.arange(N) / RATE
    ws = [
        rng.normal(0.0, 1.0, N),
        rng.uniform(-1.0, 1.0, N),
        rng.laplace(0.5, 1.0, N),
        np.sin(2 * np.pi * 24.5 * t) + 0.1 * rng.normal(size=N),
        rng.normal(38.0, 0.05, 64),
    ]
    ws += [np.sin(2 * np.pi * (k * RATE / N) * t) for k in SINE_BINS]
    return {"n": N, "windows": [w.tolist() for w in ws]}


def _cpython() -> dict[str, Any]:
    req = _request()
    g: dict[str, Any] = {"features": features, "spc": spc, "hal_sim": hal_sim, "req": req}
    exec(_SCENARIOS, g)
    res: dict[str, Any] = json.loads(json.dumps(g["run"]()))
    return res


def _micropython() -> dict[str, Any]:
    req = _request()
    script = _MP_MAIN + _SCENARIOS + "\nprint(json.dumps(run()))\n"
    r = run_micropython(script, stdin=json.dumps(req).encode(), timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    res: dict[str, Any] = json.loads(r.stdout)
    return res


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(_cpython, id="cpython"),
        pytest.param(_micropython, id="micropython", marks=pytest.mark.micropython),
    ],
)
def results(request: pytest.FixtureRequest) -> dict[str, Any]:
    res: dict[str, Any] = request.param()
    return res


def _kurtosis(x: np.ndarray) -> float:
    d = x - x.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3.0)


def _bands_full_fft(x: np.ndarray) -> np.ndarray:
    # Independent of the host pipeline: the two-sided numpy.fft.fft, each bin to the band of
    # its |frequency| (the Nyquist bin to band 3).
    n = len(x)
    p = np.abs(np.fft.fft(x)) ** 2 / n**2
    freq = np.abs(np.fft.fftfreq(n, d=1.0 / RATE))
    band = np.minimum((freq // (RATE / 8)).astype(int), 3)
    return np.bincount(band, weights=p, minlength=4)


def test_feature_names(results: dict[str, Any]) -> None:
    names = results["names"]
    five = list(features.FEATURE_NAMES)
    assert names["vibration"] == [*five, "kurtosis", "band0", "band1", "band2", "band3"]
    assert names["temperature"] == names["current"] == [*five, "kurtosis"]


def test_kurtosis_matches_numpy(results: dict[str, Any]) -> None:
    ws = [np.array(w) for w in _request()["windows"]]
    got = [f[5] for f in results["given"]]
    want = [_kurtosis(w) for w in ws]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # What the number means: ~0 normal, -1.2 uniform, +3 Laplace, -1.5 sine.
    assert abs(got[0]) < 0.5
    assert got[1] == pytest.approx(-1.2, abs=0.2)
    assert got[2] > 1.0  # 3 in theory; a 256-sample estimate of a heavy tail falls short
    assert got[5] == pytest.approx(-1.5, abs=1e-9)


def test_band_energies_match_numpy_fft_and_parseval(results: dict[str, Any]) -> None:
    ws = [np.array(w) for w in _request()["windows"]]
    for f, w in zip(results["given"], ws, strict=True):
        bands = np.array(f[6:10])
        ms = float(np.mean(w * w))
        np.testing.assert_allclose(bands, _bands_full_fft(w), rtol=1e-9, atol=1e-12 * ms)
        # Parseval: the bands sum to the mean square, rms^2.
        assert bands.sum() == pytest.approx(ms, rel=1e-12)
        assert bands.sum() == pytest.approx(f[2] ** 2, rel=1e-12)


def test_a_sine_lands_in_its_band(results: dict[str, Any]) -> None:
    sines = results["given"][-len(SINE_BINS) :]
    for b, f in enumerate(sines):
        bands = f[6:10]
        assert bands[b] == pytest.approx(0.5, rel=1e-9)  # a unit sine's mean square
        assert sum(bands) - bands[b] < 1e-12


def test_bearing_fault_raises_kurtosis_and_the_high_band(results: dict[str, Any]) -> None:
    (k0, hi0), (k1, hi1) = results["bearing"]["none"], results["bearing"]["bearing"]
    assert k0 < -1.0  # a shaft sine: close to the -1.5 of a pure sine
    assert k1 > k0 + 1.0  # impacts: heavy tails
    assert hi1 > 5.0 * hi0  # the ringing after each impact (aliased at 1 kHz) fills band3


def test_xbar_r_quiet_on_noise(results: dict[str, Any]) -> None:
    alarms, _first = results["noise"]
    assert alarms <= 1  # of 2000 windows
    assert results["sim"] == 0  # 300 windows of the healthy simulated machine, 3 sensors


def test_xbar_r_fires_on_a_mean_shift(results: dict[str, Any]) -> None:
    s = results["shift"]
    x_lcl, x_ucl, _, _ = s["limits"]
    # sigma 1 within subgroups of 5: A2 R-bar ~ 3 / sqrt(5) = 1.34; a +2 shift is beyond it.
    assert x_ucl - s["xbarbar"] == pytest.approx(3 / math.sqrt(5), rel=0.1)
    assert s["xbarbar"] - x_lcl == pytest.approx(x_ucl - s["xbarbar"], rel=1e-12)
    (sc1, out1, x1, _), (sc2, out2, x2, _) = s["points"][:2]
    assert x1 > x_ucl and x2 > x_ucl
    assert sc1 > 3.0 and not out1  # one window out is not yet an alarm (run=2)
    assert sc2 > 3.0 and out2


def test_xbar_r_fires_on_a_variance_increase(results: dict[str, Any]) -> None:
    s = results["spread"]
    _, _, r_lcl, r_ucl = s["limits"]
    assert r_lcl == 0.0  # D3 = 0 for n = 5
    assert s["rbar"] == pytest.approx(2.326, rel=0.05)  # d2 * sigma
    (sc1, out1, _, r1), (sc2, out2, _, r2) = s["points"][:2]
    assert r1 > r_ucl and r2 > r_ucl  # the R chart (sigma x3: R ~ 3 R-bar > D4 R-bar)
    assert sc1 > 3.0 and not out1
    assert sc2 > 3.0 and out2


def test_no_heap_growth_per_window(results: dict[str, Any], request: pytest.FixtureRequest) -> None:
    if results["heap"] is None:
        pytest.skip("gc.mem_alloc is MicroPython's: the [micropython] case of this test checks the heap")
    before, after = results["heap"]
    # After gc.collect only live objects count. 200 windows: a leak of even one 16-byte GC
    # block per window would be 3200 bytes; 64 bytes (4 blocks) allows for the float
    # objects in the `out` lists being replaced by new ones of the same size and for a
    # stale pointer on the C stack keeping a block or two alive (the GC is conservative).
    assert abs(after - before) <= 64, (before, after)


# CPython-only checks of the argument handling -----------------------------------------------


def test_features_refuse_a_window_that_is_no_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two >= 8 samples, got 200"):
        features.Features("vibration", 200)
    with pytest.raises(ValueError, match="power of two"):
        features.Features("vibration", 4)
    features.Features("temperature", 200)  # no FFT, no constraint
    fx = features.Features("temperature", 200)
    with pytest.raises(ValueError, match="200 expected"):
        fx.compute(array("f", [0.0] * 100), [0.0] * 6)


def test_first_five_are_compute() -> None:
    x = array("d", np.random.default_rng(1).normal(size=N).tolist())
    fx = features.Features("vibration", N)
    full = fx.compute(x, [0.0] * len(fx.names))
    assert full[:5] == features.compute(x, [0.0] * 5)


def test_flat_window_has_zero_kurtosis() -> None:
    fx = features.Features("vibration", 16)
    f = fx.compute(array("f", [2.5] * 16), [0.0] * 10)
    assert f[5] == 0.0
    assert f[6] == pytest.approx(6.25, rel=1e-15) and f[7:] == [0.0, 0.0, 0.0]


def test_xbar_r_chart_arguments() -> None:
    with pytest.raises(ValueError, match="calibration"):
        spc.XbarRChart(calibration=1)
    with pytest.raises(ValueError, match="subgroup"):
        spc.XbarRChart(subgroup=11)
    with pytest.raises(ValueError, match="run"):
        spc.XbarRChart(run=0)
    with pytest.raises(ValueError, match="no subgroup"):
        spc.XbarRChart(subgroup=5).update_window(array("f", [1.0, 2.0]))


def test_xbar_r_flat_signal_does_not_alarm() -> None:
    chart = spc.XbarRChart(calibration=5)
    flat = array("f", [3.0] * 64)
    points = [chart.update_window(flat) for _ in range(20)]
    # R = 0 against the floored R-bar: below centre, never beyond a limit (D3 = 0).
    assert not any(out for _, out in points)
    assert all(score < 3.0 for score, _ in points)


def test_band_sensors_share_one_fft_scratch_per_window_size() -> None:
    a = features.Features("vibration", 512)
    b = features.Features("vibration", 512)
    c = features.Features("vibration", 256)
    assert a._fft_scratch is b._fft_scratch is features.scratch(512)
    assert c._fft_scratch is not a._fft_scratch
    sc = a._fft_scratch
    # n/2 re and im, n/4 + 1 cosines: 2.5 n floats, in arrays (no list of boxed floats).
    assert (len(sc.re), len(sc.im), len(sc.cos_q)) == (256, 256, 129)
    assert all(isinstance(x, array) for x in (sc.re, sc.im, sc.cos_q))
    assert sc.cos_q[0] == 1.0 and sc.cos_q[128] == 0.0
    assert features.Features("temperature", 512)._fft_scratch is None
    # Interleaved use of the shared scratch: each compute() starts from its own window.
    rng = np.random.default_rng(5)
    x, y = (array("f", rng.normal(size=512).tolist()) for _ in range(2))
    fx, fy = a.compute(x, [0.0] * 10), b.compute(y, [0.0] * 10)
    assert a.compute(x, [0.0] * 10) == fx and b.compute(y, [0.0] * 10) == fy


@pytest.mark.parametrize("subgroup", [5, 7])
def test_xbar_r_limits_follow_k_sigma(subgroup: int) -> None:
    a2, d3, d4, _d2 = spc._XBAR_R[subgroup]
    chart = spc.XbarRChart(calibration=10, subgroup=subgroup)
    rng = np.random.default_rng(3)
    for _ in range(10):
        chart.update_window(array("d", rng.normal(5.0, 1.0, 140).tolist()))
    rbar, xbb = chart.rbar, chart.xbarbar
    # k_sigma 3 (the default): the tabulated limits.
    assert chart.x_ucl == pytest.approx(xbb + a2 * rbar, rel=1e-12)
    assert chart.x_lcl == pytest.approx(xbb - a2 * rbar, rel=1e-12)
    assert chart.r_ucl == pytest.approx(d4 * rbar, rel=1e-12)
    assert chart.r_lcl == pytest.approx(d3 * rbar, abs=1e-12 * rbar)
    # A spread of 2.5x sigma: beyond D4 at 3 sigma, within the limits at k_sigma 8.
    wide = array("d", rng.normal(5.0, 2.5, 140).tolist())
    score, _ = chart.update_window(wide)
    assert score > 3.0
    chart.k_sigma = 8.0  # as a config push sets it, live
    assert chart.r_ucl == pytest.approx(rbar + 8.0 * (d4 - 1.0) * rbar / 3.0, rel=1e-12)
    assert chart.update_window(wide) == (pytest.approx(score, rel=0.3), False)
    assert score < 8.0
    chart.k_sigma = 3.0  # back: beyond again, out of control at the second window in a row (run 2)
    assert [chart.update_window(wide)[1] for _ in range(2)] == [False, True]
    with pytest.raises(ValueError, match="k_sigma"):
        spc.XbarRChart(k_sigma=0)
