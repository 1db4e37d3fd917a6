"""Host code. The demo's detector: trained on exactly what a demo node computes.

A demo node (firmware/edgeline_node/node.py) reads windows of 256 samples at 1 kHz from its
simulated machine (`hal_sim.SimulatedMachine`: vibration, temperature, current), computes
`features.FEATURE_NAMES` (mean, std, rms, peak, crest) per sensor into float lists, and keeps
its samples in `array('f')`. Training data here come from the same code, run under CPython:
the node's own `SimulatedMachine` and `features.compute`, with the same buffers. The feature
vector is the 15 values in sensor order then feature order, named `sensor.feature`
(`vibration.mean`, ..., `current.crest`): the manifest's `features`.

Machines differ by seed (shaft speed, vibration amplitude, base temperature, current), so the
detector is fitted on normal windows of several seeds (`TRAIN_SEEDS`), its threshold chosen on
normal windows of other seeds (`VALIDATION_SEEDS`: the highest validation score times a margin,
no fault data used), and it is judged on seeds it never saw (`TEST_SEEDS`): the false-alarm
rate on their normal windows, and the detection rate and delay of the bearing and imbalance
faults the node's simulator has.

The model: PCA (T^2 + Q) over the 15 standardized features, int8 like every edgeline detector,
one FULLY_CONNECTED layer, scored per window (no smoothing: a window is anomalous when its
score exceeds the threshold).

Everything is deterministic: `SimulatedMachine` seeds Python's `random`, the fit is numpy
linear algebra, the manifest's floats are rounded to 8 significant digits, so `train_demo()`
gives the same bytes each time (tests/quantize/test_models_committed.py checks the committed
file against a retrain).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from edgeline.firmware.edgeline_node import features as node_features
from edgeline.firmware.edgeline_node.hal_sim import SENSORS, SimulatedMachine

from .detectors import PCADetector
from .int8_detector import DEFAULT_HEADROOM, Int8Detector, build_int8

WINDOW = 256  # samples per window (the node's default config)
RATE_HZ = 1000
FEATURES: tuple[str, ...] = tuple(f"{s}.{f}" for s, _ in SENSORS for f in node_features.FEATURE_NAMES)
TRAIN_SEEDS: tuple[int, ...] = tuple(range(1, 25))
VALIDATION_SEEDS: tuple[int, ...] = tuple(range(501, 511))
TEST_SEEDS: tuple[int, ...] = tuple(range(1001, 1021))
NODE_FAULTS = ("bearing", "imbalance")  # what hal_sim.SimulatedMachine can switch on


@dataclass(frozen=True)
class DemoConfig:
    explained_variance: float = 0.6
    train_windows: int = 200  # per training seed
    validation_windows: int = 200  # per validation seed
    margin: float = 1.5  # threshold = margin x the highest validation score
    headroom: float = DEFAULT_HEADROOM
    version: str = "1"


def node_windows(seed: int, n: int, fault: str = "none", *, before: int = 0) -> np.ndarray:
    """Feature rows (n, 15) of `n` windows of a freshly started node machine with `seed`,
    after `before` healthy windows (not returned) and with `fault` switched on for the n.

    The node's own code: `SimulatedMachine.read_window` into `array('f')` buffers, then
    `features.compute` per sensor, in the node's sensor order.
    """
    state = random.getstate()  # SimulatedMachine seeds the global generator: leave it as found
    try:
        machine = SimulatedMachine(seed=seed, rate_hz=RATE_HZ)
        bufs = [array("f", bytes(4 * WINDOW)) for _ in SENSORS]
        feats = [[0.0] * len(node_features.FEATURE_NAMES) for _ in SENSORS]
        for _ in range(before):
            machine.read_window(bufs)
        machine.set_fault(fault)
        out = np.empty((n, len(FEATURES)))
        for k in range(n):
            machine.read_window(bufs)
            row: list[float] = []
            for i in range(len(SENSORS)):
                row += node_features.compute(bufs[i], feats[i])
            out[k] = row
        return out
    finally:
        random.setstate(state)


def training_rows(seeds: Sequence[int], n: int) -> np.ndarray:
    return np.vstack([node_windows(s, n) for s in seeds])


def train_demo(config: DemoConfig | None = None) -> tuple[Int8Detector, dict[str, Any]]:
    """Fit, quantize and calibrate the demo detector; return it and its training record."""
    cfg = config or DemoConfig()
    x_train = training_rows(TRAIN_SEEDS, cfg.train_windows)
    x_val = training_rows(VALIDATION_SEEDS, cfg.validation_windows)
    det = PCADetector(cfg.explained_variance).fit(x_train)
    training = {
        "data": (
            f"node simulator (firmware/edgeline_node/hal_sim.py SimulatedMachine under CPython), normal "
            f"operation only: {cfg.train_windows} windows x seeds {TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]}; "
            f"threshold from {cfg.validation_windows} normal windows x seeds "
            f"{VALIDATION_SEEDS[0]}-{VALIDATION_SEEDS[-1]}"
        ),
        "window": {"samples": WINDOW, "rate_hz": RATE_HZ},
        "protocol": (
            "fit on normal windows of training seeds; judged on unseen seeds (normal, bearing, imbalance)"
        ),
        "config": asdict(cfg),
    }
    val_max: list[float] = []

    def threshold(score: Callable[[np.ndarray], np.ndarray]) -> float:
        # Not the training scores: the highest int8 score of the validation machines, x margin.
        val_max.append(float(score(x_val).max()))
        return cfg.margin * val_max[0]

    model = build_int8(
        det,
        x_train,
        FEATURES,
        threshold,
        headroom=cfg.headroom,
        version=cfg.version,
        extra={"training": training},
    )
    return model, {"training": training, "validation_max_score": val_max[0], "components": det.n_components}


def evaluate_demo(
    model: Int8Detector,
    seeds: Sequence[int] = TEST_SEEDS,
    normal_windows: int = 300,
    fault_windows: int = 40,
    runtime: str = "reference",
) -> dict[str, Any]:
    """False alarms on normal windows of `seeds`, and per fault the share of fault windows
    flagged and the windows until the first flag (each fault switched on after 20 healthy
    windows of a fresh machine)."""
    thr = model.threshold
    normal = np.vstack([node_windows(s, normal_windows) for s in seeds])
    s_n = model.scores(normal, runtime)
    out: dict[str, Any] = {
        "seeds": [seeds[0], seeds[-1]] if len(seeds) > 1 else list(seeds),
        "threshold": thr,
        "normal": {
            "windows": int(s_n.size),
            "false_alarms": int(np.sum(s_n > thr)),
            "false_alarm_rate": float(np.mean(s_n > thr)),
            "max_score": round(float(s_n.max()), 4),
            "p99_score": round(float(np.quantile(s_n, 0.99)), 4),
        },
    }
    for fault in NODE_FAULTS:
        flagged = 0
        total = 0
        delays = []
        lowest = np.inf
        for s in seeds:
            sc = model.scores(node_windows(s, fault_windows, fault, before=20), runtime)
            hit = sc > thr
            flagged += int(hit.sum())
            total += sc.size
            delays.append(int(np.argmax(hit)) if hit.any() else fault_windows)
            lowest = min(lowest, float(sc.min()))
        out[fault] = {
            "windows": total,
            "detected": flagged,
            "detection_rate": flagged / total,
            "max_delay_windows": max(delays),
            "min_score": round(lowest, 4),
        }
    return out
