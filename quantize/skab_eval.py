"""Host code. SKAB evaluation: the published per-file protocol, its metrics, and a second,
per-edge-device protocol, reported separately.

Published protocol (SKAB README, "Official evaluation protocol"):

1. The 34 anomalous files. Per file, rows 0..399 fit everything (row features, scaler,
   detector, threshold); every row from 400 on is a test row.
2. Outlier metrics point-wise over the test rows of all files pooled:
   F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN) * 100, MAR = FN / (FN + TP) * 100.
3. Changepoint metric (NAB-style): a window [cp, cp + 60 s] to the right of each true
   changepoint of the test rows (a window that would overlap the next one's start begins at
   the previous window's end instead: "cut right window"). Predicted changepoints are
   |diff(predicted anomaly)| over the test rows, the first test row counting as a change
   when it is predicted anomalous. The earliest prediction inside a window is a TP and earns
   the tanh-shaped reward of `nab_reward` (A_TP at the left edge falling to A_FP at the right
   edge); later predictions in the same window are ignored; a window with none is an FN
   (A_FN); every prediction outside all windows is an FP (A_FP each). Scores are summed over
   files and normalised as 100 * (S - S_null) / (S_perfect - S_null) with
   S_perfect = windows * A_TP and S_null = windows * A_FN. These rules are those of SKAB's
   reference scorer (`core/metrics.py`, defaults), so one consequence carries over: where two
   changepoints are 60 s or less apart the later window starts after its own changepoint, so
   predicting exactly the true changepoints scores 92.91, not 100, on SKAB's test rows.

Streaming detail: the row features and the score smoothing are causal, so a test row may use
the training rows just before it, as a node that has run since row 0 would.

Second protocol ("anomaly-free", a different protocol, never mixed with the table above):
fit once on anomaly-free.csv (all its rows) and test every row of every anomalous file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from .datasets import SKAB_SENSORS, SKAB_TRAIN_ROWS, SkabFile
from .detectors import AlarmRule, AutoencoderDetector, Detector, PCADetector
from .features import RowFeatures

DetectorKind = Literal["pca", "ae"]
NAB_WINDOW_S = 60.0
# (A_TP, A_FP, A_FN) per profile, as SKAB's README and NAB's config/profiles.json give them.
NAB_PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, -0.11, -1.0),
    "low_fp": (1.0, -0.22, -1.0),
    "low_fn": (1.0, -0.11, -2.0),
}
_NAB_DETAIL = 1000  # the reward curve is sampled at this many points across a window

# SKAB README "Proposed Leaderboard" (upstream commit d4ca05a/46e2c1c), copied as published.
# (F1, FAR %, MAR %). LSTM-VAE's row was not recomputed under the 400-row split (see README).
LEADERBOARD_OUTLIER: tuple[tuple[str, float, float, float], ...] = (
    ("Perfect detector", 1.0, 0.0, 0.0),
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("T-squared+Q (PCA-based)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, 29.96, 25.92),
    ("T-squared", 0.66, 19.21, 42.6),
    ("LSTM-VAE", 0.56, 9.13, 55.03),
    ("Vanilla LSTM", 0.54, 12.54, 59.53),
    ("MSCRED", 0.36, 49.94, 69.88),
    ("Vanilla AE", 0.39, 2.59, 75.15),
    ("Isolation forest", 0.29, 2.56, 82.89),
    ("Null detector", 0.0, 0.0, 100.0),
)
# (NAB standard, LowFP, LowFN, missed CPs, FPs); None where the README shows "-".
LEADERBOARD_CPD: tuple[tuple[str, float, float, float, int | None, int | None], ...] = (
    ("Perfect detector", 100.0, 100.0, 100.0, 0, 0),
    ("MSCRED", 32.42, 16.53, 40.28, 55, 342),
    ("Isolation forest", 26.16, 19.5, 30.82, 76, 135),
    ("T-squared+Q (PCA-based)", 25.35, 14.51, 31.33, 72, 232),
    ("Conv-AE", 23.61, 21.54, 27.55, 82, 23),
    ("LSTM-AE", 23.51, 20.11, 25.91, 88, 69),
    ("T-squared", 19.54, 10.2, 24.31, 70, 106),
    ("MSET", 13.84, 10.22, 17.37, 96, 66),
    ("Vanilla AE", 11.41, 6.53, 13.91, 103, 106),
    ("Vanilla LSTM", 11.31, -3.8, 17.25, 90, 342),
    ("ArimaFD", -0.09, -0.17, -0.06, 127, 2),
    ("Null detector", 0.0, 0.0, 0.0, None, None),
)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SkabConfig:
    """Everything that turns a file's rows into alarms. Defaults: PCA on all 8 sensors."""

    columns: tuple[str, ...] = SKAB_SENSORS
    mean_window: int = 1  # causal rolling mean of each column over this many rows
    detector: DetectorKind = "pca"
    explained_variance: float = 0.85  # PCA
    hidden: tuple[int, ...] = (8, 3)  # autoencoder: in-8-3-8-in
    epochs: int = 150
    seed: int = 0
    smooth: int = 1  # AlarmRule
    quantile: float = 0.99
    factor: float = 1.0
    hold: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.columns if c not in SKAB_SENSORS]
        if not self.columns or unknown:
            raise ValueError(
                f"columns must be a non-empty subset of {list(SKAB_SENSORS)}; unknown: {unknown}"
            )
        if self.detector not in ("pca", "ae"):
            raise ValueError(f"detector must be 'pca' or 'ae', got {self.detector!r}")
        self.row_features()
        self.alarm_rule()

    def row_features(self) -> RowFeatures:
        return RowFeatures(tuple(self.columns), self.mean_window)

    def alarm_rule(self) -> AlarmRule:
        return AlarmRule(self.smooth, self.quantile, self.factor, self.hold)

    def new_detector(self) -> PCADetector | AutoencoderDetector:
        if self.detector == "pca":
            return PCADetector(self.explained_variance)
        return AutoencoderDetector(self.hidden, epochs=self.epochs, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = list(self.columns)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SkabConfig:
        """:raises ValueError: an unknown key or a bad value (the message names it)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown SKAB config keys {extra}; known keys: {sorted(known)}")
        kw: dict[str, Any] = dict(d)
        for key in ("columns", "hidden"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# Running a detector on one file


@dataclass
class FittedModel:
    """What one fit produces: the row features, the detector and the calibrated threshold."""

    features: RowFeatures
    detector: Detector
    rule: AlarmRule
    threshold: float


def fit_model(rows: np.ndarray, config: SkabConfig, train: slice) -> tuple[FittedModel, np.ndarray]:
    """Fit on `rows[train]` (raw SKAB rows, all 8 sensors) and return the model and the
    per-row score of every row of `rows` (features computed causally over all rows)."""
    feats = config.row_features()
    x = feats.transform(rows, SKAB_SENSORS)
    det = config.new_detector().fit(x[train])
    scores = det.score(x)
    rule = config.alarm_rule()
    return FittedModel(feats, det, rule, rule.threshold(scores[train])), scores


def predict_file(f: SkabFile, config: SkabConfig, train_rows: int = SKAB_TRAIN_ROWS) -> np.ndarray:
    """Published protocol on one file: fit on its first `train_rows` rows; alarms for ALL rows
    (callers keep rows from `train_rows` on)."""
    if len(f) <= train_rows:
        raise ValueError(f"{f.path}: {len(f)} rows, need more than {train_rows} for the split")
    model, scores = fit_model(f.values, config, slice(0, train_rows))
    return model.rule.alarms(scores, model.threshold)


# --------------------------------------------------------------------------------------------
# Point-wise metrics


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, truth: np.ndarray, predicted: np.ndarray) -> Confusion:
        t = np.asarray(truth).astype(bool)
        p = np.asarray(predicted).astype(bool)
        if t.shape != p.shape:
            raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
        return cls(int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()), int((~t & ~p).sum()))

    def __add__(self, o: Confusion) -> Confusion:
        return Confusion(self.tp + o.tp, self.fp + o.fp, self.fn + o.fn, self.tn + o.tn)

    @property
    def f1(self) -> float:
        d = self.tp + (self.fp + self.fn) / 2
        return self.tp / d if d else 0.0

    @property
    def far(self) -> float:
        d = self.fp + self.tn
        return 100.0 * self.fp / d if d else 0.0

    @property
    def mar(self) -> float:
        d = self.fn + self.tp
        return 100.0 * self.fn / d if d else 0.0

    def metrics(self) -> dict[str, float]:
        """F1, FAR %, MAR % rounded to 2 decimals, as the leaderboard prints them."""
        return {"f1": round(self.f1, 2), "far": round(self.far, 2), "mar": round(self.mar, 2)}


# --------------------------------------------------------------------------------------------
# NAB-style changepoint score


def predicted_changepoints(alarms: np.ndarray) -> np.ndarray:
    """|diff(alarms)|, with the first row a change when it is alarmed (as SKAB's notebooks do)."""
    a = np.asarray(alarms).astype(np.int8)
    if a.size == 0:
        return a.astype(bool)
    out = np.empty(a.size, dtype=bool)
    out[0] = bool(a[0])
    out[1:] = np.abs(np.diff(a)) > 0
    return out


def nab_windows(
    times_s: np.ndarray, changepoints: np.ndarray, width_s: float = NAB_WINDOW_S
) -> list[tuple[float, float]]:
    """[t_cp, t_cp + width] for each true changepoint; a window starting at or before the previous
    one's end starts at that end instead (SKAB's default "cut right window")."""
    t = np.asarray(times_s, dtype=np.float64)
    cps = t[np.asarray(changepoints).astype(bool)]
    wins = [[float(c), float(c) + width_s] for c in cps]
    for i in range(len(wins) - 1):
        if wins[i][1] >= wins[i + 1][0]:
            wins[i + 1][0] = wins[i][1]
    return [(a, b) for a, b in wins]


def nab_reward(position: float, a_tp: float, a_fp: float) -> float:
    """Reward of the first detection at `position` in its window (0 = left edge, 1 = right edge).

    A tanh falling from A_TP at the left edge to A_FP at the right edge, sampled at 1000
    points across the window (SKAB's scoring function, `scale_koef` 1):
    y = (A_TP - A_FP)/2 * (1 - tanh(x)/tanh(pi/2)) + A_FP, x in [-pi/2, pi/2].
    """
    i = min(int(position * _NAB_DETAIL), _NAB_DETAIL - 1)
    x = -math.pi / 2 + i * math.pi / (_NAB_DETAIL - 1)
    half = (a_tp - a_fp) / 2
    return half * (1.0 - math.tanh(x) / math.tanh(math.pi / 2)) + a_fp


@dataclass(frozen=True)
class NabMatch:
    """Predicted changepoints matched against the windows of one file."""

    windows: int
    tp_positions: tuple[float, ...]  # relative position of each window's first detection
    missed: int
    false_positives: int

    def score(self, profile: str) -> float:
        a_tp, a_fp, a_fn = NAB_PROFILES[profile]
        s = sum(nab_reward(p, a_tp, a_fp) for p in self.tp_positions)
        return s + a_fp * self.false_positives + a_fn * self.missed


def nab_match(
    times_s: np.ndarray, true_cp: np.ndarray, predicted_cp: np.ndarray, width_s: float = NAB_WINDOW_S
) -> NabMatch:
    t = np.asarray(times_s, dtype=np.float64)
    pred_t = t[np.asarray(predicted_cp).astype(bool)]
    wins = nab_windows(t, true_cp, width_s)
    inside = np.zeros(pred_t.size, dtype=bool)
    positions: list[float] = []
    missed = 0
    for a, b in wins:
        hit = (pred_t >= a) & (pred_t <= b)
        inside |= hit
        if hit.any():
            first = float(pred_t[hit].min())
            positions.append((first - a) / (b - a) if b > a else 0.0)
        else:
            missed += 1
    return NabMatch(len(wins), tuple(positions), missed, int((~inside).sum()))


def nab_scores(matches: Iterable[NabMatch]) -> dict[str, float]:
    """Normalised NAB score per profile over files, plus the missed-CP and FP counts."""
    ms = list(matches)
    n_win = sum(m.windows for m in ms)
    out: dict[str, float] = {}
    for profile, (a_tp, _a_fp, a_fn) in NAB_PROFILES.items():
        s = sum(m.score(profile) for m in ms)
        perfect, null = n_win * a_tp, n_win * a_fn
        out[profile] = round(100.0 * (s - null) / (perfect - null), 2) if n_win else 0.0
    out["missed_cps"] = float(sum(m.missed for m in ms))
    out["fps"] = float(sum(m.false_positives for m in ms))
    out["changepoints"] = float(n_win)
    return out


def _seconds(times: np.ndarray) -> np.ndarray:
    return times.astype("datetime64[s]").astype(np.int64).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Protocols


@dataclass
class FileResult:
    name: str
    confusion: Confusion
    nab: NabMatch


@dataclass
class ProtocolResult:
    protocol: str
    files: list[FileResult] = field(default_factory=list)

    def subset(self, groups: Sequence[str]) -> ProtocolResult:
        return ProtocolResult(self.protocol, [r for r in self.files if r.name.split("/")[0] in groups])

    @property
    def confusion(self) -> Confusion:
        total = Confusion()
        for r in self.files:
            total = total + r.confusion
        return total

    def summary(self) -> dict[str, Any]:
        c = self.confusion
        return {
            "protocol": self.protocol,
            "files": len(self.files),
            **c.metrics(),
            "tp": c.tp,
            "fp": c.fp,
            "fn": c.fn,
            "tn": c.tn,
            "nab": nab_scores(r.nab for r in self.files),
        }


def _file_result(f: SkabFile, alarms: np.ndarray, rows: slice) -> FileResult:
    assert f.anomaly is not None and f.changepoint is not None
    a = alarms[rows]
    t = _seconds(f.time[rows])
    return FileResult(
        f.name,
        Confusion.of(f.anomaly[rows], a),
        nab_match(t, f.changepoint[rows], predicted_changepoints(a)),
    )


def run_split_protocol(
    files: Sequence[SkabFile], config: SkabConfig, train_rows: int = SKAB_TRAIN_ROWS
) -> ProtocolResult:
    """SKAB's published protocol: per file, fit on the first `train_rows` rows, test the rest."""
    out = ProtocolResult("skab-split-400")
    for f in files:
        if f.anomaly is None:
            raise ValueError(f"{f.path}: no labels; the split protocol needs the anomalous files")
        out.files.append(_file_result(f, predict_file(f, config, train_rows), slice(train_rows, None)))
    return out


def run_anomaly_free_protocol(
    free: SkabFile, files: Sequence[SkabFile], config: SkabConfig
) -> ProtocolResult:
    """The per-edge-device variant: fit once on anomaly-free.csv, test every row of every file.

    Each file is streamed after the anomaly-free rows (its causal features start fresh), and
    the threshold is calibrated on the anomaly-free rows only.
    """
    model, train_scores = fit_model(free.values, config, slice(None))
    out = ProtocolResult("anomaly-free-fit-once")
    for f in files:
        x = model.features.transform(f.values, SKAB_SENSORS)
        scores = model.detector.score(x)
        # Warm the smoothing with the end of the training stream, as a device that kept running would.
        warm = train_scores[-(model.rule.smooth - 1) :] if model.rule.smooth > 1 else train_scores[:0]
        alarms = model.rule.alarms(np.concatenate([warm, scores]), model.threshold)[warm.size :]
        out.files.append(_file_result(f, alarms, slice(None)))
    return out


# --------------------------------------------------------------------------------------------
# Report


def _fmt(v: float | int | None, width: int, digits: int = 2) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, int):
        return str(v).rjust(width)
    return f"{v:.{digits}f}".rjust(width)


def leaderboard_table(ours: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A plain-text table of our rows (label, summary) beside the published leaderboard."""
    lines = ["Outlier detection (SKAB, per-file 400-row split, test rows pooled)"]
    lines.append(f"{'algorithm':44s} {'F1':>6s} {'FAR,%':>7s} {'MAR,%':>7s}")
    rows: list[tuple[str, float, float, float]] = [
        (f"edgeline: {label}", s["f1"], s["far"], s["mar"]) for label, s in ours
    ]
    rows += [(name, f1, far, mar) for name, f1, far, mar in LEADERBOARD_OUTLIER]
    rows.sort(key=lambda r: -r[1])
    for name, f1, far, mar in rows:
        lines.append(f"{name[:44]:44s} {_fmt(f1, 6)} {_fmt(far, 7)} {_fmt(mar, 7)}")
    lines.append("")
    lines.append("Changepoint detection (NAB-style, 60 s window to the right of each changepoint)")
    lines.append(f"{'algorithm':44s} {'std':>7s} {'lowFP':>7s} {'lowFN':>7s} {'missed':>7s} {'FPs':>6s}")
    cpd: list[tuple[str, float, float, float, int | None, int | None]] = []
    for label, s in ours:
        n = s["nab"]
        cpd.append(
            (
                f"edgeline: {label}",
                n["standard"],
                n["low_fp"],
                n["low_fn"],
                int(n["missed_cps"]),
                int(n["fps"]),
            )
        )
    cpd += list(LEADERBOARD_CPD)
    cpd.sort(key=lambda r: -r[1])
    for name, a, b, c, m, fp in cpd:
        lines.append(f"{name[:44]:44s} {_fmt(a, 7)} {_fmt(b, 7)} {_fmt(c, 7)} {_fmt(m, 7)} {_fmt(fp, 6)}")
    return "\n".join(lines)


def report(split: ProtocolResult, free: ProtocolResult | None = None) -> dict[str, Any]:
    """Our rows: all files, valve2 alone, valve1+other (split protocol), and the anomaly-free
    protocol when given, with a printable table beside the leaderboard."""
    rows = {
        "all": split.summary(),
        "valve2": split.subset(("valve2",)).summary(),
        "valve1+other": split.subset(("valve1", "other")).summary(),
    }
    out: dict[str, Any] = {"split_protocol": rows}
    if free is not None:
        out["anomaly_free_protocol"] = {
            "all": free.summary(),
            "valve2": free.subset(("valve2",)).summary(),
            "valve1+other": free.subset(("valve1", "other")).summary(),
        }
    out["table"] = leaderboard_table([("all 34 files", rows["all"])])
    return out
