"""Host code. Loaders for the benchmark data sets and for plain numeric CSV files.

Each loader returns a small dataclass of numpy arrays and answers bad input with a
`DatasetError` (also a `ValueError`) that names the file, the row and the column.
Nothing here needs pandas; the files are small enough to parse line by line.

- SKAB v0.9 (`skab/{anomaly-free,valve1,valve2,other}/*.csv`): `;`-separated, a `datetime`
  column, the 8 sensor columns in `SKAB_SENSORS`, labels `anomaly` and `changepoint`.
- NAB realKnownCause (`nab/data/realKnownCause/*.csv`, `timestamp,value`) with its scoring
  windows from `nab/labels/combined_windows.json`.
- CWRU drive-end vibration (`bearing/cwru/{12k,48k}/*.csv`, one column `de_accel`) with the
  sampling rate, speed and label from `bearing/cwru/manifest.csv`.
- Any CSV of numeric columns (`load_csv`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKAB_SENSORS: tuple[str, ...] = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
SKAB_GROUPS: tuple[str, ...] = ("valve1", "valve2", "other")
SKAB_TRAIN_ROWS = 400  # the published protocol's per-file split


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file, row and column."""


# --------------------------------------------------------------------------------------------
# Shared parsing helpers


def _read_rows(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path}: the file is empty (expected a header row)") from None
        rows = [r for r in reader if r]
    header = [h.strip() for h in header]
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise DatasetError(
                f"{path}: data row {i + 1} has {len(r)} fields, the header has {len(header)}"
                f" (is the separator {delimiter!r}?)"
            )
    return header, rows


def _column_index(path: Path, header: Sequence[str], name: str) -> int:
    try:
        return list(header).index(name)
    except ValueError:
        raise DatasetError(f"{path}: column {name!r} is missing; the header has {list(header)}") from None


def _floats(path: Path, rows: Sequence[Sequence[str]], col: int, name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for i, r in enumerate(rows):
        try:
            v = float(r[col])
        except ValueError:
            raise DatasetError(
                f"{path}: column {name!r}, data row {i + 1}: {r[col]!r} is not a number"
            ) from None
        if not math.isfinite(v):
            raise DatasetError(f"{path}: column {name!r}, data row {i + 1}: {r[col]!r} is not finite")
        out[i] = v
    return out


def _labels(path: Path, rows: Sequence[Sequence[str]], col: int, name: str) -> np.ndarray:
    v = _floats(path, rows, col, name)
    bad = np.flatnonzero((v != 0.0) & (v != 1.0))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"{path}: column {name!r}, data row {i + 1}: label {rows[i][col]!r} is not 0 or 1")
    return v.astype(np.int8)


def _datetimes(path: Path, rows: Sequence[Sequence[str]], col: int, name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype="datetime64[s]")
    for i, r in enumerate(rows):
        try:
            out[i] = np.datetime64(r[col].strip(), "s")
        except ValueError:
            raise DatasetError(
                f"{path}: column {name!r}, data row {i + 1}: {r[col]!r} is not a date-time"
                " (expected YYYY-MM-DD hh:mm:ss)"
            ) from None
    return out


# --------------------------------------------------------------------------------------------
# SKAB


@dataclass(frozen=True)
class SkabFile:
    """One SKAB experiment: 1 Hz rows of the 8 sensors, with labels when the file has them."""

    path: Path
    name: str  # "valve1/0", "other/14", "anomaly-free/anomaly-free"
    time: np.ndarray  # datetime64[s], shape (n,)
    values: np.ndarray  # float64, shape (n, 8), columns in SKAB_SENSORS order
    anomaly: np.ndarray | None  # int8 0/1, shape (n,); None for anomaly-free.csv
    changepoint: np.ndarray | None  # int8 0/1, shape (n,)

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]

    def __len__(self) -> int:
        return int(self.values.shape[0])


def load_skab_file(path: str | Path, *, require_labels: bool | None = None) -> SkabFile:
    """Read one SKAB CSV. Labels are required unless the file is anomaly-free.csv.

    :raises DatasetError: the file is missing, a column is missing or a value is malformed.
    """
    p = Path(path)
    header, rows = _read_rows(p, ";")
    if not rows:
        raise DatasetError(f"{p}: no data rows")
    tcol = _column_index(p, header, "datetime")
    values = np.column_stack([_floats(p, rows, _column_index(p, header, c), c) for c in SKAB_SENSORS])
    if require_labels is None:
        require_labels = p.name != "anomaly-free.csv"
    anomaly = changepoint = None
    if require_labels or "anomaly" in header:
        anomaly = _labels(p, rows, _column_index(p, header, "anomaly"), "anomaly")
        changepoint = _labels(p, rows, _column_index(p, header, "changepoint"), "changepoint")
    name = f"{p.parent.name}/{p.stem}"
    return SkabFile(p, name, _datetimes(p, rows, tcol, "datetime"), values, anomaly, changepoint)


