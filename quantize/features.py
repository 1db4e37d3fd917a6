"""Host code. The feature pipeline.

Two kinds of features live here:

- **Window features**, exactly the node's (`firmware/edgeline_node/features.py`): one window
  of raw samples from one sensor -> `FEATURE_NAMES`. The formulas are the node's, including
  the population variance as `s2/n - mean^2` and `crest = peak / rms`, and so is the order of
  the floating-point operations: the sums are accumulated left to right in float64 (the node
  reads its `array('f')` samples as Python floats, which are doubles on every port that has
  them), so host and node agree to the last bit, not just to a tolerance. Every feature is
  listed by name, once, in `_WINDOW_FEATURES`, which is frozen: the committed demo model and
  the gateway are bound to those five.
- **Per-sensor features**, the node's `Features(sensor, n).compute` (`feature_names(sensor)`):
  the five, then the population excess kurtosis (second pass around the mean, summed in the
  node's order, so it too agrees to the last bit), then for vibration 4 FFT band energies
  normalised so that they sum to the mean square (Parseval). The node runs its own radix-2
  FFT and the host `numpy.fft.rfft`: the band energies agree to rounding relative to the
  window's mean square (about 1e-15 of it), not bit for bit.
- **Row features** for 1 Hz multi-sensor rows (SKAB): a column subset and a causal rolling
  mean over past rows, which a node can keep in a ring buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSums:
    """The running sums the node keeps in its one pass over a window (per window)."""

    n: int
    s: np.ndarray  # sum of x
    s2: np.ndarray  # sum of x*x
    peak: np.ndarray  # max |x|

    @classmethod
    def of(cls, windows: np.ndarray) -> WindowSums:
        """`windows`: float64, (n_windows, n). Sums accumulate left to right, as the node's loop does."""
        n = windows.shape[1]
        # np.cumsum is a sequential accumulation (np.sum is pairwise): its last element is the
        # node's `s += x`, bit for bit.
        s = np.cumsum(windows, axis=1)[:, -1]
        s2 = np.cumsum(windows * windows, axis=1)[:, -1]
        peak = np.max(np.abs(windows), axis=1)
        return cls(n, s, s2, peak)

    @property
    def mean(self) -> np.ndarray:
        return self.s / self.n

    @property
    def mean_square(self) -> np.ndarray:
        return self.s2 / self.n

    @property
    def var(self) -> np.ndarray:
        """Population variance, s2/n - mean^2 (may come out a hair below 0 for a flat window)."""
        m = self.mean
        return self.mean_square - m * m

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.mean_square)


def _std(w: WindowSums) -> np.ndarray:
    v = w.var
    return np.where(v > 0.0, np.sqrt(np.maximum(v, 0.0)), 0.0)


def _crest(w: WindowSums) -> np.ndarray:
    rms = w.rms
    safe = np.where(rms > 0.0, rms, 1.0)
    return np.where(rms > 0.0, w.peak / safe, 0.0)


# The one list of window features, in the node's order (FEATURE_NAMES in the firmware).
_WINDOW_FEATURES: tuple[tuple[str, Callable[[WindowSums], np.ndarray]], ...] = (
    ("mean", lambda w: w.mean),
    ("std", _std),
    ("rms", lambda w: w.rms),
    ("peak", lambda w: w.peak),
    ("crest", _crest),
)
FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in _WINDOW_FEATURES)


