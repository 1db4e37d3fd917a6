"""Host code. Float detectors and the alarm rule, in numpy only.

Every detector is a chain of FULLY_CONNECTED layers (`DenseLayer`: weights W[out, in], bias
b[out], activation none|relu) applied to standardized inputs, followed by a scoring function
of the model output and the model input:

    x_scaled = detector.scaler.transform(x)
    y        = forward(detector.layers(), x_scaled)
    score    = detector.score_from_output(x_scaled, y)       # one number per row, ~1 = typical

An int8 twin of the same layers (written elsewhere) dequantizes its output and calls the
same `score_from_output`, so float and int8 are scored identically.

- `PCADetector`: one layer whose output is [whitened projections ; reconstruction]. From it
  Hotelling's T^2 (sum of squared whitened projections) and Q / SPE (squared reconstruction
  error) follow; the score is the combined index T^2/E[T^2] + Q/E[Q], each statistic divided
  by its mean on the training rows, so a normal row scores about 2.
- `AutoencoderDetector`: in-h1-..-hk-..-h1-in, relu hidden layers, linear output, trained with
  Adam on mean squared reconstruction error, seeded and deterministic; the score is the
  squared reconstruction error divided by its mean on the training rows.

`AlarmRule` turns scores into alarms, causally (each row uses only itself and earlier rows):
a rolling mean of the score over the last `smooth` rows, a threshold calibrated on training
(normal) rows only as `quantile(smoothed training scores, q) * factor`, and a hold: once
raised, an alarm clears only after `hold` consecutive rows below the threshold (the
raise/clear hysteresis of the gateway's alarm lifecycle).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .features import causal_mean

Activation = Literal["none", "relu"]
ACTIVATIONS: tuple[Activation, ...] = ("none", "relu")


@dataclass(frozen=True)
class DenseLayer:
    """One FULLY_CONNECTED layer: y = act(x @ W.T + b)."""

    weights: np.ndarray  # float64, shape (out, in)
    bias: np.ndarray  # float64, shape (out,)
    activation: Activation = "none"

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.bias.shape != (self.weights.shape[0],):
            raise ValueError(
                f"layer shapes disagree: weights {self.weights.shape}, bias {self.bias.shape} "
                "(expected W[out, in] and b[out])"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: use one of {ACTIVATIONS}")

    # The names the int8 quantizer (quantize/int8.py) and the TFLite schema use.
    @property
    def W(self) -> np.ndarray:
        return self.weights

    @property
    def b(self) -> np.ndarray:
        return self.bias

    @property
    def in_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weights.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = x @ self.weights.T + self.bias
        return np.maximum(y, 0.0) if self.activation == "relu" else y


def forward(layers: Sequence[DenseLayer], x: np.ndarray) -> np.ndarray:
    """Run the float layer chain on rows x (n, in)."""
    y = np.asarray(x, dtype=np.float64)
    for i, layer in enumerate(layers):
        if y.shape[-1] != layer.in_features:
            raise ValueError(f"layer {i} takes {layer.in_features} inputs, got {y.shape[-1]}")
        y = layer(y)
    return y


@dataclass(frozen=True)
class Standardizer:
    """x -> (x - mean) / scale, fitted on training rows. A column that was constant in training
    keeps scale 1 (its changes then count in its own units rather than dividing by zero)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = _rows(x, "training rows")
        mean = x.mean(axis=0)
        sd = x.std(axis=0)
        flat = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
        return cls(mean, np.where(flat, 1.0, sd))

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x, "rows")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected {self.mean.shape[0]} columns, got {x.shape[1]}")
        out: np.ndarray = (x - self.mean) / self.scale
        return out


