"""Gateway-side scoring of raw feature vectors with an edgeline ``.tflite`` detector.

Host code. The node (firmware/edgeline_node/detector.py) and the gateway run the same file
and the same scoring path, read from the model's embedded manifest (docs/model-format.md):

    z     = (x - scaler.mean) / scaler.std                  float64 here, the node's floats there
    q     = clamp(round_half_away(z / s_in) + zp_in, -128, 127)
    y_q   = the int8 model (LiteRT here, the node's interpreter there)
    y     = (y_q - zp_out) * s_out
    score = scoring(z, y)                                    manifest 'scoring' + 'score_params'
    alarm = smoothed(score) > threshold, held                manifest 'alarm' (optional)

`Scoring` is that recipe as numpy; `ModelScorer` binds it to an inference backend (LiteRT by
default, any `InferenceBackend` such as the numpy reference in `edgeline.quantize.int8_detector`).
The gateway's LiteRT rounds once where the node rounds twice (docs/model-format.md), so node
and gateway scores can differ by a hair and decisions can differ right at the threshold:
compare them as rates, never for equality.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from edgeline.firmware.edgeline_node.tflite_model import Model, ModelError
from edgeline.host.inference import InferenceBackend, load_backend

SCORING_KINDS = ("pca_t2_q", "reconstruction_mse", "raw")


class ScoringError(ValueError):
    """The manifest's scoring section is missing, malformed, or does not fit the model."""