def skab_root(shared_dir: str | Path) -> Path:
    """The `skab/` folder under a shared directory (or the skab folder itself)."""
    d = Path(shared_dir)
    for cand in (d / "datasets" / "skab", d / "skab", d):
        if (cand / "anomaly-free" / "anomaly-free.csv").is_file():
            return cand
    raise DatasetError(
        f"{d}: no SKAB data found (looked for datasets/skab/anomaly-free/anomaly-free.csv, "
        "skab/anomaly-free/anomaly-free.csv and anomaly-free/anomaly-free.csv under it)"
    )


def load_skab(shared_dir: str | Path, groups: Sequence[str] = SKAB_GROUPS) -> list[SkabFile]:
    """The anomalous SKAB files of `groups`, in group order, then numeric file order."""
    root = skab_root(shared_dir)
    out: list[SkabFile] = []
    for g in groups:
        if g not in SKAB_GROUPS:
            raise DatasetError(f"unknown SKAB group {g!r}: use one of {', '.join(SKAB_GROUPS)}")
        files = sorted((root / g).glob("*.csv"), key=lambda q: (len(q.stem), q.stem))
        if not files:
            raise DatasetError(f"{root / g}: no CSV files")
        out.extend(load_skab_file(f, require_labels=True) for f in files)
    return out


def load_skab_anomaly_free(shared_dir: str | Path) -> SkabFile:
    return load_skab_file(skab_root(shared_dir) / "anomaly-free" / "anomaly-free.csv", require_labels=False)


# --------------------------------------------------------------------------------------------
# NAB


@dataclass(frozen=True)
class NabSeries:
    """One NAB series with its ground-truth windows (inclusive [start, end] time stamps)."""

    path: Path
    name: str  # "realKnownCause/nyc_taxi.csv", the key in the label files
    time: np.ndarray  # datetime64[s]
    values: np.ndarray  # float64
    windows: tuple[tuple[np.datetime64, np.datetime64], ...]

    @property
    def probation_rows(self) -> int:
        """Rows NAB does not score: min(floor(0.15 * N), 750)."""
        return min(math.floor(0.15 * len(self.values)), 750)

    def in_window(self) -> np.ndarray:
        """Boolean per row: the row's time stamp lies inside a labelled window."""
        m = np.zeros(len(self.time), dtype=bool)
        for a, b in self.windows:
            m |= (self.time >= a) & (self.time <= b)
        return m


