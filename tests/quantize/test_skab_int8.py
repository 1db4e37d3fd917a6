"""int8 detectors under SKAB's published protocol, through the real int8 path.

Per file: fit the float detector on rows 0-399 (`tune.SELECTED_CONFIG`, chosen on valve1/ and
other/ only), quantize it (calibration: those rows plus 4x headroom, the headroom also chosen on
valve1/ and other/ only), re-calibrate the threshold on its int8 training scores, write the
.tflite with its manifest, read it back, and score every row from the file with the numpy
reference (tflite-micro's rounding), with tflite-micro itself and with LiteRT. Targets on all 34
files: F1 >= 0.80, FAR <= 15 %, MAR <= 25 %, and within 0.01 F1 of the float twin. The numbers
docs/detectors.md reports are pinned here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgeline.host.model_scorer import Scoring
from edgeline.quantize import datasets as ds
from edgeline.quantize import skab_int8
from edgeline.quantize.int8_detector import Int8Detector, same_model
from edgeline.quantize.tflite_reader import read_tflite
from edgeline.quantize.tflite_writer import write_tflite
from edgeline.quantize.tune import SELECTED_CONFIG


@pytest.fixture(scope="module")
def result(shared: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    r = skab_int8.evaluate_int8(shared)
    elapsed = time.monotonic() - t0
    print(f"\n{r['table']}\n\n{r['markdown']}\n({elapsed:.1f} s)")
    assert elapsed < 60
    return r


def _check(row: dict[str, Any], f1: float, far: float, mar: float) -> None:
    assert row["f1"] == pytest.approx(f1, abs=0.005)
    assert row["far"] == pytest.approx(far, abs=0.05)
    assert row["mar"] == pytest.approx(mar, abs=0.05)


def test_int8_meets_the_targets_within_001_of_float(result: dict[str, Any]) -> None:
    s = result["split_protocol"]["all"]
    i8, fl = s["reference"], s["float"]
    assert i8["files"] == 34 and sum(i8[k] for k in ("tp", "fp", "fn", "tn")) == 23_801
    assert i8["f1"] >= 0.80 and i8["far"] <= 15.0 and i8["mar"] <= 25.0
    assert result["targets"]["int8_meets"]
    assert result["targets"]["f1_gap_unrounded"] <= 0.01
    assert abs(fl["f1"] - i8["f1"]) <= 0.01
    # the numbers docs/detectors.md reports
    _check(i8, 0.86, 12.57, 16.14)
    _check(fl, 0.86, 12.54, 16.17)
    _check(result["split_protocol"]["valve2"]["reference"], 0.93, 1.42, 12.46)
    _check(result["split_protocol"]["valve1+other"]["reference"], 0.85, 13.92, 16.63)
    assert i8["nab"]["standard"] == pytest.approx(31.83, abs=0.5)


def test_every_runtime_gives_the_same_alarms(result: dict[str, Any]) -> None:
    for proto in ("split_agreement", "anomaly_free_agreement"):
        a = result[proto]
        assert a["tflite_micro_rows_identical"] == a["rows"] == 37_401, proto
        assert a["litert_max_lsb"] <= 1
        assert a["alarms_differing_from_reference"]["tflite-micro"] == 0
        assert a["alarms_differing_from_reference"]["litert"] <= 0.001 * a["rows"]
    s = result["split_protocol"]["all"]
    assert s["tflite-micro"] == s["reference"]


def test_anomaly_free_protocol_is_reported_apart(result: dict[str, Any]) -> None:
    free = result["anomaly_free_protocol"]
    assert sum(free["all"]["reference"][k] for k in ("tp", "fp", "fn", "tn")) == 37_401
    _check(free["all"]["reference"], 0.54, 86.78, 3.10)
    _check(free["all"]["float"], 0.54, 86.78, 3.11)
    _check(free["valve2"]["reference"], 0.52, 100.0, 0.0)
    assert "anomaly-free fit-once (different protocol)" in result["markdown"]


def test_the_evaluated_model_is_the_file(shared: Path) -> None:
    """What is scored is read back from the .tflite bytes; the bytes are what a node gets."""
    f = ds.load_skab(shared, ["valve1"])[5]
    fit = skab_int8.skab_int8_detector(f.values, SELECTED_CONFIG, slice(0, 400))
    det = fit.int8
    again = Int8Detector.from_bytes(det.data)
    assert same_model(again.model, read_tflite(det.data))
    assert write_tflite(read_tflite(det.data), _manifest(det)) == det.data
    np.testing.assert_array_equal(again.outputs(fit.x, "reference"), again.outputs(fit.x, "tflite-micro"))
    man = det.manifest
    assert man["alarm"] == {"smooth": 20, "hold": 20} and man["scoring"] == "pca_t2_q"
    assert man["int8_calibration"] == {"rows": 400, "headroom": 4.0}
    # the threshold is the int8 one: 3 x the 0.99 quantile of the smoothed int8 training scores
    rule = SELECTED_CONFIG.alarm_rule()
    assert man["threshold"] == pytest.approx(rule.threshold(det.scores(fit.x[:400])), rel=1e-7)


def _manifest(det: Int8Detector) -> dict[str, Any]:
    m = dict(det.manifest)
    m.pop("schema")
    return m


def test_fitting_and_quantizing_never_read_test_rows(shared: Path) -> None:
    f = ds.load_skab(shared, ["other"])[3]
    rows = f.values.copy()
    a = skab_int8.skab_int8_detector(rows, SELECTED_CONFIG, slice(0, 400)).int8.data
    rows[400:] = 1e6
    b = skab_int8.skab_int8_detector(rows, SELECTED_CONFIG, slice(0, 400)).int8.data
    assert a == b


def test_gateway_scoring_equals_the_float_detector_on_float_outputs(shared: Path) -> None:
    """The manifest-driven scoring (node and gateway) is the float detector's own formula."""
    f = ds.load_skab(shared, ["valve2"])[0]
    fit = skab_int8.skab_int8_detector(f.values, SELECTED_CONFIG, slice(0, 400))
    det = fit.float_model.detector
    z = det.scaler.transform(fit.x)
    y = z @ det.layers()[0].weights.T
    sc = Scoring.from_manifest(fit.int8.manifest)
    np.testing.assert_allclose(sc.score(z, y), det.score_from_output(z, y), rtol=1e-6)


