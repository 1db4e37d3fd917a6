"""Host code. SKAB with int8 detectors: the published protocol and the anomaly-free one, each
detector quantized and run as a ``.tflite`` file, beside its float twin.

Published protocol (see `skab_eval`): per file, the first 400 rows fit the row features, the
float detector and its threshold; then the detector is quantized to int8 (activation ranges
calibrated on those 400 rows plus the same rows scaled by `headroom`,
`detectors.int8_calibration_rows`), its threshold re-calibrated on its own int8 scores of the
same 400 rows with the same rule (0.99 quantile of the smoothed score x factor), written as a
``.tflite`` with its manifest, read back, and every row of the file scored from those bytes:

- `reference`: the numpy kernels with tflite-micro's rounding (the node's, bit for bit);
- `tflite-micro`: the tflite-micro interpreter itself (its outputs are also compared byte for
  byte with the reference on every row);
- `litert`: the gateway's LiteRT (one rounding instead of two: up to 1 LSB apart).

Alarms follow the manifest (`alarm.smooth`, `alarm.hold`, `threshold`), i.e. what a node would
do with that file. Hyperparameters: `tune.SELECTED_CONFIG` (chosen on valve1/ and other/ only)
and `headroom` (`headroom_sweep` on valve1/ and other/ only).

Anomaly-free protocol (a different protocol): one detector fitted and quantized on all of
anomaly-free.csv, as a node would be commissioned, then every row of every anomalous file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import SKAB_SENSORS, SKAB_TRAIN_ROWS, SkabFile, load_skab, load_skab_anomaly_free
from .int8_detector import DEFAULT_HEADROOM, Int8Detector, build_int8
from .skab_eval import (
    FileResult,
    FittedModel,
    ProtocolResult,
    SkabConfig,
    _file_result,
    fit_model,
    leaderboard_table,
)
from .tune import SELECTED_CONFIG, TARGET_FAR, TARGET_MAR, TUNE_GROUPS

RUNTIMES = ("reference", "tflite-micro", "litert")
TARGET_F1 = 0.80
MAX_F1_GAP = 0.01


@dataclass
class SkabInt8Fit:
    """One fit: the float model, its int8 twin, and what they saw."""

    int8: Int8Detector
    float_model: FittedModel
    x: np.ndarray  # row features of every row of the fitted file
    float_scores: np.ndarray  # float scores of every row


def skab_int8_detector(
    rows: np.ndarray,
    config: SkabConfig,
    train: slice,
    *,
    headroom: float = DEFAULT_HEADROOM,
    version: str = "1",
    extra: dict[str, Any] | None = None,
) -> SkabInt8Fit:
    """Fit the float detector on rows[train] (raw SKAB rows, all 8 sensors), quantize it."""
    model, float_scores = fit_model(rows, config, train)
    x = model.features.transform(rows, SKAB_SENSORS)
    ex: dict[str, Any] = {"input_mean_window": config.mean_window}
    ex.update(extra or {})
    int8 = build_int8(
        model.detector,
        x[train],
        model.features.names,
        lambda score: model.rule.threshold(score(x[train])),
        headroom=headroom,
        version=version,
        alarm={"smooth": config.smooth, "hold": config.hold},
        extra=ex,
    )
    return SkabInt8Fit(int8, model, x, float_scores)


@dataclass
class Int8Protocol:
    """Per-runtime results of one protocol, plus the byte-level agreement of the runtimes."""

    protocol: str
    results: dict[str, ProtocolResult] = field(default_factory=dict)  # "float" and each runtime
    rows: int = 0
    tflm_equal_rows: int = 0  # rows where tflite-micro's int8 output equals the reference's
    litert_max_lsb: int = 0
    litert_differing_values: int = 0
    values: int = 0
    decisions_differing: dict[str, int] = field(default_factory=dict)  # runtime vs reference
    seconds: float = 0.0

    def add(self, name: str, r: FileResult) -> None:
        self.results.setdefault(name, ProtocolResult(self.protocol)).files.append(r)

    def summary(self, groups: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        out = {}
        for name, res in self.results.items():
            out[name] = (res.subset(groups) if groups else res).summary()
        return out


def _compare_runtimes(
    p: Int8Protocol, det: Int8Detector, x: np.ndarray, runtimes: Sequence[str]
) -> dict[str, np.ndarray]:
    """Scores per runtime; counts byte agreement of tflite-micro and LiteRT with the reference."""
    y_ref = det.outputs(x, "reference")
    p.rows += y_ref.shape[0]
    p.values += y_ref.size
    out = {"reference": det.scores(x, "reference")}
    if "tflite-micro" in runtimes:
        y = det.outputs(x, "tflite-micro")
        p.tflm_equal_rows += int(np.sum(np.all(y == y_ref, axis=1)))
        out["tflite-micro"] = det.scores(x, "tflite-micro")
    if "litert" in runtimes:
        y = det.outputs(x, "litert")
        d = np.abs(y.astype(np.int16) - y_ref.astype(np.int16))
        p.litert_max_lsb = max(p.litert_max_lsb, int(d.max()))
        p.litert_differing_values += int(np.sum(d != 0))
        out["litert"] = det.scores(x, "litert")
    return out


def run_int8_split_protocol(
    files: Sequence[SkabFile],
    config: SkabConfig = SELECTED_CONFIG,
    *,
    headroom: float = DEFAULT_HEADROOM,
    runtimes: Sequence[str] = RUNTIMES,
    train_rows: int = SKAB_TRAIN_ROWS,
) -> Int8Protocol:
    """SKAB's published protocol with a float detector and its int8 twin per file."""
    t0 = time.monotonic()
    p = Int8Protocol("skab-split-400")
    test = slice(train_rows, None)
    for f in files:
        if f.anomaly is None:
            raise ValueError(f"{f.path}: no labels; the split protocol needs the anomalous files")
        fit = skab_int8_detector(f.values, config, slice(0, train_rows), headroom=headroom)
        det, x = fit.int8, fit.x
        rule = fit.float_model.rule
        p.add("float", _file_result(f, rule.alarms(fit.float_scores, fit.float_model.threshold), test))
        scoring = det.scoring()
        alarms_ref = None
        for name, s in _compare_runtimes(p, det, x, runtimes).items():
            a = scoring.alarms(s)
            if alarms_ref is None:
                alarms_ref = a
            else:
                p.decisions_differing[name] = p.decisions_differing.get(name, 0) + int(
                    np.sum(a != alarms_ref)
                )
            p.add(name, _file_result(f, a, test))
    p.seconds = time.monotonic() - t0
    return p


