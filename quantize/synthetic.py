"""Host code. A seeded synthetic rotating machine for the demo and the tests.

It measures what the node's simulated HAL measures, under the same names and units
(`firmware/edgeline_node/hal_sim.py`: vibration in g, temperature in degC, current in A),
and adds the faults a condition-monitoring engineer expects to see:

| fault           | vibration                                             | temperature | current        |
|-----------------|-------------------------------------------------------|-------------|----------------|
| `none`          | shaft 1x and 2x harmonics, broadband noise            | base + drift| 50 Hz, noise   |
| `bearing_outer` | decaying resonance impulses at BPFO (3.585 x shaft)   | friction heat| +4 %          |
| `bearing_inner` | impulses at BPFI (5.415 x shaft), modulated at 1x     | friction heat| +4 %          |
| `imbalance`     | 1x amplitude up                                       | slight heat | 1x sidebands   |
| `misalignment`  | 2x amplitude up (and some 1x, 3x)                     | heat        | +6 %, sidebands|

BPFO/BPFI are those of a 6205 deep-groove ball bearing (the CWRU test bearing). Thermal
drift is a slow ambient swing plus a first-order rise while a fault lasts. Impulse timing
jitters by about 1 % (rolling-element slip), so the spectrum is not a perfect comb.

Everything is driven by one `numpy.random.Generator` seeded from `seed`, so the same call
returns the same arrays on every run. Time runs on across windows (no phase resets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FAULTS: tuple[str, ...] = ("none", "bearing_outer", "bearing_inner", "imbalance", "misalignment")
# name, unit: the same sensors, in the same order, as the node's simulated HAL.
SENSORS: tuple[tuple[str, str], ...] = (("vibration", "g"), ("temperature", "degC"), ("current", "A"))
BPFO_RATIO = 3.585  # outer-race defect frequency / shaft frequency, 6205 bearing
BPFI_RATIO = 5.415  # inner-race defect frequency / shaft frequency, 6205 bearing


@dataclass(frozen=True)
class Machine:
    """One machine's constants; `Machine.from_seed` varies them a little, as real machines differ."""

    shaft_hz: float = 24.0
    vib_amp: float = 0.5  # g, 1x amplitude when healthy
    temp_base: float = 38.0  # degC
    cur_rms: float = 9.0  # A
    mains_hz: float = 50.0
    resonance_hz: float = 3000.0  # structural resonance rung by bearing impacts
    noise_g: float = 0.05
    ambient_swing: float = 1.0  # degC, amplitude of the slow ambient drift
    ambient_period_s: float = 3600.0

    @classmethod
    def from_seed(cls, seed: int) -> Machine:
        return cls(
            shaft_hz=24.0 + (seed % 7) * 0.5,
            vib_amp=0.5 + (seed % 5) * 0.02,
            temp_base=38.0 + (seed % 4),
            cur_rms=9.0 + (seed % 3) * 0.5,
        )


@dataclass(frozen=True)
class SyntheticWindows:
    """Windows of samples from the three sensors, with the fault that was active in each."""

    samples: np.ndarray  # float64, shape (n_windows, 3, window): vibration, temperature, current
    fault: np.ndarray  # int, shape (n_windows,): index into FAULTS
    start_s: np.ndarray  # float64, shape (n_windows,): time of each window's first sample
    rate_hz: float
    machine: Machine

    @property
    def labels(self) -> np.ndarray:
        """1 where a fault was active (anomalous window), else 0."""
        out: np.ndarray = (self.fault != 0).astype(np.int8)
        return out

    @property
    def fault_names(self) -> list[str]:
        return [FAULTS[i] for i in self.fault]

    def sensor(self, name: str) -> np.ndarray:
        """(n_windows, window) samples of one sensor."""
        names = [s for s, _ in SENSORS]
        if name not in names:
            raise ValueError(f"unknown sensor {name!r}: use one of {names}")
        out: np.ndarray = self.samples[:, names.index(name), :]
        return out


def fault_schedule(n_windows: int, faults: Sequence[str], normal_first: int, seed: int = 0) -> list[str]:
    """`normal_first` healthy windows, then the remaining windows split into equal blocks,
    one per fault in `faults` (in order), each block preceded by a healthy stretch of the same
    length, so every fault starts from a cool, healthy machine."""
    for f in faults:
        _check_fault(f)
    if not 0 <= normal_first <= n_windows:
        raise ValueError(f"normal_first must be in [0, {n_windows}], got {normal_first}")
    out = ["none"] * normal_first
    rest = n_windows - normal_first
    if faults:
        block = rest // (2 * len(faults))
        for f in faults:
            out += ["none"] * block + [f] * block
    out += ["none"] * (n_windows - len(out))
    return out


def _check_fault(name: str) -> None:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}: use one of {', '.join(FAULTS)}")