def _rows(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (rows, columns), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain NaN or infinity")
    return a


class Detector(ABC):
    """A fitted detector: scaler + FC layer chain + scoring function."""

    scaler: Standardizer

    @abstractmethod
    def layers(self) -> list[DenseLayer]: ...

    @abstractmethod
    def score_from_output(self, x_scaled: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-row anomaly score from the model input (standardized) and the model output."""

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per-row score of raw (unscaled) rows."""
        z = self.scaler.transform(x)
        return self.score_from_output(z, forward(self.layers(), z))


class PCADetector(Detector):
    """PCA on standardized training rows; components kept up to `explained_variance`.

    At least one component is kept, and at most d-1 so that Q has a residual space.
    """

    def __init__(self, explained_variance: float = 0.85) -> None:
        if not 0.0 < explained_variance <= 1.0:
            raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
        self.explained_variance = explained_variance
        self.n_components = 0
        self.components = np.zeros((0, 0))  # (d, k), columns are principal directions
        self.eigenvalues = np.zeros(0)  # all d, descending
        self.t2_mean = 1.0
        self.q_mean = 0.0

    def fit(self, x: np.ndarray) -> PCADetector:
        x = _rows(x, "training rows")
        if x.shape[0] < 2:
            raise ValueError("PCA needs at least 2 training rows")
        self.scaler = Standardizer.fit(x)
        z = self.scaler.transform(x)
        d = z.shape[1]
        cov = np.atleast_2d(np.cov(z, rowvar=False))
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1]
        w = np.clip(w[order], 0.0, None)
        v = v[:, order]
        # Fix each eigenvector's sign (largest |entry| positive) so the model is reproducible.
        signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(d)])
        v = v * np.where(signs == 0, 1.0, signs)
        total = float(w.sum())
        if total <= 0.0:
            k = 1
        else:
            cum = np.cumsum(w) / total
            k = int(np.searchsorted(cum, self.explained_variance - 1e-12) + 1)
        k = max(1, min(k, d - 1)) if d > 1 else 1
        self.n_components = k
        self.components = v[:, :k]
        self.eigenvalues = w
        floor = 1e-12 * max(float(w[0]), 1e-300)
        self._lam = np.maximum(w[:k], floor)
        # Expected values of the two statistics on the training rows (Jackson & Mudholkar):
        # E[T^2] = k for whitened scores, E[Q] = sum of the discarded eigenvalues.
        self.t2_mean = float(k)
        self.q_mean = float(w[k:].sum())
        return self

    def layers(self) -> list[DenseLayer]:
        p = self.components
        whiten = (p / np.sqrt(self._lam)).T  # (k, d): whitened projections
        recon = p @ p.T  # (d, d): reconstruction from the kept components
        w = np.vstack([whiten, recon])
        return [DenseLayer(w, np.zeros(w.shape[0]), "none")]

    def statistics(self, x_scaled: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T^2, Q) per row from the layer output [whitened projections ; reconstruction]."""
        k = self.n_components
        d = x_scaled.shape[1]
        if y.shape[1] != k + d:
            raise ValueError(
                f"PCA output must have {k + d} columns (k={k} projections + d={d}), got {y.shape[1]}"
            )
        t2 = np.sum(y[:, :k] ** 2, axis=1)
        q = np.sum((x_scaled - y[:, k:]) ** 2, axis=1)
        return t2, q

    def score_from_output(self, x_scaled: np.ndarray, y: np.ndarray) -> np.ndarray:
        t2, q = self.statistics(x_scaled, y)
        score: np.ndarray = t2 / self.t2_mean
        if self.q_mean > 1e-12:
            score = score + q / self.q_mean
        return score


class AutoencoderDetector(Detector):
    """A small dense autoencoder in numpy: in-h1-..-hk-..-h1-in, relu hidden, linear output.

    Trained with Adam (full determinism: one seeded generator drives initialisation and
    shuffling). `restarts` trains that many seeds and keeps the lowest training loss, which
    guards against a run whose narrow bottleneck dies (all-zero relu units).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (8, 3),
        *,
        epochs: int = 150,
        learning_rate: float = 5e-3,
        batch_size: int = 64,
        seed: int = 0,
        restarts: int = 2,
    ) -> None:
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(hidden)}")
        if epochs < 1 or batch_size < 1 or restarts < 1 or learning_rate <= 0:
            raise ValueError("epochs, batch_size and restarts must be >= 1 and learning_rate > 0")
        self.hidden = tuple(int(h) for h in hidden)
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.seed = seed
        self.restarts = restarts
        self._w: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self.train_loss = math.inf
        self.spe_mean = 1.0

    def fit(self, x: np.ndarray) -> AutoencoderDetector:
        x = _rows(x, "training rows")
        self.scaler = Standardizer.fit(x)
        z = self.scaler.transform(x)
        d = z.shape[1]
        sizes = [d, *self.hidden, *self.hidden[-2::-1], d]
        best: tuple[float, list[np.ndarray], list[np.ndarray]] | None = None
        for r in range(self.restarts):
            w, b = self._train(z, sizes, np.random.default_rng([self.seed, r]))
            loss = float(np.mean((_forward_raw(w, b, z) - z) ** 2))
            if best is None or loss < best[0]:
                best = (loss, w, b)
        assert best is not None
        self.train_loss, self._w, self._b = best
        spe = np.sum((_forward_raw(self._w, self._b, z) - z) ** 2, axis=1)
        self.spe_mean = max(float(spe.mean()), 1e-12)
        return self

    def _train(
        self, z: np.ndarray, sizes: list[int], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        n_layers = len(sizes) - 1
        w = [rng.normal(0.0, math.sqrt(2.0 / sizes[i]), (sizes[i + 1], sizes[i])) for i in range(n_layers)]
        b = [np.full(sizes[i + 1], 0.01 if i < n_layers - 1 else 0.0) for i in range(n_layers)]
        params = w + b
        m1 = [np.zeros_like(p) for p in params]
        m2 = [np.zeros_like(p) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        step = 0
        n = z.shape[0]
        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for start in range(0, n, self.batch_size):
                xb = z[perm[start : start + self.batch_size]]
                acts = [xb]
                a = xb
                for i in range(n_layers):
                    a = a @ w[i].T + b[i]
                    if i < n_layers - 1:
                        a = np.maximum(a, 0.0)
                    acts.append(a)
                g = 2.0 * (a - xb) / xb.size  # d(mean squared error)/d(output)
                grads_w: list[np.ndarray] = [np.empty(0)] * n_layers
                grads_b: list[np.ndarray] = [np.empty(0)] * n_layers
                for i in reversed(range(n_layers)):
                    if i < n_layers - 1:
                        g = g * (acts[i + 1] > 0.0)
                    grads_w[i] = g.T @ acts[i]
                    grads_b[i] = g.sum(axis=0)
                    g = g @ w[i]
                step += 1
                c1 = 1.0 - beta1**step
                c2 = 1.0 - beta2**step
                for j, (p, gr) in enumerate(zip(params, grads_w + grads_b, strict=True)):
                    m1[j] = beta1 * m1[j] + (1.0 - beta1) * gr
                    m2[j] = beta2 * m2[j] + (1.0 - beta2) * gr * gr
                    p -= self.learning_rate * (m1[j] / c1) / (np.sqrt(m2[j] / c2) + eps)
        return w, b

    def layers(self) -> list[DenseLayer]:
        if not self._w:
            raise RuntimeError("the autoencoder is not fitted: call fit() first")
        n = len(self._w)
        return [
            DenseLayer(self._w[i].copy(), self._b[i].copy(), "relu" if i < n - 1 else "none")
            for i in range(n)
        ]

    def score_from_output(self, x_scaled: np.ndarray, y: np.ndarray) -> np.ndarray:
        if y.shape != x_scaled.shape:
            raise ValueError(f"autoencoder output shape {y.shape} differs from its input {x_scaled.shape}")
        out: np.ndarray = np.sum((x_scaled - y) ** 2, axis=1) / self.spe_mean
        return out


def int8_calibration_rows(x_scaled_train: np.ndarray, headroom: float = 4.0) -> np.ndarray:
    """Representative rows for int8 calibration: the standardized training rows plus copies
    scaled by `headroom`.

    Calibrating the activation ranges on normal rows alone clips every anomaly back into the
    normal range, and the clipped rows then score as normal (on SKAB the int8 twin fell from
    F1 0.86 to 0.26 that way). With 4x headroom the int8 PCA detector matched its float twin
    within 0.01 F1; the extra input step (range/255) is small next to the standardized noise.
    """
    z = _rows(x_scaled_train, "training rows")
    if headroom < 1.0:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    return np.vstack([z, headroom * z])


def _forward_raw(w: list[np.ndarray], b: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    a = x
    for i in range(len(w)):
        a = a @ w[i].T + b[i]
        if i < len(w) - 1:
            a = np.maximum(a, 0.0)
    return a


# --------------------------------------------------------------------------------------------
# Scores -> alarms


def hold_alarms(raw: np.ndarray, hold: int) -> np.ndarray:
    """Keep each alarm raised until `hold` consecutive rows have been quiet (causal).

    Row i is alarmed if any of rows i-hold..i had a raw alarm.
    """
    r = np.asarray(raw, dtype=bool)
    if hold < 0:
        raise ValueError(f"hold must be >= 0, got {hold}")
    if hold == 0 or r.size == 0:
        return r.copy()
    c = np.concatenate([[0], np.cumsum(r)])
    idx = np.arange(r.size)
    lo = np.maximum(0, idx - hold)
    out: np.ndarray = (c[idx + 1] - c[lo]) > 0
    return out


@dataclass(frozen=True)
class AlarmRule:
    """Causal post-processing of a per-row score, with a threshold calibrated on normal rows."""

    smooth: int = 1  # rolling mean of the score over the last `smooth` rows
    quantile: float = 0.99  # of the smoothed training scores ...
    factor: float = 1.0  # ... times this factor is the threshold
    hold: int = 0  # rows an alarm stays raised after the smoothed score falls back

    def __post_init__(self) -> None:
        if self.smooth < 1 or self.hold < 0:
            raise ValueError(f"smooth must be >= 1 and hold >= 0, got {self.smooth}, {self.hold}")
        if not 0.0 < self.quantile <= 1.0 or self.factor <= 0.0:
            raise ValueError(f"quantile must be in (0, 1] and factor > 0, got {self.quantile}, {self.factor}")

    def smoothed(self, scores: np.ndarray) -> np.ndarray:
        return causal_mean(np.asarray(scores, dtype=np.float64), self.smooth)

    def threshold(self, train_scores: np.ndarray) -> float:
        """Threshold from the (unsmoothed) scores of normal training rows, read in order."""
        s = self.smoothed(train_scores)
        if s.size == 0:
            raise ValueError("no training scores to calibrate the threshold on")
        return float(np.quantile(s, self.quantile)) * self.factor

    def alarms(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        """Boolean alarm per row for scores read in time order."""
        return hold_alarms(self.smoothed(scores) > threshold, self.hold)
