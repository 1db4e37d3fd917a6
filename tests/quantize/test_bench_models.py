"""`edgeline bench node-model`: it runs every committed model on every runtime and reports
medians and ratios (the numbers themselves are benchmarks, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgeline.quantize.bench import main as bench_cli
from edgeline.quantize.registry import model_paths


@pytest.mark.slow
@pytest.mark.micropython
def test_bench_node_model_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench_cli(["node-model", "--repeats", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["models"]) == set(model_paths())
    for name, m in r["models"].items():
        us = m["us"]
        for key in (
            "node_viper",
            "node_python",
            "node_detector_viper",
            "tflite_micro_invoke",
            "litert_with_io",
        ):
            assert us[key] > 0, (name, key)
        assert us["node_viper"] < us["node_python"]
        assert m["ratio_to_tflite_micro_invoke"]["node_viper"] == pytest.approx(
            us["node_viper"] / us["tflite_micro_invoke"], rel=0.01
        )
        print(f"\n{name}: {json.dumps(m['us'])}")
