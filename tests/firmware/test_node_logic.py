"""Fast CPython tests of the node's logic; the same code runs under MicroPython elsewhere."""

from __future__ import annotations

import json
from array import array

import numpy as np
import pytest
from edgeline.firmware.edgeline_node import features, identity
from edgeline.firmware.edgeline_node.config import ConfigError, changed, overlay, validate
from edgeline.firmware.edgeline_node.hal_sim import SimulatedMachine
from edgeline.firmware.edgeline_node.spc import ControlChart

from micropython_runner import run_micropython

GOOD = {"node_id": "node-1", "machine": "pump-01"}


def test_features_match_numpy() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0.2, 1.5, 256)
    f = features.compute(array("d", x), [0.0] * 5)
    rms = np.sqrt(np.mean(x**2))
    expect = [x.mean(), x.std(), rms, np.abs(x).max(), np.abs(x).max() / rms]
    np.testing.assert_allclose(f, expect, rtol=1e-9)


def test_control_chart_quiet_on_noise_and_fires_on_shift() -> None:
    rng = np.random.default_rng(11)
    chart = ControlChart(calibration=30, k_sigma=3.0, run=2)
    fired = [chart.update(float(v))[1] for v in rng.normal(10.0, 1.0, 2000)]
    assert not any(fired[:30])  # silent while calibrating
    # Two in a row beyond 3 sigma on pure noise: ~7e-6 per window.
    assert sum(fired) <= 1
    assert chart.update(16.0) == (pytest.approx(abs(16.0 - chart.mean) / chart.sigma), False)
    assert chart.update(16.0)[1]


def test_control_chart_refuses_tiny_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        ControlChart(calibration=1)


def test_simulated_bearing_fault_raises_vibration_rms() -> None:
    m = SimulatedMachine(seed=4)
    bufs = [array("f", [0.0] * 256) for _ in range(3)]
    m.read_window(bufs)
    healthy = list(features.compute(bufs[0], [0.0] * 5))
    m.set_fault("bearing")
    m.read_window(bufs)
    faulty = features.compute(bufs[0], [0.0] * 5)
    # Outer-race impacts: more energy, and much higher peaks (crest factor).
    assert faulty[2] > 1.1 * healthy[2]
    assert faulty[3] > 2 * healthy[3]
    with pytest.raises(ValueError, match="unknown fault"):
        m.set_fault("gremlins")


def test_boot_id_persists_and_increments(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "state" / "deep")
    assert [identity.next_boot_id(d) for _ in range(3)] == [1, 2, 3]
    assert len(identity.trace_id()) == 16 and len(identity.span_id()) == 8


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"machine": "pump-01"}, "node_id"),
        (GOOD | {"node_id": "a/b"}, "node_id"),
        (GOOD | {"broker": {"port": 70000}}, "broker.port"),
        (GOOD | {"broker": {"prot": 1883}}, "broker.prot"),
        (GOOD | {"window": {"samples": 2}}, "window.samples"),
        (GOOD | {"spc": {"k_sigma": "3"}}, "spc.k_sigma"),
        (GOOD | {"colour": "blue"}, "colour"),
        (GOOD | {"hal": {"kind": "esp32-adc"}}, "hal.kind"),
        (GOOD | {"window": {"period_ms": 5}}, "window.period_ms"),
        (GOOD | {"window": {"period_ms": True}}, "window.period_ms"),
        (GOOD | {"broker": {"inflight": 0}}, "broker.inflight"),
        (GOOD | {"southbound": {"key": ""}}, "southbound.key"),
        (GOOD | {"southbound": {"max_model_bytes": 10}}, "southbound.max_model_bytes"),
        (GOOD | {"window": {"samples": 1000}}, "window.samples"),  # the sim HAL has vibration
        (GOOD | {"hal": {"kind": "stdin", "stdin": {"sensors": [["xbar_r", "g"]]}}}, "hal.stdin.sensors"),
    ],
)
def test_config_errors_name_the_key(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_config_errors_name_the_key_under_micropython() -> None:
    cases = [({"machine": "pump-01"}, "node_id"), (GOOD | {"broker": {"port": 0}}, "broker.port")]
    script = (
        "import json\nfrom edgeline_node.config import validate, ConfigError\n"
        f"for cfg in json.loads({json.dumps(json.dumps([c for c, _ in cases]))}):\n"
        "    try:\n        validate(cfg)\n        print('accepted')\n"
        "    except ConfigError as e:\n        print(e)\n"
    )
    r = run_micropython(script)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(cases)
    for line, (_cfg, key) in zip(lines, cases, strict=True):
        assert repr(key) in line


def test_period_0_means_as_fast_as_possible() -> None:
    assert validate(GOOD | {"window": {"period_ms": 0}})["window"]["period_ms"] == 0


def test_a_config_push_is_an_overlay_validated_as_a_whole() -> None:
    cfg = validate(GOOD)
    patch = {"spc": {"k_sigma": 4.5}, "telemetry_every": 3, "broker": {"keepalive": 60}}
    merged = validate(overlay(cfg, patch))
    assert merged["spc"] == {"calibration": 20, "k_sigma": 4.5, "run": 2}
    assert cfg["spc"]["k_sigma"] == 3.0  # the running config is not changed by overlay()
    assert changed(cfg, merged) == ["broker.keepalive", "spc.k_sigma", "telemetry_every"]
    with pytest.raises(ConfigError, match=r"spc\.k_sigma"):
        validate(overlay(cfg, {"spc": {"k_sigma": -1}}))
    with pytest.raises(ConfigError, match="colour"):
        validate(overlay(cfg, {"colour": "blue"}))


def test_window_samples_a_power_of_two_with_a_vibration_sensor() -> None:
    # The FFT band energies of vibration need a power of two: the error says what to set.
    want = r"'window\.samples' must be a power of two .* got 1000: set 512 or 1024"
    with pytest.raises(ConfigError, match=want):
        validate(GOOD | {"window": {"samples": 1000}})
    assert validate(GOOD | {"window": {"samples": 1024}})["window"]["samples"] == 1024
    # Without a vibration sensor any size in range is fine.
    stdin = {"kind": "stdin", "stdin": {"sensors": [["temperature", "degC"], ["current", "A"]]}}
    assert validate(GOOD | {"hal": stdin, "window": {"samples": 1000}})["window"]["samples"] == 1000
    board = {"kind": "esp32", "temperature": {"chip": "ds18b20", "pin": 4}}
    assert validate(GOOD | {"hal": board, "window": {"samples": 600}})["window"]["samples"] == 600
    with pytest.raises(ConfigError, match=r"window\.samples"):
        validate(GOOD | {"hal": board | {"accel": {"chip": "mpu6050"}}, "window": {"samples": 600}})
    # A push is validated as a whole config: it cannot bring a bad size either.
    with pytest.raises(ConfigError, match=r"window\.samples"):
        validate(overlay(validate(GOOD), {"window": {"samples": 300}}))


def test_sensor_names_per_hal_kind() -> None:
    from edgeline.firmware.edgeline_node.config import sensor_names

    assert [n for n, _ in sensor_names(validate(GOOD)["hal"])] == ["vibration", "temperature", "current"]
    board = {"kind": "rp2040", "accel": {"chip": "mpu6050"}, "adc": {"pin": 26, "name": "pressure"}}
    assert sensor_names(validate(GOOD | {"hal": board})["hal"]) == [
        ("vibration", "hal.accel.chip"),
        ("pressure", "hal.adc.name"),
    ]