def generate(
    n_windows: int,
    *,
    window: int = 256,
    rate_hz: float = 1000.0,
    seed: int = 1,
    schedule: Sequence[str] | str = "none",
    severity: float = 1.0,
    machine: Machine | None = None,
) -> SyntheticWindows:
    """`n_windows` consecutive windows of `window` samples at `rate_hz`.

    `schedule` is one fault name for every window, or one name per window. `severity` scales
    every fault signature (1.0 = clearly visible, 0 = healthy).

    :raises ValueError: unknown fault, a schedule of the wrong length, or bad sizes.
    """
    if n_windows < 1 or window < 1 or rate_hz <= 0:
        raise ValueError(
            f"need n_windows >= 1, window >= 1, rate_hz > 0; got {n_windows}, {window}, {rate_hz}"
        )
    if severity < 0:
        raise ValueError(f"severity must be >= 0, got {severity}")
    sched = [schedule] * n_windows if isinstance(schedule, str) else list(schedule)
    if len(sched) != n_windows:
        raise ValueError(f"schedule has {len(sched)} entries for {n_windows} windows")
    for f in sched:
        _check_fault(f)
    m = machine or Machine.from_seed(seed)
    rng = np.random.default_rng(seed)
    dt = 1.0 / rate_hz
    res_hz = min(m.resonance_hz, 0.4 * rate_hz)  # keep the ringing below Nyquist
    w_shaft = 2 * math.pi * m.shaft_hz
    samples = np.empty((n_windows, 3, window))
    fault_idx = np.array([FAULTS.index(f) for f in sched], dtype=np.int64)
    starts = np.arange(n_windows) * window * dt
    heat = 0.0  # degC of fault heating, first-order towards the fault's target
    # Next impact time per bearing fault, carried across windows.
    next_impact = {"bearing_outer": 0.0, "bearing_inner": 0.0}
    window_s = window * dt
    tau_heat = 120.0  # s, thermal time constant of the bearing housing
    for k, name in enumerate(sched):
        t = starts[k] + np.arange(window) * dt
        s = severity if name != "none" else 0.0
        one_x = m.vib_amp * (
            1.0 + (1.2 * s if name == "imbalance" else 0.3 * s if name == "misalignment" else 0.0)
        )
        two_x = 0.15 * m.vib_amp * (1.0 + (4.0 * s if name == "misalignment" else 0.0))
        three_x = 0.05 * m.vib_amp * (1.0 + (3.0 * s if name == "misalignment" else 0.0))
        vib = one_x * np.sin(w_shaft * t)
        vib += two_x * np.sin(2 * w_shaft * t + 0.7)
        vib += three_x * np.sin(3 * w_shaft * t + 1.9)
        for bearing, ratio in (("bearing_outer", BPFO_RATIO), ("bearing_inner", BPFI_RATIO)):
            period = 1.0 / (m.shaft_hz * ratio)
            if name != bearing:
                # Keep the impact clock running, so a fault that starts later lines up in time.
                while next_impact[bearing] < t[-1] + dt:
                    next_impact[bearing] += period
                continue
            imp = np.zeros(window)
            te = next_impact[bearing]
            while te < t[-1] + dt:
                rel = t - te
                on = rel >= 0
                # Inner-race defects pass through the load zone once per revolution.
                amp = 1.6 * s * (0.55 + 0.45 * math.cos(w_shaft * te) if bearing == "bearing_inner" else 1.0)
                imp[on] += amp * np.exp(-rel[on] * 900.0) * np.sin(2 * math.pi * res_hz * rel[on])
                te += period * (1.0 + 0.01 * rng.standard_normal())
            next_impact[bearing] = te
            vib += imp
        vib += m.noise_g * rng.standard_normal(window)

        target = {
            "none": 0.0,
            "bearing_outer": 8.0,
            "bearing_inner": 8.0,
            "imbalance": 3.0,
            "misalignment": 6.0,
        }[name]
        heat += (target * (s if name != "none" else 0.0) - heat) * (1.0 - math.exp(-window_s / tau_heat))
        ambient = m.ambient_swing * np.sin(2 * math.pi * t / m.ambient_period_s)
        temp = m.temp_base + heat + ambient + 0.05 * rng.standard_normal(window)

        load = (
            1.0
            + {
                "none": 0.0,
                "bearing_outer": 0.04,
                "bearing_inner": 0.04,
                "imbalance": 0.02,
                "misalignment": 0.06,
            }[name]
            * s
        )
        cur_amp = m.cur_rms * math.sqrt(2.0) * load
        # Mechanical faults modulate the torque at shaft speed: sidebands at mains +- 1x.
        mod = 1.0 + (0.05 * s if name in ("imbalance", "misalignment") else 0.0) * np.cos(w_shaft * t)
        cur = cur_amp * mod * np.sin(2 * math.pi * m.mains_hz * t) + 0.1 * rng.standard_normal(window)

        samples[k, 0] = vib
        samples[k, 1] = temp
        samples[k, 2] = cur
    return SyntheticWindows(samples, fault_idx, starts, float(rate_hz), m)