def test_headroom_is_chosen_on_the_tuning_files_only(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[str, ...]] = []
    real = skab_int8.load_skab

    def spy(shared_dir: Any, groups: Any = ds.SKAB_GROUPS) -> Any:
        loaded.append(tuple(groups))
        return real(shared_dir, groups)

    monkeypatch.setattr(skab_int8, "load_skab", spy)
    sweep = skab_int8.headroom_sweep(shared, (1.0, 4.0))
    assert loaded == [("valve1", "other")]
    by = {r["headroom"]: r for r in sweep}
    # 4x: the int8 twin within 0.1 point of FAR/MAR of its float twin on the tuning files
    assert abs(by[4.0]["int8"]["far"] - by[4.0]["float"]["far"]) < 0.1
    assert abs(by[4.0]["int8"]["mar"] - by[4.0]["float"]["mar"]) < 0.1
    assert by[1.0]["int8"]["mar"] > by[4.0]["int8"]["mar"]


def test_eval_cli_prints_both_beside_the_leaderboard(
    shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeline.quantize.cli import main as quantize_cli

    out = tmp_path / "eval.json"
    rc = quantize_cli(["eval", "--shared", str(shared), "--runtimes", "reference", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "edgeline: int8 (all 34 files)" in text and "edgeline: float twin (all 34 files)" in text
    assert "Conv-AE" in text and "targets (all files, int8)" in text and ": met;" in text
    import json

    r = json.loads(out.read_text())
    assert r["split_protocol"]["valve2"]["reference"]["files"] == 4
    assert "anomaly_free_protocol" in r
