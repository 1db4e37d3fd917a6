"""Host code. The committed detectors in models/: training them, and registering them.

- `train_model(kind)` trains one of the shipped detectors from scratch, deterministically, and
  returns the `.tflite` bytes with a training record (data, protocol, metrics):
  - ``demo``: the demo nodes' detector, fitted on the node simulator's own feature vectors
    (`demo_model`);
  - ``skab``: a SKAB pump detector fitted once on anomaly-free.csv, as a node is commissioned
    (`skab_int8.anomaly_free_detector`); scored under that protocol, which is not the leaderboard's.
- `export_model(data, record, name, models_dir)` writes a trained file into models/, with
  its model card (models/<name>.md) and its entry in models/manifest.json: sha256, size,
  inputs, outputs, threshold, scoring, metrics, training data and protocol.

`edgeline quantize train` and `edgeline quantize export` (quantize/cli.py) call these.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .demo_model import TEST_SEEDS, evaluate_demo, train_demo
from .int8_detector import Int8Detector

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models"
DEFAULT_SHARED = REPO.parent / "shared"
REGISTRY_FILE = "manifest.json"
REGISTRY_SCHEMA = 1
KINDS = ("demo", "skab")
DEFAULT_NAMES = {"demo": "demo-rotating-machine", "skab": "skab-pump-anomaly-free"}


class RegistryError(ValueError):
    """models/manifest.json or a model entry is missing or inconsistent."""


def shared_dir(given: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: `given`, else $EDGELINE_SHARED, else ../shared beside the repo."""
    return Path(given or os.environ.get("EDGELINE_SHARED") or DEFAULT_SHARED)


def train_model(
    kind: str, shared: str | os.PathLike[str] | None = None
) -> tuple[Int8Detector, dict[str, Any]]:
    """Train a shipped detector from scratch: (int8 detector, training record with metrics).

    :raises ValueError: an unknown kind.
    """
    if kind == "demo":
        model, info = train_demo()
        demo_metrics = evaluate_demo(model)
        record = {
            "kind": "demo",
            "description": (
                "Demo nodes' detector: PCA T^2+Q over the 15 window features a node computes "
                "(mean, std, rms, peak, crest of vibration, temperature, current; 256 samples at 1 kHz)"
            ),
            "training": info["training"],
            "validation_max_score": info["validation_max_score"],
            "pca_components": info["components"],
            "metrics": {
                "protocol": f"unseen simulator seeds {TEST_SEEDS[0]}-{TEST_SEEDS[-1]}",
                **demo_metrics,
            },
            "retrain": "edgeline quantize train demo --out demo.tflite",
        }
        return model, record
    if kind == "skab":
        from .datasets import load_skab, load_skab_anomaly_free
        from .skab_int8 import GROUPS, _agreement, run_int8_anomaly_free_protocol

        root = shared_dir(shared)
        proto, model = run_int8_anomaly_free_protocol(load_skab_anomaly_free(root), load_skab(root))
        metrics: dict[str, Any] = {
            "protocol": "anomaly-free fit-once: fit on all of anomaly-free.csv, test every row of the "
            "34 anomalous files (NOT the SKAB leaderboard protocol)",
        }
        for g, groups in GROUPS.items():
            s = proto.summary(groups)
            metrics[g] = {
                name: {k: s[name][k] for k in ("f1", "far", "mar", "tp", "fp", "fn", "tn")}
                for name in ("reference", "float")
            }
        agreement = _agreement(proto)
        agreement.pop("seconds")  # the registry holds only what a retrain reproduces
        metrics["runtime_agreement"] = agreement
        record = {
            "kind": "skab",
            "description": (
                "SKAB water-pump testbed detector: PCA T^2+Q over 5-row means of Accelerometer1RMS, "
                "Accelerometer2RMS, Current, Volume Flow RateRMS (1 Hz rows), score smoothed over 20 rows, "
                "alarm held 20 rows (tune.SELECTED_CONFIG)"
            ),
            "training": model.manifest["training"],
            "metrics": metrics,
            "retrain": "edgeline quantize train skab --out skab.tflite",
        }
        return model, record
    raise ValueError(f"unknown model kind {kind!r}: use one of {', '.join(KINDS)}")


