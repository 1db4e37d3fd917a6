"""Host code. A fitted float detector -> its int8 twin, as a ``.tflite`` file with a manifest.

The int8 path, end to end:

    detector (float, quantize/detectors.py)
      -> quantize_chain(layers, int8_calibration_rows(training rows, headroom))   quantize/int8.py
      -> threshold re-calibrated on the int8 scores of the training rows
      -> write_tflite(model, manifest)                                            quantize/tflite_writer.py
      -> read_tflite(bytes) + numpy reference (tflite-micro's rounding)           what is evaluated

`Int8Detector` holds the bytes and scores rows through any `InferenceBackend`: the numpy
reference of what it read back from those bytes (`"reference"`, the default: bit-exact with
tflite-micro and the node), tflite-micro itself (`"tflite-micro"`), or LiteRT (`"litert"`).
Scoring is the gateway's `edgeline.host.model_scorer.Scoring`, driven by the manifest alone.

Manifest keys written here beyond the base schema (docs/model-format.md):
`score_params` (pca_t2_q: k, t2_mean, q_mean; reconstruction_mse: scale), `alarm` (smooth,
hold), and whatever the caller adds (training data, protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgeline.host.inference import InferenceBackend, load_backend
from edgeline.host.model_scorer import Scoring, quantize_input, read_model_manifest, score_rows

from . import int8_reference as ref
from .detectors import AutoencoderDetector, Detector, PCADetector, int8_calibration_rows
from .int8 import QuantizedModel, quantize_chain
from .tflite_reader import read_tflite
from .tflite_writer import Manifest, write_tflite

DEFAULT_HEADROOM = 4.0


def manifest_float(v: float) -> float:
    """A float as the manifest stores it: 8 significant digits.

    Far below anything the int8 model resolves, and it keeps the file's bytes (and sha256)
    stable against last-bit differences in the float arithmetic of another machine.
    """
    return float(f"{float(v):.8g}")


class ReferenceBackend:
    """An `InferenceBackend` over the numpy reference kernels ("double" = tflite-micro's rounding)."""

    def __init__(self, model: QuantizedModel, rounding: str = "double") -> None:
        self.model = model
        self.rounding = rounding
        self.name = f"numpy-reference-{rounding}"
        self.in_features = model.in_features
        self.out_features = model.out_features
        self.input_quant = (float(np.float32(model.input_scale)), int(model.input_zero_point))
        self.output_quant = (float(np.float32(model.output_scale)), int(model.output_zero_point))

    def invoke_batch(self, x_int8: np.ndarray) -> np.ndarray:
        return ref.run(self.model, np.asarray(x_int8, dtype=np.int8), self.rounding)


class TFLiteMicroBackend:
    """An `InferenceBackend` over tflite-micro's Python interpreter (one invoke per row)."""

    def __init__(self, data: bytes) -> None:
        from tflite_micro import runtime as tflm

        self._interp = tflm.Interpreter.from_bytes(bytes(data))
        self.name = "tflite-micro"
        inp = self._interp.get_input_details(0)
        out = self._interp.get_output_details(0)
        self.in_features = int(inp["shape"][-1])
        self.out_features = int(out["shape"][-1])
        self.input_quant = (
            float(inp["quantization_parameters"]["scales"][0]),
            int(inp["quantization_parameters"]["zero_points"][0]),
        )
        self.output_quant = (
            float(out["quantization_parameters"]["scales"][0]),
            int(out["quantization_parameters"]["zero_points"][0]),
        )

    def invoke_batch(self, x_int8: np.ndarray) -> np.ndarray:
        x = np.asarray(x_int8, dtype=np.int8)
        out = np.empty((x.shape[0], self.out_features), np.int8)
        for i in range(x.shape[0]):
            self._interp.set_input(x[i : i + 1], 0)
            self._interp.invoke()
            out[i] = self._interp.get_output(0)[0]
        return out


def score_params(det: Detector) -> tuple[str, dict[str, Any]]:
    """The manifest's (scoring, score_params) for a fitted detector."""
    if isinstance(det, PCADetector):
        return "pca_t2_q", {
            "k": int(det.n_components),
            "t2_mean": manifest_float(det.t2_mean),
            "q_mean": manifest_float(det.q_mean if det.q_mean > 1e-12 else 0.0),
        }
    if isinstance(det, AutoencoderDetector):
        # The detector's score is sum((z - y)^2) / spe_mean = mean((z - y)^2) / (spe_mean / d).
        d = det.layers()[0].in_features
        return "reconstruction_mse", {"scale": manifest_float(det.spe_mean / d)}
    raise TypeError(f"no manifest scoring for {type(det).__name__}")


@dataclass
class Int8Detector:
    """An int8 detector as a file: its bytes, and scoring through a chosen runtime."""

    data: bytes
    manifest: dict[str, Any]
    model: QuantizedModel  # read back from `data`
    _scorers: dict[str, tuple[Scoring, InferenceBackend]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> Int8Detector:
        return cls(bytes(data), read_model_manifest(data), read_tflite(data))

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    def scoring(self) -> Scoring:
        return Scoring.from_manifest(self.manifest, self.model.out_features)

    def backend(self, runtime: str = "reference") -> InferenceBackend:
        if runtime == "reference":
            return ReferenceBackend(self.model, "double")
        if runtime == "reference-single":
            return ReferenceBackend(self.model, "single")
        if runtime == "tflite-micro":
            return TFLiteMicroBackend(self.data)
        if runtime in ("litert", "tflite-runtime"):
            return load_backend(self.data, prefer=runtime)
        raise ValueError(f"unknown runtime {runtime!r}: reference, reference-single, tflite-micro, litert")

    def _scorer(self, runtime: str) -> tuple[Scoring, InferenceBackend]:
        if runtime not in self._scorers:
            self._scorers[runtime] = (self.scoring(), self.backend(runtime))
        return self._scorers[runtime]

    def scores(self, x: np.ndarray, runtime: str = "reference") -> np.ndarray:
        """Unsmoothed per-row scores of raw feature rows."""
        scoring, backend = self._scorer(runtime)
        return score_rows(scoring, backend, x)

    def outputs(self, x: np.ndarray, runtime: str = "reference") -> np.ndarray:
        """The int8 outputs for raw feature rows (for runtime-vs-runtime comparisons)."""
        scoring, backend = self._scorer(runtime)
        q = quantize_input(scoring.standardize(x), *backend.input_quant)
        return backend.invoke_batch(q)


# Given a function that scores raw rows with the int8 model (before its threshold is known),
# return the threshold.
ThresholdRule = Callable[[Callable[[np.ndarray], np.ndarray]], float]


def build_int8(
    det: Detector,
    x_train: np.ndarray,
    feature_names: Sequence[str],
    threshold_rule: ThresholdRule,
    *,
    headroom: float = DEFAULT_HEADROOM,
    version: str = "1",
    alarm: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Int8Detector:
    """Quantize a fitted detector, calibrate its threshold on its own int8 training scores,
    write the file, and read it back.

    :param x_train: the raw (unscaled) training rows the detector was fitted on, in time order
        (the threshold rule may smooth them).
    :param threshold_rule: called with a function that scores raw rows with the int8 model
        (unsmoothed); returns the threshold. E.g. ``lambda score: rule.threshold(score(x_train))``
        re-calibrates an `AlarmRule` on the int8 training scores.
    :param alarm: `{"smooth": n, "hold": n}` written to the manifest, or None (no smoothing).
    """
    z = det.scaler.transform(x_train)
    qm = quantize_chain(det.layers(), int8_calibration_rows(z, headroom))
    kind, params = score_params(det)
    ex: dict[str, Any] = {"score_params": params}
    if alarm is not None:
        ex["alarm"] = {"smooth": int(alarm.get("smooth", 1)), "hold": int(alarm.get("hold", 0))}
    ex["int8_calibration"] = {"rows": int(z.shape[0]), "headroom": float(headroom)}
    ex.update(extra or {})
    base = Manifest(
        features=list(feature_names),
        mean=[manifest_float(v) for v in det.scaler.mean],
        std=[manifest_float(v) for v in det.scaler.scale],
        threshold=0.0,
        scoring=kind,
        version=version,
        extra=ex,
    )
    scoring = Scoring.from_manifest(base.to_dict(), qm.out_features)
    backend = ReferenceBackend(qm)
    threshold = manifest_float(threshold_rule(lambda x: score_rows(scoring, backend, x)))
    final = Manifest(
        features=base.features,
        mean=base.mean,
        std=base.std,
        threshold=threshold,
        scoring=kind,
        version=version,
        extra=ex,
    )
    data = write_tflite(qm, final)
    out = Int8Detector.from_bytes(data)
    if not same_model(out.model, qm):
        raise RuntimeError("the model read back from the .tflite differs from the one written")
    return out


def same_model(a: QuantizedModel, b: QuantizedModel) -> bool:
    """Every int8 weight, int32 bias, scale, zero point and activation equal."""
    if len(a.layers) != len(b.layers):
        return False
    for la, lb in zip(a.layers, b.layers, strict=True):
        if not (
            np.array_equal(la.weight, lb.weight)
            and np.array_equal(la.bias, lb.bias)
            and np.array_equal(
                np.asarray(la.weight_scale, np.float32), np.asarray(lb.weight_scale, np.float32)
            )
            and la.activation == lb.activation
            and np.float32(la.input_scale) == np.float32(lb.input_scale)
            and np.float32(la.output_scale) == np.float32(lb.output_scale)
            and la.input_zero_point == lb.input_zero_point
            and la.output_zero_point == lb.output_zero_point
        ):
            return False
    return True
