"""Host code. `edgeline quantize ...`: train, export, evaluate and check int8 detectors.

    edgeline quantize train {demo,skab} --out FILE.tflite [--json REPORT]
    edgeline quantize export {demo,skab} [--name NAME] [--models-dir models]
    edgeline quantize eval [--json REPORT] [--headroom 4] [--no-anomaly-free]
    edgeline quantize parity MODEL.tflite [...] [--n 10000] [--json REPORT] [--no-micropython]

host/cli.py hooks this in with `add_quantize_parser(sub)`. Every command exits 0 when its
checks pass (targets met, parity holds), 1 when they do not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .registry import DEFAULT_NAMES, KINDS, MODELS_DIR, RegistryError, export_model, shared_dir, train_model


def _write_json(path: Path | None, obj: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _train(args: argparse.Namespace) -> int:
    model, record = train_model(args.kind, args.shared)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.data)
    sha = hashlib.sha256(model.data).hexdigest()
    print(f"wrote {args.out} ({len(model.data)} bytes, sha256 {sha})")
    man = model.manifest
    print(f"threshold {model.threshold}; scoring {man['scoring']}; {len(man['features'])} features")
    print(json.dumps(record["metrics"], indent=2, default=_jsonable))
    _write_json(args.json, {"file": str(args.out), "sha256": sha, "bytes": len(model.data), **record})
    return 0


def _export(args: argparse.Namespace) -> int:
    name = args.name or DEFAULT_NAMES[args.kind]
    model, record = train_model(args.kind, args.shared)
    try:
        entry = export_model(model.data, record, name, args.models_dir)
    except RegistryError as e:
        print(f"edgeline quantize export: {e}", file=sys.stderr)
        return 2
    d = args.models_dir
    print(
        f"wrote {d / entry['file']} (sha256 {entry['sha256']}), {d / entry['card']}, "
        f"and {d / 'manifest.json'}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .skab_int8 import evaluate_int8

    r = evaluate_int8(
        shared_dir(args.shared),
        headroom=args.headroom,
        runtimes=tuple(args.runtimes),
        anomaly_free=not args.no_anomaly_free,
    )
    print(r["table"])
    print()
    print(r["markdown"])
    t = r["targets"]
    print()
    print(
        f"targets (all files, int8): F1 >= {t['f1']}, FAR <= {t['far']} %, MAR <= {t['mar']} %: "
        f"{'met' if t['int8_meets'] else 'NOT met'}; |F1 float - int8| = {t['f1_gap_unrounded']} "
        f"(allowed {t['max_f1_gap']})"
    )
    a = r["split_agreement"]
    print(
        f"runtimes: tflite-micro identical to the numpy reference on {a['tflite_micro_rows_identical']} of "
        f"{a['rows']} rows; LiteRT at most {a['litert_max_lsb']} LSB away, {a['litert_values_differing']} of "
        f"{a['values']} values differ; alarms differing from the reference: "
        f"{a['alarms_differing_from_reference']}"
    )
    _write_json(args.json, r)
    ok = t["int8_meets"] and t["f1_gap_unrounded"] <= t["max_f1_gap"]
    return 0 if ok else 1


def _parity(args: argparse.Namespace) -> int:
    from .parity import check_parity

    results = {}
    ok = True
    for path in args.models:
        try:
            data = path.read_bytes()
        except OSError as e:
            print(f"edgeline quantize parity: cannot read {path}: {e}", file=sys.stderr)
            return 2
        r = check_parity(data, n=args.n, seed=args.seed, micropython=not args.no_micropython)
        results[str(path)] = r
        ok &= r["ok"]
        o = r["int8_outputs"]
        print(f"{path} ({r['sha256'][:16]}..., layers {r['layers']}), {r['inputs']} random int8 inputs:")
        for who, rows in o["rows_identical_to_tflite_micro"].items():
            print(f"  {who:28s} identical to tflite-micro on {rows} / {r['inputs']} rows")
        print(
            f"  LiteRT: at most {o['litert_max_lsb_from_tflite_micro']} LSB from tflite-micro; "
            f"{o['litert_values_differing']} of {o['values']} values differ "
            f"({o['litert_values_differing_rate']:.3%})"
        )
        d = r["decisions"]
        if "agree" in d:
            print(
                f"  decisions on {d['rows']} random feature vectors, {d['node']} vs {d['gateway']}: "
                f"{d['agree']} agree ({d['agree_rate']:.4%}); anomalous: node {d['node_anomalous']}, "
                f"gateway {d['gateway_anomalous']}; largest |node - gateway| score difference for scores "
                f"up to 2x the threshold: {d['node_vs_litert_max_score_diff_near_threshold']:.2%} of it "
                f"(node vs numpy reference: relative {d['node_vs_reference_max_rel_score_diff']:.1e})"
            )
        print(f"  {'OK' if r['ok'] else 'FAILED'} in {r['seconds']} s")
    _write_json(args.json, results)
    return 0 if ok else 1


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `quantize` and its subcommands to the `edgeline` subparsers `sub`."""
    q = sub.add_parser(
        "quantize",
        help="train, export, evaluate and check int8 detectors",
        description="Train the shipped int8 detectors, register them in models/, evaluate them on SKAB "
        "beside the leaderboard, and check node / tflite-micro / LiteRT parity of a model file.",
    )
    qs = q.add_subparsers(dest="quantize_cmd", required=True)
    shared_help = "shared data folder holding datasets/skab (default: $EDGELINE_SHARED or ../shared)"

    t = qs.add_parser("train", help="train a detector into a .tflite file and print its metrics")
    t.add_argument(
        "kind", choices=KINDS, help="demo: the demo nodes' detector; skab: SKAB, fit on anomaly-free.csv"
    )
    t.add_argument("--out", type=Path, required=True, help="the .tflite file to write")
    t.add_argument("--json", type=Path, default=None, help="also write the training record and metrics here")
    t.add_argument("--shared", default=None, help=shared_help)
    t.set_defaults(func=_train)

    e = qs.add_parser("export", help="train a detector into models/: file, model card, manifest.json entry")
    e.add_argument("kind", choices=KINDS)
    e.add_argument("--name", default=None, help=f"model name (default: {DEFAULT_NAMES})")
    e.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="default: the repository's models/")
    e.add_argument("--shared", default=None, help=shared_help)
    e.set_defaults(func=_export)

    v = qs.add_parser(
        "eval", help="SKAB: int8 and float under the published protocol, beside the leaderboard"
    )
    v.add_argument("--json", type=Path, default=None, help="also write the full result here")
    v.add_argument("--shared", default=None, help=shared_help)
    v.add_argument("--headroom", type=float, default=4.0, help="int8 calibration headroom (default 4)")
    v.add_argument(
        "--runtimes",
        nargs="+",
        default=["reference", "tflite-micro", "litert"],
        choices=["reference", "tflite-micro", "litert"],
        help="int8 runtimes to score with (default: all three)",
    )
    v.add_argument("--no-anomaly-free", action="store_true", help="skip the anomaly-free fit-once protocol")
    v.set_defaults(func=_eval)

    p = qs.add_parser("parity", help="node vs tflite-micro vs LiteRT on random inputs, and decisions")
    p.add_argument("models", type=Path, nargs="+", help=".tflite files")
    p.add_argument("--n", type=int, default=10_000, help="random inputs (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-micropython", action="store_true", help="skip the MicroPython unix port")
    p.set_defaults(func=_parity)
    return q


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeline.quantize.cli ...`: the same as `edgeline quantize ...`."""
    parser = argparse.ArgumentParser(prog="edgeline")
    add_quantize_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