def load_registry(models_dir: str | os.PathLike[str] = MODELS_DIR) -> dict[str, Any]:
    """models/manifest.json as a dict (an empty registry when the file does not exist yet).

    :raises RegistryError: the file is not valid JSON or has the wrong schema.
    """
    path = Path(models_dir) / REGISTRY_FILE
    if not path.exists():
        return {"schema": REGISTRY_SCHEMA, "models": {}}
    try:
        reg = json.loads(path.read_text())
    except ValueError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from e
    if (
        not isinstance(reg, dict)
        or reg.get("schema") != REGISTRY_SCHEMA
        or not isinstance(reg.get("models"), dict)
    ):
        raise RegistryError(f"{path}: expected {{'schema': {REGISTRY_SCHEMA}, 'models': {{...}}}}")
    return reg


def model_paths(models_dir: str | os.PathLike[str] = MODELS_DIR) -> dict[str, Path]:
    """name -> .tflite path of every registered model."""
    d = Path(models_dir)
    return {name: d / entry["file"] for name, entry in sorted(load_registry(d)["models"].items())}


def registry_entry(model: Int8Detector, record: dict[str, Any], name: str) -> dict[str, Any]:
    b = model.backend("reference")
    man = model.manifest
    return {
        "file": f"{name}.tflite",
        "card": f"{name}.md",
        "sha256": hashlib.sha256(model.data).hexdigest(),
        "bytes": len(model.data),
        "version": man["version"],
        "kind": record["kind"],
        "description": record["description"],
        "inputs": {
            "features": list(man["features"]),
            "shape": [1, b.in_features],
            "dtype": "int8",
            "quantization": {"scale": b.input_quant[0], "zero_point": b.input_quant[1]},
            "scaler": man["scaler"],
        },
        "outputs": {
            "shape": [1, b.out_features],
            "dtype": "int8",
            "quantization": {"scale": b.output_quant[0], "zero_point": b.output_quant[1]},
        },
        "layers": [[layer.in_features, layer.out_features, layer.activation] for layer in model.model.layers],
        "scoring": man["scoring"],
        "score_params": man.get("score_params", {}),
        "threshold": man["threshold"],
        "alarm": man.get("alarm", {"smooth": 1, "hold": 0}),
        "training": record["training"],
        "metrics": record["metrics"],
        "retrain": record["retrain"],
    }