def anomaly_free_detector(
    free: SkabFile,
    config: SkabConfig = SELECTED_CONFIG,
    *,
    headroom: float = DEFAULT_HEADROOM,
    version: str = "1",
) -> SkabInt8Fit:
    """The commissioning fit: all rows of anomaly-free.csv (what models/ ships for SKAB)."""
    extra = {
        "training": {
            "data": "SKAB v0.9 anomaly-free/anomaly-free.csv (all 9,405 rows)",
            "protocol": "anomaly-free fit-once (not the SKAB leaderboard protocol)",
        },
        "config": config.to_dict(),
    }
    return skab_int8_detector(
        free.values, config, slice(None), headroom=headroom, version=version, extra=extra
    )


def run_int8_anomaly_free_protocol(
    free: SkabFile,
    files: Sequence[SkabFile],
    config: SkabConfig = SELECTED_CONFIG,
    *,
    headroom: float = DEFAULT_HEADROOM,
    runtimes: Sequence[str] = RUNTIMES,
) -> tuple[Int8Protocol, Int8Detector]:
    """Fit once on anomaly-free.csv (float and int8), then every row of every file, each file
    streamed after the training rows (smoothing warmed with their last scores)."""
    t0 = time.monotonic()
    fit = anomaly_free_detector(free, config, headroom=headroom)
    det, fm = fit.int8, fit.float_model
    scoring = det.scoring()
    int8_train = det.scores(fit.x)
    warm_n = config.smooth - 1
    p = Int8Protocol("anomaly-free-fit-once")
    for f in files:
        x = fm.features.transform(f.values, SKAB_SENSORS)
        fs = fm.detector.score(x)
        warm = fit.float_scores[len(fit.float_scores) - warm_n :] if warm_n else fit.float_scores[:0]
        alarms = fm.rule.alarms(np.concatenate([warm, fs]), fm.threshold)[warm.size :]
        p.add("float", _file_result(f, alarms, slice(None)))
        alarms_ref = None
        for name, s in _compare_runtimes(p, det, x, runtimes).items():
            w = int8_train[len(int8_train) - warm_n :] if warm_n else int8_train[:0]
            a = scoring.alarms(np.concatenate([w, s]))[w.size :]
            if alarms_ref is None:
                alarms_ref = a
            else:
                p.decisions_differing[name] = p.decisions_differing.get(name, 0) + int(
                    np.sum(a != alarms_ref)
                )
            p.add(name, _file_result(f, a, slice(None)))
    p.seconds = time.monotonic() - t0
    return p, det


