"""Host code. Runtime parity of one model file: the node, tflite-micro, LiteRT.

`check_parity(data)` answers, for one ``.tflite`` detector:

1. int8 outputs on `n` random int8 inputs (uniform over -128..127): the node's interpreter under
   the MicroPython unix port (viper and plain kernels) and under CPython, tflite-micro, and the
   numpy reference read back from the file: byte-identical? LiteRT (batched, the gateway's
   backend): at most 1 LSB away, and how often it differs.
2. decisions on `n` random feature vectors (raw units, the manifest's features): the node's
   `Detector` under MicroPython (standardize, quantize, invoke, dequantize, score, smooth,
   threshold, hold) against the gateway's `ModelScorer` with LiteRT on the same rows, in the
   same order. The vectors are the manifest's mean plus its std times N(0, 1) scaled by a
   slowly wandering factor (0.3x to 12x), so that scores cross the threshold both ways many times
   and a model that smooths its score sees realistic runs.

`edgeline quantize parity MODEL.tflite` prints the result; tests/quantize/test_models_committed.py
asserts it for every model in models/.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgeline.firmware.edgeline_node.tflite_model import Model
from edgeline.host.model_scorer import ModelScorer
from edgeline.host.virtual_node import FIRMWARE_DIR, micropython_binary

from . import int8_reference as ref
from .int8_detector import Int8Detector, TFLiteMicroBackend

DECISION_AGREEMENT = 0.999

_MP_SCRIPT = """
import sys, struct
from edgeline_node.tflite_model import Model, KERNELS
from edgeline_node.detector import Detector
model_path, x_path, f_path, out_prefix = sys.argv[1:5]
with open(model_path, "rb") as f:
    data = f.read()
for kernel in KERNELS:
    m = Model(data, kernel=kernel)
    n_in = m.input_shape[-1]
    out = bytearray(m.output_shape[-1])
    inp = bytearray(n_in)
    with open(x_path, "rb") as fx, open(out_prefix + ".y." + kernel, "wb") as fo:
        while fx.readinto(inp) == n_in:
            m.invoke_into(inp, out)
            fo.write(out)
    print("kernel", kernel, m.layers)
d = Detector(data)
n = len(d.features)
row = bytearray(8 * n)
feats = [0.0] * n
fmt = "<%dd" % n
with open(f_path, "rb") as ff, open(out_prefix + ".d", "wb") as fo, open(out_prefix + ".q", "wb") as fq:
    while ff.readinto(row) == 8 * n:
        vals = struct.unpack(fmt, row)
        for i in range(n):
            feats[i] = vals[i]
        s, a = d.score(feats)
        fo.write(struct.pack("<ddB", s, d.last_raw, 1 if a else 0))
        fq.write(d.input_bytes)
print("detector", d.model.kernel, d.scoring, d.smooth, d.hold)
"""


def random_int8_inputs(n: int, n_in: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out: np.ndarray = rng.integers(-128, 128, size=(n, n_in), dtype=np.int16).astype(np.int8)
    return out


def random_feature_rows(manifest: dict[str, Any], n: int, seed: int = 1) -> np.ndarray:
    """Raw feature vectors around the model's training distribution, their spread wandering
    slowly between 0.3x and 12x the training spread (a reflecting random walk in log scale)."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(manifest["scaler"]["mean"], dtype=np.float64)
    std = np.asarray(manifest["scaler"]["std"], dtype=np.float64)
    lo, hi = np.log(0.3), np.log(12.0)
    steps = rng.normal(0.0, 0.15, size=n)
    walk = np.empty(n)
    v = rng.uniform(lo, hi)
    for i in range(n):
        v += steps[i]
        if v < lo:
            v = 2 * lo - v
        elif v > hi:
            v = 2 * hi - v
        walk[i] = v
    z = rng.normal(size=(n, mean.size)) * np.exp(walk)[:, None]
    out: np.ndarray = mean + std * z
    return out