def _num(d: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise ScoringError(f"manifest '{where}.{key}' must be a finite number, got {v!r}")
    return float(v)


def _int(d: Mapping[str, Any], key: str, where: str, default: int, lo: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ScoringError(f"manifest '{where}.{key}' must be an integer >= {lo}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class Scoring:
    """The manifest's scaler, score and alarm rule, in numpy."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    threshold: float
    kind: str
    k: int = 0  # pca_t2_q: whitened projections at the head of the output
    t2_mean: float = 1.0  # pca_t2_q
    q_mean: float = 0.0  # pca_t2_q (0: T^2 alone)
    scale: float = 1.0  # reconstruction_mse: the MSE is divided by this
    index: int = 0  # raw: which output value is the score
    smooth: int = 1  # alarm: rolling mean of the score over this many windows
    hold: int = 0  # alarm: windows an alarm stays raised after the score falls back

    @classmethod
    def from_manifest(cls, m: Mapping[str, Any], out_features: int | None = None) -> Scoring:
        """:raises ScoringError: naming the manifest key that is missing or wrong."""
        try:
            features = tuple(str(f) for f in m["features"])
            mean = np.asarray(m["scaler"]["mean"], dtype=np.float64)
            std = np.asarray(m["scaler"]["std"], dtype=np.float64)
            threshold = _num(m, "threshold", "manifest")
            kind = m["scoring"]
        except (KeyError, TypeError) as e:
            raise ScoringError(f"manifest is missing or mistypes key {e}") from e
        n = len(features)
        if mean.shape != (n,) or std.shape != (n,) or not np.all(std > 0):
            raise ScoringError(f"manifest 'scaler' needs {n} means and {n} positive stds")
        p = m.get("score_params", {})
        a = m.get("alarm", {})
        if not isinstance(p, Mapping) or not isinstance(a, Mapping):
            raise ScoringError("manifest 'score_params' and 'alarm' must be objects")
        kw: dict[str, Any] = {}
        if kind == "pca_t2_q":
            kw["k"] = _int(p, "k", "score_params", -1, 1)
            kw["t2_mean"] = _num(p, "t2_mean", "score_params")
            kw["q_mean"] = _num(p, "q_mean", "score_params")
            if kw["t2_mean"] <= 0 or kw["q_mean"] < 0:
                raise ScoringError("manifest 'score_params' needs t2_mean > 0 and q_mean >= 0")
            expect = kw["k"] + n
        elif kind == "reconstruction_mse":
            kw["scale"] = _num(p, "scale", "score_params", 1.0)
            if kw["scale"] <= 0:
                raise ScoringError("manifest 'score_params.scale' must be > 0")
            expect = n
        elif kind == "raw":
            kw["index"] = _int(p, "index", "score_params", 0, 0)
            expect = -1
        else:
            raise ScoringError(
                f"manifest 'scoring' is {kind!r}; this scorer knows {', '.join(SCORING_KINDS)}"
            )
        if out_features is not None and expect >= 0 and out_features != expect:
            raise ScoringError(
                f"scoring {kind!r} over {n} features needs {expect} model outputs, "
                f"the model has {out_features}"
            )
        if kind == "raw" and out_features is not None and kw["index"] >= out_features:
            raise ScoringError(f"manifest 'score_params.index' {kw['index']} >= {out_features} outputs")
        kw["smooth"] = _int(a, "smooth", "alarm", 1, 1)
        kw["hold"] = _int(a, "hold", "alarm", 0, 0)
        return cls(features, mean, std, threshold, kind, **kw)

    def with_threshold(self, threshold: float) -> Scoring:
        return replace(self, threshold=float(threshold))

    def standardize(self, x: np.ndarray) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != len(self.features):
            raise ValueError(f"feature rows must have shape (N, {len(self.features)}), got {a.shape}")
        z: np.ndarray = (a - self.mean) / self.std
        return z

    def score(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-row score from the standardized input z and the dequantized output y."""
        z = np.asarray(z, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        out: np.ndarray
        if self.kind == "pca_t2_q":
            k = self.k
            out = np.sum(y[:, :k] ** 2, axis=1) / self.t2_mean
            if self.q_mean > 0:
                out = out + np.sum((z - y[:, k:]) ** 2, axis=1) / self.q_mean
        elif self.kind == "reconstruction_mse":
            out = np.mean((z - y) ** 2, axis=1) / self.scale
        else:
            out = y[:, self.index].copy()
        return out

    def smoothed(self, scores: np.ndarray) -> np.ndarray:
        """Causal mean over the last `smooth` scores (fewer at the start), as the node keeps it."""
        s = np.asarray(scores, dtype=np.float64)
        if self.smooth == 1 or s.size == 0:
            return s.copy()
        c = np.concatenate([[0.0], np.cumsum(s)])
        idx = np.arange(s.size)
        lo = np.maximum(0, idx - self.smooth + 1)
        out: np.ndarray = (c[idx + 1] - c[lo]) / (idx + 1 - lo)
        return out

    def alarms(self, scores: np.ndarray) -> np.ndarray:
        """Alarm per window for scores in time order: smoothed score above the threshold, each
        alarm held for `hold` more windows."""
        raw = self.smoothed(scores) > self.threshold
        if self.hold == 0 or raw.size == 0:
            return raw
        c = np.concatenate([[0], np.cumsum(raw)])
        idx = np.arange(raw.size)
        out: np.ndarray = (c[idx + 1] - c[np.maximum(0, idx - self.hold)]) > 0
        return out


def quantize_input(z: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """float rows -> int8 as the node does it: z / scale in double, halves away from zero, clamp."""
    t = np.asarray(z, dtype=np.float64) / float(scale)
    t = np.clip(t, -1000.0, 1000.0)  # NaN stays NaN and is refused by the caller
    q = np.sign(t) * np.floor(np.abs(t) + 0.5) + zero_point
    out: np.ndarray = np.clip(q, -128, 127).astype(np.int8)
    return out


def dequantize_output(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    out: np.ndarray = (np.asarray(q, dtype=np.float64) - zero_point) * float(scale)
    return out


def score_rows(scoring: Scoring, backend: InferenceBackend, x: np.ndarray) -> np.ndarray:
    """Per-row score of raw feature rows float[N, F] through `backend` (no smoothing).

    :raises ValueError: rows of the wrong width, or NaN / infinity in them.
    """
    z = scoring.standardize(x)
    if not np.all(np.isfinite(z)):
        raise ValueError("feature rows contain NaN or infinity")
    q = quantize_input(z, *backend.input_quant)
    y = dequantize_output(backend.invoke_batch(q), *backend.output_quant)
    return scoring.score(z, y)


def read_model_manifest(data: bytes) -> dict[str, Any]:
    """The manifest of a model file, read with the node's own interpreter (which also checks
    that a node can run the model).

    :raises ScoringError: the node refuses the model, or it has no manifest.
    """
    try:
        man = Model(data).manifest()
    except ModelError as e:
        raise ScoringError(f"the node would refuse this model: {e}") from e
    if man is None:
        raise ScoringError("the model has no 'edgeline.manifest' metadata entry")
    result: dict[str, Any] = man
    return result


class ModelScorer:
    """Score raw feature rows with a model file through a batched backend (LiteRT by default)."""

    def __init__(
        self,
        model: bytes | bytearray | memoryview | str | os.PathLike[str],
        backend: InferenceBackend | str = "litert",
        scoring: Scoring | None = None,
    ) -> None:
        """:raises ScoringError: a model the node would refuse, or a bad manifest.
        :raises BackendUnavailable: no LiteRT / tflite-runtime when a backend name is given."""
        data = bytes(model) if isinstance(model, bytes | bytearray | memoryview) else _read(model)
        self.data = data
        self.manifest = read_model_manifest(data)
        self.backend: InferenceBackend = (
            load_backend(data, prefer=backend) if isinstance(backend, str) else backend
        )
        self.scoring = scoring or Scoring.from_manifest(self.manifest, self.backend.out_features)
        if self.backend.in_features != len(self.scoring.features):
            raise ScoringError(
                f"manifest lists {len(self.scoring.features)} features, the model takes "
                f"{self.backend.in_features} inputs"
            )

    def quantized_inputs(self, x: np.ndarray) -> np.ndarray:
        z = self.scoring.standardize(x)
        if not np.all(np.isfinite(z)):
            raise ValueError("feature rows contain NaN or infinity")
        return quantize_input(z, *self.backend.input_quant)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Per-row score (no smoothing) of raw feature rows float[N, F]."""
        return score_rows(self.scoring, self.backend, x)

    def decide(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(smoothed score, alarm) per row for rows read in time order from a freshly started
        detector: what the node's `Detector.score` returns window by window."""
        s = self.scores(x)
        return self.scoring.smoothed(s), self.scoring.alarms(s)


def _read(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()
