"""The committed detectors in models/: registry, runtime parity, refusal of damaged files,
and reproducible training.

- models/manifest.json lists every .tflite in models/, with its true sha256 and size, and
  what the file's own embedded manifest says (features, threshold, scoring).
- Parity, per model, on 10,000 random int8 inputs: the node's interpreter under the
  MicroPython unix port (viper and plain kernels) and under CPython, and the numpy
  reference read back from the file, give byte-identical outputs to tflite-micro; LiteRT is
  at most 1 LSB away. On 10,000 random feature vectors the node's Detector (under
  MicroPython) and the gateway's LiteRT scorer agree on >= 99.9 % of decisions.
- Every truncation and a sample of corruptions of each committed file are refused with
  ModelError (by the interpreter and the Detector); the same file with an unsupported op is
  refused with a message naming the op (the refusal machinery is tested in depth in
  tests/firmware/test_tflite_model.py; this applies it to the files we ship).
- Retraining with the CLI writes the same bytes as the committed files.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tflite
from edgeline.firmware.edgeline_node.detector import Detector
from edgeline.firmware.edgeline_node.tflite_model import Model, ModelError
from edgeline.quantize import registry
from edgeline.quantize.cli import main as quantize_cli
from edgeline.quantize.parity import DECISION_AGREEMENT, check_parity
from edgeline.quantize.tflite_writer import read_manifest

from micropython_runner import REPO, run_micropython

MODELS_DIR = REPO / "models"
EXPECTED = {"demo-rotating-machine": "demo", "skab-pump-anomaly-free": "skab"}
N = 10_000


@pytest.fixture(scope="module")
def reg() -> dict:
    return registry.load_registry(MODELS_DIR)


def _data(name: str) -> bytes:
    return (MODELS_DIR / f"{name}.tflite").read_bytes()


def test_registry_matches_the_files(reg: dict) -> None:
    assert set(reg["models"]) == set(EXPECTED)
    on_disk = {p.stem for p in MODELS_DIR.glob("*.tflite")}
    assert on_disk == set(EXPECTED), "every .tflite in models/ must have a manifest.json entry"
    for name, e in reg["models"].items():
        data = (MODELS_DIR / e["file"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest(), f"{name}: sha256 in manifest.json is stale"
        assert e["bytes"] == len(data)
        assert (MODELS_DIR / e["card"]).is_file() and e["sha256"] in (MODELS_DIR / e["card"]).read_text()
        embedded = read_manifest(data)
        assert e["inputs"]["features"] == embedded["features"]
        assert e["threshold"] == embedded["threshold"] and e["scoring"] == embedded["scoring"]
        assert e["version"] == embedded["version"]
        m = Model(data)
        assert m.input_quant == (
            e["inputs"]["quantization"]["scale"],
            e["inputs"]["quantization"]["zero_point"],
        )
        assert list(m.input_shape) == e["inputs"]["shape"] and list(m.output_shape) == e["outputs"]["shape"]
        assert e["training"]["data"] and e["training"]["protocol"] and e["metrics"]
        Detector(data).self_test()


@pytest.mark.micropython
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parity_on_10000_inputs(name: str) -> None:
    r = check_parity(_data(name), n=N)
    o = r["int8_outputs"]
    print(f"\n{name}: {json.dumps(o)}\n{name}: {json.dumps(r['decisions'])}  ({r['seconds']} s)")
    rows = o["rows_identical_to_tflite_micro"]
    assert set(rows) == {
        "numpy_reference",
        "node_cpython",
        "node_micropython_viper",
        "node_micropython_python",
    }
    assert all(v == N for v in rows.values()), rows
    assert o["litert_max_lsb_from_tflite_micro"] <= 1
    d = r["decisions"]
    assert d["agree_rate"] >= DECISION_AGREEMENT
    assert 0.1 * N < d["gateway_anomalous"] < 0.9 * N, "random features should land on both sides"
    assert r["ok"]


def _with_op_code(data: bytes, code: int) -> bytes:
    """The file with its operator code patched to another builtin (as test_tflite_model.py does)."""
    oc = tflite.Model.GetRootAsModel(data, 0).OperatorCodes(0)
    buf = bytearray(data)
    struct.pack_into("<i", buf, oc._tab.Pos + oc._tab.Offset(10), code)
    if code < 128:
        struct.pack_into("<b", buf, oc._tab.Pos + oc._tab.Offset(4), code)
    return bytes(buf)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_damaged_committed_models_are_refused(name: str) -> None:
    data = _data(name)
    for n in range(len(data)):
        with pytest.raises(ModelError):
            Model(data[:n])
    for n in range(0, len(data), 13):
        with pytest.raises(ModelError):
            Detector(data[:n])
    with pytest.raises(ModelError) as e:
        Detector(_with_op_code(data, 3))
    assert str(e.value) == "unsupported op CONV_2D (builtin code 3) in operator 0; supported: FULLY_CONNECTED"
    rng = np.random.default_rng(17)
    refused = 0
    for _ in range(1000):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        try:
            Detector(bytes(buf))
        except ModelError:
            refused += 1
        except ValueError as err:  # a corrupted manifest value that parses as JSON
            raise AssertionError(f"not a ModelError: {err!r}") from err
    assert refused > 300


MP_REFUSE = """
import sys
from edgeline_node.tflite_model import ModelError
from edgeline_node.detector import Detector
good = sys.stdin.buffer.read()
n = int(good[:6].decode())
data, bad_op = good[6:6 + n], good[6 + n:]
Detector(data)
refused = other = 0
for k in list(range(0, n, 5)) + list(range(n - 40, n)):
    try:
        Detector(data[:k])
    except ModelError:
        refused += 1
    except Exception as e:
        other += 1
        print("other", repr(e))
try:
    Detector(bad_op)
except ModelError as e:
    print("op", str(e))
print("refused", refused, "other", other)
"""


@pytest.mark.micropython
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_damaged_committed_models_are_refused_under_micropython(name: str) -> None:
    data = _data(name)
    r = run_micropython(MP_REFUSE, stdin=b"%06d" % len(data) + data + _with_op_code(data, 3))
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "op unsupported op CONV_2D (builtin code 3) in operator 0; supported: FULLY_CONNECTED" in out
    assert f"refused {len(range(0, len(data), 5)) + 40} other 0" in out, out


def test_retraining_with_the_cli_reproduces_the_committed_bytes(tmp_path: Path, reg: dict) -> None:
    for name, kind in EXPECTED.items():
        out = tmp_path / f"{kind}.tflite"
        report = tmp_path / f"{kind}.json"
        assert quantize_cli(["train", kind, "--out", str(out), "--json", str(report)]) == 0
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        assert sha == reg["models"][name]["sha256"], f"{name}: retraining gave different bytes"
        rec = json.loads(report.read_text())
        assert rec["metrics"] == reg["models"][name]["metrics"]
        # exporting the retrained file gives the committed registry entry and card
        entry = registry.export_model(out.read_bytes(), rec, name, tmp_path / "models")
        assert entry == reg["models"][name]
        assert (tmp_path / "models" / f"{name}.md").read_text() == (MODELS_DIR / f"{name}.md").read_text()


@pytest.mark.micropython
def test_parity_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "parity.json"
    paths = [str(MODELS_DIR / f"{name}.tflite") for name in sorted(EXPECTED)]
    assert quantize_cli(["parity", *paths, "--n", "300", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("OK in") == 2 and "node_micropython_viper" in text
    r = json.loads(out.read_text())
    assert set(r) == set(paths) and all(v["ok"] for v in r.values())