def load_nab(csv_path: str | Path, windows_json: str | Path | None = None) -> NabSeries:
    """Read a NAB `timestamp,value` CSV and its windows from combined_windows.json.

    `windows_json` defaults to `../../labels/combined_windows.json` relative to the CSV
    (the NAB layout `data/<category>/<file>.csv`).

    :raises DatasetError: malformed CSV, missing label file, or no entry for this file.
    """
    p = Path(csv_path)
    header, rows = _read_rows(p, ",")
    if not rows:
        raise DatasetError(f"{p}: no data rows")
    time = _datetimes(p, rows, _column_index(p, header, "timestamp"), "timestamp")
    values = _floats(p, rows, _column_index(p, header, "value"), "value")
    key = f"{p.parent.name}/{p.name}"
    wpath = (
        Path(windows_json) if windows_json is not None else p.parents[2] / "labels" / "combined_windows.json"
    )
    if not wpath.is_file():
        raise DatasetError(f"{wpath}: no such label file (needed for {p})")
    try:
        table = json.loads(wpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{wpath}: not valid JSON: {e}") from None
    if not isinstance(table, dict) or key not in table:
        raise DatasetError(f"{wpath}: no entry {key!r}")
    wins: list[tuple[np.datetime64, np.datetime64]] = []
    for j, w in enumerate(table[key]):
        if not (isinstance(w, list) and len(w) == 2 and all(isinstance(s, str) for s in w)):
            raise DatasetError(f"{wpath}: {key!r} window {j}: expected [start, end] strings, got {w!r}")
        try:
            a, b = (np.datetime64(s.strip(), "s") for s in w)
        except ValueError:
            raise DatasetError(f"{wpath}: {key!r} window {j}: {w!r} is not a pair of date-times") from None
        if b < a:
            raise DatasetError(f"{wpath}: {key!r} window {j}: end {w[1]} is before start {w[0]}")
        wins.append((a, b))
    return NabSeries(p, key, time, values, tuple(wins))


def load_nab_real_known_cause(shared_dir: str | Path) -> list[NabSeries]:
    d = Path(shared_dir)
    for root in (d / "datasets" / "nab", d / "nab", d):
        folder = root / "data" / "realKnownCause"
        if folder.is_dir():
            return [load_nab(f) for f in sorted(folder.glob("*.csv"))]
    raise DatasetError(f"{d}: no NAB data found (looked for data/realKnownCause under it)")


# --------------------------------------------------------------------------------------------
# CWRU


@dataclass(frozen=True)
class CwruRecord:
    """One CWRU drive-end accelerometer record (acceleration, treated as g)."""

    path: Path
    fs_hz: int
    rpm: int
    label: str  # normal, inner_race, ball, outer_race
    anomaly: int  # 0 normal, 1 fault
    samples: np.ndarray  # float64, shape (n,)

    @property
    def shaft_hz(self) -> float:
        return self.rpm / 60.0


def _cwru_manifest(cwru_dir: Path) -> dict[str, dict[str, str]]:
    mpath = cwru_dir / "manifest.csv"
    header, rows = _read_rows(mpath, ",")
    for col in ("file", "fs_hz", "n_samples", "label", "anomaly", "rpm_in_file"):
        _column_index(mpath, header, col)
    return {r[header.index("file")]: dict(zip(header, r, strict=True)) for r in rows}


def load_cwru(path: str | Path) -> CwruRecord:
    """Read a CWRU CSV (column `de_accel`) with its metadata from `manifest.csv` beside its folder.

    The manifest lives in the `cwru/` folder and names files as `cwru/<rate>/<file>.csv`.

    :raises DatasetError: missing manifest entry, wrong column, or a sample count that
        disagrees with the manifest.
    """
    p = Path(path)
    cwru_dir = p.parent.parent
    manifest = _cwru_manifest(cwru_dir)
    key = f"{cwru_dir.name}/{p.parent.name}/{p.name}"
    if key not in manifest:
        raise DatasetError(f"{cwru_dir / 'manifest.csv'}: no entry for {key!r}")
    meta = manifest[key]
    header, rows = _read_rows(p, ",")
    samples = _floats(p, rows, _column_index(p, header, "de_accel"), "de_accel")
    try:
        fs = int(meta["fs_hz"])
        n_expected = int(meta["n_samples"])
        rpm = int(meta["rpm_in_file"])
        anomaly = int(meta["anomaly"])
    except ValueError as e:
        raise DatasetError(f"{cwru_dir / 'manifest.csv'}: entry {key!r} is malformed: {e}") from None
    if samples.size != n_expected:
        raise DatasetError(f"{p}: {samples.size} samples, but manifest.csv says {n_expected}")
    return CwruRecord(p, fs, rpm, meta["label"], anomaly, samples)


def cwru_files(shared_dir: str | Path, rate: str = "48k") -> list[Path]:
    """The CWRU CSVs recorded at one rate (`48k` or `12k`), normal first."""
    d = Path(shared_dir)
    for root in (d / "datasets" / "bearing" / "cwru", d / "bearing" / "cwru", d / "cwru", d):
        if (root / "manifest.csv").is_file():
            files = sorted(
                (root / rate).glob("*.csv"), key=lambda q: (not q.name.startswith("normal"), q.name)
            )
            if not files:
                raise DatasetError(f"{root / rate}: no CSV files (rate must be 48k or 12k)")
            return files
    raise DatasetError(f"{d}: no CWRU data found (looked for bearing/cwru/manifest.csv under it)")


# --------------------------------------------------------------------------------------------
# Plain CSV


@dataclass(frozen=True)
class NumericTable:
    path: Path
    columns: tuple[str, ...]
    values: np.ndarray  # float64, shape (n, len(columns))

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise DatasetError(f"{self.path}: no column {name!r}; have {list(self.columns)}")
        return self.values[:, self.columns.index(name)]


def load_csv(
    path: str | Path, columns: Sequence[str] | None = None, *, delimiter: str | None = None
) -> NumericTable:
    """Read a CSV with a header row. `columns` picks (and orders) columns, which must all be
    numeric; without it every column whose values all parse as numbers is kept, and
    non-numeric ones (time stamps, names) are dropped. The delimiter is sniffed from the
    header (`,`, `;` or tab) unless given.

    :raises DatasetError: missing file or column, a non-numeric value in a requested column,
        or no numeric column at all.
    """
    p = Path(path)
    if delimiter is None:
        if not p.is_file():
            raise DatasetError(f"{p}: no such file")
        with p.open(encoding="utf-8") as fh:
            first = fh.readline()
        delimiter = max((",", ";", "\t"), key=first.count)
    header, rows = _read_rows(p, delimiter)
    if not rows:
        raise DatasetError(f"{p}: no data rows")
    if columns is not None:
        names = tuple(columns)
        cols = [_floats(p, rows, _column_index(p, header, c), c) for c in names]
    else:
        kept: list[str] = []
        cols = []
        for j, c in enumerate(header):
            try:
                cols.append(_floats(p, rows, j, c))
                kept.append(c)
            except DatasetError:
                continue
        if not kept:
            raise DatasetError(f"{p}: no numeric column; the header has {header}")
        names = tuple(kept)
    return NumericTable(p, names, np.column_stack(cols))