def run_node_under_micropython(
    data: bytes, x_int8: np.ndarray, features: np.ndarray, timeout: float = 600.0
) -> dict[str, Any]:
    """The node's interpreter (each kernel) on x_int8 and its Detector on `features`, under
    the MicroPython unix port. Returns outputs per kernel, detector scores/raw/alarms and the
    detector's int8 input bytes."""
    with tempfile.TemporaryDirectory(prefix="edgeline-parity-") as tmp:
        t = Path(tmp)
        (t / "m.tflite").write_bytes(data)
        (t / "x.bin").write_bytes(np.ascontiguousarray(x_int8).tobytes())
        (t / "f.bin").write_bytes(np.ascontiguousarray(features, dtype="<f8").tobytes())
        (t / "run.py").write_text(_MP_SCRIPT)
        env = dict(os.environ, MICROPYPATH=f"{FIRMWARE_DIR}:.frozen")
        r = subprocess.run(
            [
                micropython_binary(),
                str(t / "run.py"),
                str(t / "m.tflite"),
                str(t / "x.bin"),
                str(t / "f.bin"),
                str(t / "out"),
            ],
            capture_output=True,
            timeout=timeout,
            env=env,
        )
        if r.returncode != 0:
            raise RuntimeError("the node's interpreter failed under MicroPython:\n" + r.stderr.decode())
        report = r.stdout.decode()
        n_out = Model(data).output_shape[-1]
        kernels: dict[str, np.ndarray] = {}
        for line in report.splitlines():
            parts = line.split()
            if parts and parts[0] == "kernel":
                y = np.frombuffer((t / f"out.y.{parts[1]}").read_bytes(), np.int8)
                kernels[parts[1]] = y.reshape(-1, n_out)
        rec = np.frombuffer(
            (t / "out.d").read_bytes(), dtype=np.dtype([("s", "<f8"), ("raw", "<f8"), ("a", "u1")])
        )
        q = np.frombuffer((t / "out.q").read_bytes(), np.int8).reshape(len(rec), -1)
        return {
            "kernels": kernels,
            "scores": rec["s"].copy(),
            "raw": rec["raw"].copy(),
            "alarms": rec["a"].astype(bool),
            "inputs": q,
            "report": report,
        }


def check_parity(data: bytes, n: int = 10_000, seed: int = 0, micropython: bool = True) -> dict[str, Any]:
    """Check (a) of the model issue on one model file; see the module docstring."""
    t0 = time.monotonic()
    det = Int8Detector.from_bytes(data)
    n_in = det.model.in_features
    x = random_int8_inputs(n, n_in, seed)
    y_ref = ref.run(det.model, x, "double")
    y_tflm = TFLiteMicroBackend(data).invoke_batch(x)
    node_cpy = Model(data)
    y_cpy = np.frombuffer(b"".join(node_cpy.invoke(r.tobytes()) for r in x), np.int8).reshape(y_ref.shape)
    scorer = ModelScorer(data, backend="litert")
    y_lite = scorer.backend.invoke_batch(x)
    lsb = np.abs(y_lite.astype(np.int16) - y_tflm.astype(np.int16))

    def rows_equal(a: np.ndarray) -> int:
        return int(np.sum(np.all(a == y_tflm, axis=1)))

    out: dict[str, Any] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": n,
        "layers": [[la.in_features, la.out_features, la.activation] for la in det.model.layers],
        "int8_outputs": {
            "rows_identical_to_tflite_micro": {
                "numpy_reference": rows_equal(y_ref),
                "node_cpython": rows_equal(y_cpy),
            },
            "litert_max_lsb_from_tflite_micro": int(lsb.max()),
            "litert_values_differing": int(np.sum(lsb != 0)),
            "litert_values_differing_rate": float(np.mean(lsb != 0)),
            "values": int(lsb.size),
        },
    }
    feats = random_feature_rows(det.manifest, n, seed + 1)
    g_raw = scorer.scores(feats)
    g_alarms = scorer.scoring.alarms(g_raw)
    ref_scores = det.scores(feats, "reference")
    ok = out["int8_outputs"]["litert_max_lsb_from_tflite_micro"] <= 1
    ok &= all(v == n for v in out["int8_outputs"]["rows_identical_to_tflite_micro"].values())
    if micropython:
        node = run_node_under_micropython(data, x, feats)
        for k, y in node["kernels"].items():
            out["int8_outputs"]["rows_identical_to_tflite_micro"][f"node_micropython_{k}"] = rows_equal(y)
        ok &= all(v == n for v in out["int8_outputs"]["rows_identical_to_tflite_micro"].values())
        ok &= len(node["kernels"]) >= 1
        agree = int(np.sum(node["alarms"] == g_alarms))
        q_host = scorer.quantized_inputs(feats)
        out["decisions"] = {
            "rows": n,
            "node": "Detector under MicroPython (" + node["report"].split("detector", 1)[1].strip() + ")",
            "gateway": f"ModelScorer with {scorer.backend.name}",
            "agree": agree,
            "agree_rate": agree / n,
            "node_anomalous": int(node["alarms"].sum()),
            "gateway_anomalous": int(g_alarms.sum()),
            "threshold": det.threshold,
            "input_bytes_identical_rows": int(np.sum(np.all(node["inputs"] == q_host, axis=1))),
            "node_vs_reference_max_rel_score_diff": float(
                np.max(np.abs(node["raw"] - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12))
            ),
            # how far the gateway's score sits from the node's where it matters (scores up to twice
            # the threshold), in units of the threshold; far above it 1-LSB steps weigh more
            "node_vs_litert_max_score_diff_near_threshold": float(
                np.max(np.abs(node["raw"] - g_raw)[ref_scores <= 2 * det.threshold], initial=0.0)
                / abs(det.threshold)
            ),
        }
        ok &= agree / n >= DECISION_AGREEMENT
    else:
        out["decisions"] = {"skipped": "micropython=False"}
    out["ok"] = bool(ok)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out