def window_features(samples: np.ndarray) -> np.ndarray:
    """The node's features of one window (shape (n,) -> (F,)) or of many (shape (k, n) -> (k, F)).

    Samples may be float32 (what the node stores in `array('f')`) or float64; either way they
    are widened to float64 first, exactly as the node reads them. Columns follow FEATURE_NAMES.

    :raises ValueError: an empty window, or an array that is not 1-D or 2-D.
    """
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise ValueError(f"samples must be one window (1-D) or a stack of windows (2-D), got shape {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError("a window needs at least one sample")
    single = x.ndim == 1
    w = WindowSums.of(np.atleast_2d(x).astype(np.float64))
    out = np.column_stack([fn(w) for _, fn in _WINDOW_FEATURES])
    return out[0] if single else out


KURTOSIS = "kurtosis"
N_BANDS = 4
BAND_NAMES: tuple[str, ...] = tuple(f"band{b}" for b in range(N_BANDS))
BAND_SENSORS: tuple[str, ...] = ("vibration",)


def feature_names(sensor: str) -> tuple[str, ...]:
    """The node's `feature_names(sensor)`: FEATURE_NAMES, kurtosis, and band0..band3 for vibration."""
    if sensor in BAND_SENSORS:
        return (*FEATURE_NAMES, KURTOSIS, *BAND_NAMES)
    return (*FEATURE_NAMES, KURTOSIS)


def _as_windows(samples: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise ValueError(f"samples must be one window (1-D) or a stack of windows (2-D), got shape {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError("a window needs at least one sample")
    return np.atleast_2d(x).astype(np.float64), x.ndim == 1


def _kurtosis(windows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Population excess kurtosis m4 / m2^2 - 3 around `mean`, summed in the node's order; 0 if flat."""
    n = windows.shape[1]
    d = windows - mean[:, None]
    d2 = d * d
    m2 = np.cumsum(d2, axis=1)[:, -1]
    m4 = np.cumsum(d2 * d2, axis=1)[:, -1]
    flat = m2 <= 0.0
    m2n = np.where(flat, 1.0, m2 / n)
    out: np.ndarray = np.where(flat, 0.0, (m4 / n) / (m2n * m2n) - 3.0)
    return out


def band_energies(samples: np.ndarray) -> np.ndarray:
    """The node's 4 FFT band energies of one window ((n,) -> (4,)) or many ((k, n) -> (k, 4)).

    Band b holds the rfft bins of frequencies [b, b+1) * fs / 8 (the Nyquist bin in band 3),
    each weighted |X_k|^2 / n^2, doubled for bins other than DC and Nyquist: the bands sum to
    mean(x^2) (Parseval).

    :raises ValueError: a window length that is not a power of two >= 8 (the node's radix-2 FFT).
    """
    w, single = _as_windows(samples)
    n = w.shape[1]
    if n < 8 or n & (n - 1):
        raise ValueError(f"band energies need a window of a power of two >= 8 samples, got {n}")
    p = np.abs(np.fft.rfft(w, axis=1)) ** 2 / (float(n) * float(n))
    p[:, 1:-1] *= 2.0
    per = n // 8
    out = np.column_stack(
        [p[:, b * per : (b + 1) * per].sum(axis=1) for b in range(N_BANDS - 1)]
        + [p[:, (N_BANDS - 1) * per :].sum(axis=1)]
    )
    return out[0] if single else out


def sensor_features(samples: np.ndarray, sensor: str) -> np.ndarray:
    """The node's per-sensor features (`feature_names(sensor)` columns) of one window or many.

    :raises ValueError: as window_features; for a band sensor also as band_energies.
    """
    w, single = _as_windows(samples)
    base = window_features(w)
    cols = [base, _kurtosis(w, base[:, 0])[:, None]]
    if sensor in BAND_SENSORS:
        cols.append(band_energies(w))
    out = np.concatenate(cols, axis=1)
    return out[0] if single else out


def feature_labels(sensors: Sequence[str]) -> list[str]:
    """`sensor.feature` labels for the concatenated features of several sensors."""
    return [f"{s}.{f}" for s in sensors for f in FEATURE_NAMES]


# --------------------------------------------------------------------------------------------
# Row features (1 Hz rows of several sensors)


def causal_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last `k` rows up to and including each row (fewer at the start).

    Row i depends only on rows max(0, i-k+1)..i, so it can run online on a node with a
    k-row ring buffer. Works on 1-D (n,) and 2-D (n, d) arrays.
    """
    if k < 1:
        raise ValueError(f"rolling window must be >= 1 row, got {k}")
    a = np.asarray(x, dtype=np.float64)
    if k == 1 or a.shape[0] == 0:
        return a.copy()
    c = np.concatenate([np.zeros((1, *a.shape[1:])), a], axis=0).cumsum(axis=0)
    idx = np.arange(a.shape[0])
    lo = np.maximum(0, idx - k + 1)
    count = (idx + 1 - lo).astype(np.float64)
    if a.ndim > 1:
        count = count.reshape(-1, *([1] * (a.ndim - 1)))
    out: np.ndarray = (c[idx + 1] - c[lo]) / count
    return out


@dataclass(frozen=True)
class RowFeatures:
    """Pick `columns` from rows of `all_columns`, then average each over the last `mean_window` rows."""

    columns: tuple[str, ...]
    mean_window: int = 1

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError("RowFeatures needs at least one column")
        if self.mean_window < 1:
            raise ValueError(f"mean_window must be >= 1, got {self.mean_window}")

    @property
    def names(self) -> list[str]:
        suffix = f"~mean{self.mean_window}" if self.mean_window > 1 else ""
        return [c + suffix for c in self.columns]

    def transform(self, rows: np.ndarray, all_columns: Sequence[str]) -> np.ndarray:
        """rows: (n, len(all_columns)) -> (n, len(columns)), causal."""
        if rows.ndim != 2 or rows.shape[1] != len(all_columns):
            raise ValueError(f"rows must have shape (n, {len(all_columns)}), got {rows.shape}")
        idx = []
        for c in self.columns:
            if c not in all_columns:
                raise ValueError(f"unknown column {c!r}; the rows have {list(all_columns)}")
            idx.append(list(all_columns).index(c))
        return causal_mean(rows[:, idx], self.mean_window)
