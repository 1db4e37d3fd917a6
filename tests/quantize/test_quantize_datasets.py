"""Loaders on the real benchmark files (counts from each data set's README) and on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgeline.quantize import datasets as ds


@pytest.fixture(scope="module")
def skab(shared: Path) -> list[ds.SkabFile]:
    return ds.load_skab(shared)


def test_skab_counts_match_the_readme(skab: list[ds.SkabFile], shared: Path) -> None:
    assert len(skab) == 34
    assert [sum(f.group == g for f in skab) for g in ("valve1", "valve2", "other")] == [16, 4, 14]
    assert sum(len(f) for f in skab) == 37_401
    assert sum(int(f.anomaly.sum()) for f in skab if f.anomaly is not None) == 13_067
    assert sum(int(f.changepoint.sum()) for f in skab if f.changepoint is not None) == 129
    # The published split: rows from 400 on are test rows.
    test = [f for f in skab if f.anomaly is not None and f.changepoint is not None]
    assert sum(len(f) - 400 for f in test) == 23_801
    assert sum(int(f.anomaly[400:].sum()) for f in test) == 12_771
    assert sum(int(f.changepoint[400:].sum()) for f in test) == 127
    free = ds.load_skab_anomaly_free(shared)
    assert len(free) == 9_405 and free.anomaly is None and free.changepoint is None
    assert str(free.time[0]) == "2020-02-08T13:30:47" and str(free.time[-1]) == "2020-02-08T16:16:47"


def test_skab_file_contents(skab: list[ds.SkabFile]) -> None:
    f = next(f for f in skab if f.name == "valve1/0")
    assert f.values.shape == (1147, 8) and f.values.dtype == np.float64
    assert str(f.time[0]) == "2020-03-09T10:14:33"
    np.testing.assert_allclose(
        f.values[0], [0.0265878, 0.0401113, 1.3302, 0.054711, 79.3366, 26.0199, 233.062, 32.0]
    )
    # README: changepoints at 573, 630, 917, 974; rows 573..973 anomalous.
    assert f.changepoint is not None and f.anomaly is not None
    assert np.flatnonzero(f.changepoint).tolist() == [573, 630, 917, 974]
    assert np.flatnonzero(f.anomaly).tolist() == list(range(573, 974))
    # Files come in numeric order, not string order.
    assert [g.name for g in skab if g.group == "valve1"][:3] == ["valve1/0", "valve1/1", "valve1/2"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


HEADER = "datetime;" + ";".join(ds.SKAB_SENSORS) + ";anomaly;changepoint\n"
ROW = "2020-03-09 10:14:33;1;2;3;4;5;6;7;8;0.0;0.0\n"


def test_skab_bad_input_names_file_row_and_column(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "0.csv", HEADER.replace("Pressure;", "") + "2020-03-09 10:14:33;1;2;3;5;6;7;8;0;0\n"
    )
    with pytest.raises(ds.DatasetError, match=r"0\.csv: column 'Pressure' is missing"):
        ds.load_skab_file(p)
    p = _write(tmp_path / "1.csv", HEADER + ROW + ROW.replace(";3;", ";abc;"))
    with pytest.raises(ds.DatasetError, match=r"1\.csv: column 'Current', data row 2: 'abc' is not a number"):
        ds.load_skab_file(p)
    p = _write(tmp_path / "2.csv", HEADER + ROW.replace("0.0;0.0", "0.5;0.0"))
    with pytest.raises(
        ds.DatasetError, match=r"2\.csv: column 'anomaly', data row 1: label '0.5' is not 0 or 1"
    ):
        ds.load_skab_file(p)
    p = _write(tmp_path / "3.csv", HEADER + ROW.replace(";", ",", 3))
    with pytest.raises(ds.DatasetError, match=r"3\.csv: data row 1 has 8 fields, the header has 11"):
        ds.load_skab_file(p)
    p = _write(tmp_path / "4.csv", HEADER + ROW.replace("2020-03-09 10:14:33", "yesterday"))
    with pytest.raises(
        ds.DatasetError, match=r"4\.csv: column 'datetime', data row 1: 'yesterday' is not a date-time"
    ):
        ds.load_skab_file(p)
    with pytest.raises(ds.DatasetError, match="no such file"):
        ds.load_skab_file(tmp_path / "missing.csv")
    with pytest.raises(ds.DatasetError, match="no SKAB data found"):
        ds.load_skab(tmp_path)
    assert issubclass(ds.DatasetError, ValueError)


def test_nab_real_known_cause(shared: Path) -> None:
    series = {s.name.split("/")[1]: s for s in ds.load_nab_real_known_cause(shared)}
    rows = {
        "machine_temperature_system_failure.csv": (22_695, 4, 750),
        "ambient_temperature_system_failure.csv": (7_267, 2, 750),
        "cpu_utilization_asg_misconfiguration.csv": (18_050, 1, 750),
        "ec2_request_latency_system_failure.csv": (4_032, 3, 604),
        "nyc_taxi.csv": (10_320, 5, 750),
        "rogue_agent_key_hold.csv": (1_882, 2, 282),
        "rogue_agent_key_updown.csv": (5_315, 2, 750),
    }
    assert set(series) == set(rows)
    for name, (n, windows, probation) in rows.items():
        s = series[name]
        assert (len(s.values), len(s.windows), s.probation_rows) == (n, windows, probation), name
        assert s.in_window().any()
    assert sum(len(s.windows) for s in series.values()) == 19
    # README quirk: machine_temperature steps back 55 min once; the order is kept, not sorted.
    t = series["machine_temperature_system_failure.csv"].time
    assert int(np.sum(np.diff(t.astype(np.int64)) < 0)) == 1


def test_nab_missing_label_entry(tmp_path: Path) -> None:
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    csv = _write(tmp_path / "data" / "x" / "a.csv", "timestamp,value\n2014-01-01 00:00:00,1.5\n")
    _write(tmp_path / "labels" / "combined_windows.json", '{"x/b.csv": []}')
    with pytest.raises(ds.DatasetError, match=r"combined_windows\.json: no entry 'x/a\.csv'"):
        ds.load_nab(csv)
    _write(tmp_path / "labels" / "combined_windows.json", '{"x/a.csv": [["2014-01-02 00:00:00.000000"]]}')
    with pytest.raises(ds.DatasetError, match="window 0: expected"):
        ds.load_nab(csv)


def test_cwru_records_and_manifest(shared: Path) -> None:
    for rate, fs, count in (("48k", 48_000, 4), ("12k", 12_000, 7)):
        files = ds.cwru_files(shared, rate)
        assert len(files) == count and files[0].name.startswith("normal")
        for p in files:
            r = ds.load_cwru(p)  # checks the sample count against manifest.csv
            assert r.fs_hz == fs and r.anomaly == (r.label != "normal")
            assert 29.9 < r.shaft_hz < 30.0
    normal = ds.load_cwru(ds.cwru_files(shared, "48k")[0])
    assert normal.samples.size == 243_938 and normal.label == "normal"
    assert normal.samples.dtype == np.float64
    assert normal.samples[:2].tolist() == [0.053197, 0.088662]


def test_cwru_not_in_manifest(tmp_path: Path) -> None:
    (tmp_path / "cwru" / "48k").mkdir(parents=True)
    _write(tmp_path / "cwru" / "manifest.csv", "file,fs_hz,n_samples,label,anomaly,rpm_in_file\n")
    p = _write(tmp_path / "cwru" / "48k" / "x.csv", "de_accel\n0.1\n")
    with pytest.raises(ds.DatasetError, match=r"manifest\.csv: no entry for 'cwru/48k/x\.csv'"):
        ds.load_cwru(p)


def test_plain_csv(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.csv", "time;a;b;name\n2020-01-01;1;2.5;x\n2020-01-02;3;-4;y\n")
    t = ds.load_csv(p)
    assert t.columns == ("a", "b")
    np.testing.assert_array_equal(t.values, [[1, 2.5], [3, -4]])
    np.testing.assert_array_equal(ds.load_csv(p, ["b"]).column("b"), [2.5, -4])
    with pytest.raises(ds.DatasetError, match=r"t\.csv: column 'name', data row 1: 'x' is not a number"):
        ds.load_csv(p, ["a", "name"])
    with pytest.raises(ds.DatasetError, match=r"t\.csv: column 'c' is missing"):
        ds.load_csv(p, ["c"])
    q = _write(tmp_path / "u.csv", "a,b\nx,y\n")
    with pytest.raises(ds.DatasetError, match="no numeric column"):
        ds.load_csv(q)