def export_model(
    data: bytes, record: dict[str, Any], name: str, models_dir: str | os.PathLike[str] = MODELS_DIR
) -> dict[str, Any]:
    """Write models/<name>.tflite, models/<name>.md and the registry entry; return the entry.

    :raises RegistryError: a name that is not a plain file stem.
    """
    if (
        not name
        or "/" in name
        or name.startswith(".")
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise RegistryError(f"model name {name!r}: use letters, digits, '-' and '_' only")
    d = Path(models_dir)
    d.mkdir(parents=True, exist_ok=True)
    model = Int8Detector.from_bytes(data)
    entry = registry_entry(model, record, name)
    (d / entry["file"]).write_bytes(model.data)
    (d / entry["card"]).write_text(model_card(name, entry))
    reg = load_registry(d)
    reg["models"][name] = entry
    reg["models"] = dict(sorted(reg["models"].items()))
    (d / REGISTRY_FILE).write_text(json.dumps(reg, indent=2, sort_keys=False) + "\n")
    return entry


def _fmt_metrics(entry: dict[str, Any]) -> list[str]:
    m = entry["metrics"]
    lines: list[str] = []
    if entry["kind"] == "demo":
        n = m["normal"]
        lines += [
            f"Judged on simulator seeds the model never saw ({m['protocol']}), int8 through the numpy",
            "reference (= tflite-micro = the node's interpreter):",
            "",
            "| windows | count | flagged | rate | scores |",
            "|---|---|---|---|---|",
            f"| normal | {n['windows']} | {n['false_alarms']} | false-alarm rate {n['false_alarm_rate']:.4%} "
            f"| max {n['max_score']}, p99 {n['p99_score']} |",
        ]
        for fault in ("bearing", "imbalance"):
            f = m[fault]
            lines.append(
                f"| {fault} fault | {f['windows']} | {f['detected']} | detection rate "
                f"{f['detection_rate']:.2%} | min {f['min_score']}; first flag at most "
                f"{f['max_delay_windows']} windows after onset |"
            )
        lines.append("")
        lines.append(f"Threshold {entry['threshold']} (margin x the highest score of the validation seeds).")
    else:
        lines += [
            f"Protocol: {m['protocol']}.",
            "",
            "| files | detector | F1 | FAR, % | MAR, % | TP | FP | FN | TN |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in ("all", "valve2", "valve1+other"):
            for name, label in (("reference", "int8"), ("float", "float twin")):
                s = m[g][name]
                lines.append(
                    f"| {g} | {label} | {s['f1']:.2f} | {s['far']:.2f} | {s['mar']:.2f} | {s['tp']} "
                    f"| {s['fp']} | {s['fn']} | {s['tn']} |"
                )
        lines += [
            "",
            "These are not leaderboard numbers. Under SKAB's published protocol (a detector per file, fitted",
            "on its first 400 rows) the same recipe, int8, scores F1 0.86 / FAR 12.57 % / MAR 16.14 %:",
            "docs/detectors.md.",
        ]
    return lines


_LIMITS = {
    "demo": [
        "- Trained and judged on the project's own simulator only (`hal_sim.SimulatedMachine`: one bearing",
        "  and one imbalance signature, full severity). It says nothing about a real machine: commission a",
        "  real node on its own normal windows.",
        "- Trained with CPython's `random`; the MicroPython node draws different noise from its own",
        "  generator (same distributions): tests/firmware/test_detector.py runs the simulator and the",
        "  detector under MicroPython and checks false alarms and detection there too.",
        "- Temperature heats by 0.4 degC per faulty window and cools as slowly: windows right after a fault",
        "  is switched off still score high until the bearing has cooled.",
    ],
    "skab": [
        "- Fitted at the operating point of anomaly-free.csv (~125 L/min, 0.21 g). Most anomalous files run",
        "  at other operating points (valve1/valve2 ~32 L/min, other/1-4 ~76 L/min), so this model flags",
        "  nearly every row of them: a false-alarm rate near 87 %. Commission one model per operating point.",
        "- Its inputs are 5-row causal means of the four sensors; the node or gateway feeding it must",
        "  compute them (manifest `input_mean_window`), then apply the manifest's `alarm` rule",
        "  (20-row score mean, 20-row hold), which `Detector` and `ModelScorer` do.",
    ],
}


def model_card(name: str, entry: dict[str, Any]) -> str:
    """The short model card written beside the model."""
    feats = entry["inputs"]["features"]
    alarm = entry["alarm"]
    lines = [
        f"# {name}",
        "",
        f"{entry['description']}.",
        "",
        f"- file: `models/{entry['file']}`, {entry['bytes']} bytes, sha256 `{entry['sha256']}`",
        f"- version: {entry['version']}; int8 FULLY_CONNECTED layers (in, out, activation): "
        f"{json.dumps(entry['layers'])}",
        f"- inputs ({len(feats)}, in this order): {', '.join(f'`{f}`' for f in feats)}",
        f"- scoring: `{entry['scoring']}` {json.dumps(entry['score_params'])}; "
        f"threshold {entry['threshold']}; alarm: mean of the last {alarm['smooth']} score(s), "
        f"held {alarm['hold']} more window(s)",
        f"- training data: {entry['training']['data']}",
        f"- training protocol: {entry['training']['protocol']}",
        "",
        "## Metrics",
        "",
        *_fmt_metrics(entry),
        "",
        "## Limits",
        "",
        *_LIMITS[entry["kind"]],
        "",
        "## Reproduce",
        "",
        "```sh",
        f"{entry['retrain']}      # train into a file, print the metrics",
        f"edgeline quantize export {entry['kind']} --name {name}   # retrain into models/: file, card, "
        "manifest.json",
        f"edgeline quantize parity models/{entry['file']}   # node vs tflite-micro vs LiteRT",
        "```",
        "",
        "Training is deterministic: both training commands write the same bytes (same sha256);",
        "tests/quantize/test_models_committed.py checks the committed file against a retrain.",
        "",
    ]
    return "\n".join(lines)
