"""The synthetic rotating machine: seeded determinism, the node's sensor names, and faults that
move the node's features the way the physics says they should."""

from __future__ import annotations

import numpy as np
import pytest
from edgeline.firmware.edgeline_node import hal_sim
from edgeline.quantize import synthetic
from edgeline.quantize.features import FEATURE_NAMES, window_features

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    sched = synthetic.fault_schedule(40, ["bearing_inner", "misalignment"], normal_first=8)
    a = synthetic.generate(40, seed=11, schedule=sched)
    b = synthetic.generate(40, seed=11, schedule=sched)
    c = synthetic.generate(40, seed=12, schedule=sched)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.fault, b.fault)
    assert not np.array_equal(a.samples, c.samples)
    assert a.samples.shape == (40, 3, 256) and a.rate_hz == 1000.0
    np.testing.assert_allclose(a.start_s[1:] - a.start_s[:-1], 0.256)
    assert a.fault_names == sched
    assert a.labels.tolist() == [int(f != "none") for f in sched]


def test_sensors_are_the_nodes() -> None:
    assert tuple(tuple(s) for s in hal_sim.SENSORS) == synthetic.SENSORS


def test_schedule_layout() -> None:
    s = synthetic.fault_schedule(20, ["imbalance", "bearing_outer"], normal_first=4)
    assert s == ["none"] * 8 + ["imbalance"] * 4 + ["none"] * 4 + ["bearing_outer"] * 4


def _late_features(fault: str, seed: int = 3, n: int = 40) -> dict[str, np.ndarray]:
    w = synthetic.generate(n, seed=seed, schedule=fault)
    # The last 10 windows: the machine has been in this state for a while.
    return {s: window_features(w.sensor(s))[-10:].mean(axis=0) for s, _ in synthetic.SENSORS}


@pytest.fixture(scope="module")
def healthy() -> dict[str, np.ndarray]:
    return _late_features("none")


def test_bearing_faults_raise_peak_and_crest(healthy: dict[str, np.ndarray]) -> None:
    for fault in ("bearing_outer", "bearing_inner"):
        vib = _late_features(fault)["vibration"]
        assert vib[F["peak"]] > 1.5 * healthy["vibration"][F["peak"]], fault
        assert vib[F["crest"]] > 1.3 * healthy["vibration"][F["crest"]], fault


def test_imbalance_and_misalignment_raise_rms(healthy: dict[str, np.ndarray]) -> None:
    imb = _late_features("imbalance")["vibration"]
    mis = _late_features("misalignment")["vibration"]
    assert imb[F["rms"]] > 2.0 * healthy["vibration"][F["rms"]]
    assert mis[F["rms"]] > 1.3 * healthy["vibration"][F["rms"]]
    # Imbalance is a bigger 1x sine: rms up, crest stays near a sine's sqrt(2).
    assert imb[F["crest"]] < healthy["vibration"][F["crest"]]


def test_faults_heat_the_bearing_and_load_the_motor(healthy: dict[str, np.ndarray]) -> None:
    for fault in synthetic.FAULTS[1:]:
        f = _late_features(fault, n=200)
        assert f["temperature"][F["mean"]] > healthy["temperature"][F["mean"]] + 0.5, fault
        assert f["current"][F["rms"]] > healthy["current"][F["rms"]] * 1.01, fault


def test_misalignment_shows_at_twice_shaft_speed() -> None:
    w = synthetic.generate(8, seed=2, schedule="misalignment", window=4096, rate_hz=4000.0)
    h = synthetic.generate(8, seed=2, schedule="none", window=4096, rate_hz=4000.0)
    shaft = w.machine.shaft_hz

    def amp(x: np.ndarray, hz: float) -> float:
        spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
        k = round(hz * x.size / 4000.0)
        return float(spec[k - 2 : k + 3].max())

    vm, vh = w.sensor("vibration")[-1], h.sensor("vibration")[-1]
    assert amp(vm, 2 * shaft) > 3 * amp(vh, 2 * shaft)
    assert amp(vm, shaft) < 2 * amp(vh, shaft)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown fault 'rust'"):
        synthetic.generate(2, schedule="rust")
    with pytest.raises(ValueError, match="schedule has 1 entries for 2 windows"):
        synthetic.generate(2, schedule=["none"])
    with pytest.raises(ValueError, match="unknown sensor"):
        synthetic.generate(1).sensor("pressure")
