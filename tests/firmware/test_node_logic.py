"""Fast CPython tests of the node's logic; the same code runs under MicroPython elsewhere."""

from __future__ import annotations

import json
from array import array

import numpy as np
import pytest
from edgeline.firmware.edgeline_node import features, identity
from edgeline.firmware.edgeline_node.config import ConfigError, validate
from edgeline.firmware.edgeline_node.hal_sim import SimulatedMachine
from edgeline.firmware.edgeline_node.ram_queue import RamQueue
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


def test_ram_queue_bounded_and_counts_drops() -> None:
    q = RamQueue(3)
    for i in range(5):
        q.append(1, bytes([i]))
    assert q.depth == 3 and q.drops == 2
    assert q.peek() == (1, b"\x02")
    q.pop()
    assert q.peek() == (1, b"\x03")


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