def headroom_sweep(
    shared_dir: str | Path, headrooms: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0)
) -> list[dict[str, Any]]:
    """int8 metrics on the tuning files (valve1/, other/) per calibration headroom."""
    files = load_skab(shared_dir, TUNE_GROUPS)
    out = []
    for h in headrooms:
        p = run_int8_split_protocol(files, headroom=h, runtimes=("reference",))
        s = p.summary()
        out.append({"headroom": h, "int8": _metrics(s["reference"]), "float": _metrics(s["float"])})
    return out


def _metrics(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "f1": s["f1"],
        "far": s["far"],
        "mar": s["mar"],
        "tp": s["tp"],
        "fp": s["fp"],
        "fn": s["fn"],
        "tn": s["tn"],
        "nab_standard": s["nab"]["standard"],
    }


def _agreement(p: Int8Protocol) -> dict[str, Any]:
    return {
        "rows": p.rows,
        "tflite_micro_rows_identical": p.tflm_equal_rows,
        "litert_max_lsb": p.litert_max_lsb,
        "litert_values_differing": p.litert_differing_values,
        "values": p.values,
        "alarms_differing_from_reference": dict(p.decisions_differing),
        "seconds": round(p.seconds, 1),
    }


GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "valve2": ("valve2",),
    "valve1+other": ("valve1", "other"),
}


def evaluate_int8(
    shared_dir: str | Path,
    config: SkabConfig = SELECTED_CONFIG,
    *,
    headroom: float = DEFAULT_HEADROOM,
    runtimes: Sequence[str] = RUNTIMES,
    anomaly_free: bool = True,
) -> dict[str, Any]:
    """Both protocols, float and int8 (per runtime), per file group, with the targets and a
    printable table beside the leaderboard."""
    files = load_skab(shared_dir)
    split = run_int8_split_protocol(files, config, headroom=headroom, runtimes=runtimes)
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "headroom": headroom,
        "split_protocol": {g: split.summary(groups) for g, groups in GROUPS.items()},
        "split_agreement": _agreement(split),
    }
    s_all = out["split_protocol"]["all"]
    i8, fl = s_all["reference"], s_all["float"]
    out["targets"] = {
        "f1": TARGET_F1,
        "far": TARGET_FAR,
        "mar": TARGET_MAR,
        "max_f1_gap": MAX_F1_GAP,
        "int8_meets": bool(i8["f1"] >= TARGET_F1 and i8["far"] <= TARGET_FAR and i8["mar"] <= TARGET_MAR),
        "f1_gap": round(abs(fl["f1"] - i8["f1"]), 4),
        "f1_gap_unrounded": _f1_gap(split),
    }
    if anomaly_free:
        free, _ = run_int8_anomaly_free_protocol(
            load_skab_anomaly_free(shared_dir), files, config, headroom=headroom, runtimes=runtimes
        )
        out["anomaly_free_protocol"] = {g: free.summary(groups) for g, groups in GROUPS.items()}
        out["anomaly_free_agreement"] = _agreement(free)
    out["table"] = leaderboard_table([("int8 (all 34 files)", i8), ("float twin (all 34 files)", fl)])
    out["markdown"] = markdown_tables(out)
    return out


def _f1_gap(p: Int8Protocol) -> float:
    return round(abs(p.results["float"].confusion.f1 - p.results["reference"].confusion.f1), 4)


def markdown_tables(result: dict[str, Any]) -> str:
    """The tables docs/detectors.md shows."""
    lines = [
        "| protocol | files | detector | F1 | FAR, % | MAR, % | TP | FP | FN | TN | NAB std |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "float": "float",
        "reference": "int8 (numpy ref = tflite-micro = node)",
        "tflite-micro": "int8, tflite-micro",
        "litert": "int8, LiteRT",
    }
    for proto_key, proto_name in (
        ("split_protocol", "published (400-row split)"),
        ("anomaly_free_protocol", "anomaly-free fit-once (different protocol)"),
    ):
        if proto_key not in result:
            continue
        for g in GROUPS:
            for name, s in result[proto_key][g].items():
                if name not in labels:
                    continue
                lines.append(
                    f"| {proto_name} | {g} | {labels[name]} | {s['f1']:.2f} | {s['far']:.2f} "
                    f"| {s['mar']:.2f} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} "
                    f"| {s['nab']['standard']:.2f} |"
                )
    return "\n".join(lines)
