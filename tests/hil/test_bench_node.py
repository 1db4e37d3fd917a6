"""`edgeline bench node` (hil/bench_node.py) end to end, small: every part runs, the JSON says
what it measured, and the figures hang together (the node's CBOR is cbor2's canonical
encoding of the same event; the JSON twin is bigger; rates and heap are positive)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgeline.firmware.edgeline_node import wire as w
from edgeline.hil import bench_node


def test_json_twin_names_fields_and_hexes_bytes() -> None:
    ev = {w.K_V: 1, w.K_TRACE: b"\x01\x02", w.K_FEATURES: {"vib": [0.5]}, 99: True}
    assert json.loads(bench_node.json_twin(ev, names=True)) == {
        "v": 1, "trace": "0102", "features": {"vib": [0.5]}, "99": True,
    }  # fmt: skip
    assert json.loads(bench_node.json_twin(ev, names=False))["5"] == "0102"


@pytest.mark.micropython
@pytest.mark.mosquitto
def test_bench_node_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "node.json"
    rc = bench_node.main(["--json", str(out), "--repeats", "1", "--messages", "300", "--records", "300"])
    assert rc == 0
    r = json.loads(out.read_text())
    c, q, m, h = r["codec"], r["queue"], r["mqtt"], r["heap"]
    assert c["same_bytes_as_cbor2_canonical"] is True
    assert 200 < c["event_bytes_cbor"] < c["event_bytes_json_integer_keys"] < c["event_bytes_json"]
    ratio = 1 - c["event_bytes_cbor"] / c["event_bytes_json"]
    assert c["smaller_than_json"] == pytest.approx(ratio, abs=1e-3)
    assert c["meets_size_target"] is (c["smaller_than_json"] >= 0.60)
    assert c["encode_us_node_micropython"] > 0 and c["encode_us_cbor2_cpython"] > 0
    for key in ("append_per_s", "replay_per_s", "file_append_per_s", "file_read_per_s"):
        assert q[key] > 0, key
    for key in ("node_window_per_s", "node_blocking_per_s", "paho_cpython_per_s"):
        assert m[key] > 0, key
    assert 0 < h["after_import"] < h["after_boot"] <= h["running_max"]
    assert r["host"]["mpy_arch"] in bench_node.MPY_ARCHS
