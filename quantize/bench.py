"""Host code. `edgeline bench node-model`: microseconds per inference of each committed model.

For every model in models/manifest.json, on this host:

- the node's interpreter under the MicroPython unix port, viper kernel and plain-Python kernel
  (`Model.invoke_into`, the input and output copies included), and the node's whole
  `Detector.score` path (standardize, quantize, invoke, dequantize, score, threshold);
- tflite-micro's Python interpreter driven from CPython: `invoke()` alone, and with
  `set_input`/`get_output`;
- LiteRT from CPython: one row with `set_tensor`/`invoke`/`get_tensor`, and per row of a
  4096-row batch (how the gateway runs it).

Each figure is the median over `repeats` timed runs of a loop sized to take ~50 ms, minus an
empty loop of the same length on MicroPython (emlearn-micropython's do-nothing baseline); the
JSON also gives each node figure as a ratio to tflite-micro's invoke on the same host. These
are interpreter-on-a-PC numbers: they compare implementations, they do not predict a board.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgeline.host.virtual_node import FIRMWARE_DIR, micropython_binary

from .registry import MODELS_DIR, model_paths

_MP_BENCH = """
import sys, time
from edgeline_node.tflite_model import Model, KERNELS
from edgeline_node.detector import Detector
path = sys.argv[1]
repeats = int(sys.argv[2])
with open(path, "rb") as f:
    data = f.read()

def timed(fn, n):
    t0 = time.ticks_us()
    fn(n)
    return time.ticks_diff(time.ticks_us(), t0)

def empty(n):
    for i in range(n):
        pass

def median(v):
    v = sorted(v)
    k = len(v)
    return v[k // 2] if k % 2 else (v[k // 2 - 1] + v[k // 2]) / 2

def bench(name, fn):
    # size the loop to ~50 ms, warm up, then the median of `repeats` runs
    n = 16
    while timed(fn, n) < 50000 and n < 1 << 22:
        n *= 2
    t0 = time.ticks_us()
    while time.ticks_diff(time.ticks_us(), t0) < 200000:
        fn(n // 8 + 1)
    runs = []
    for r in range(repeats):
        base = timed(empty, n)
        runs.append((timed(fn, n) - base) / n)
    print(name, median(runs), n)

for kernel in KERNELS:
    m = Model(data, kernel=kernel)
    x = bytearray(range(m.input_shape[-1]))
    out = bytearray(m.output_shape[-1])
    def run(n, m=m, x=x, out=out):
        for i in range(n):
            m.invoke_into(x, out)
    bench("node_" + kernel, run)

d = Detector(data)
feats = [mu + 0.5 * sd for mu, sd in zip(d._mean, d._std)]
def run_detector(n, d=d, feats=feats):
    for i in range(n):
        d.score(feats)
bench("node_detector_" + d.model.kernel, run_detector)
"""


def _median_us(fn: Callable[[], Any], repeats: int) -> tuple[float, int]:
    n = 16
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= 0.05 or n >= 1 << 22:
            break
        n *= 2
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:  # warm up
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs), n


def bench_node(path: Path, repeats: int) -> dict[str, float]:
    env = dict(os.environ, MICROPYPATH=f"{FIRMWARE_DIR}:.frozen")
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-") as tmp:
        script = Path(tmp) / "bench.py"
        script.write_text(_MP_BENCH)
        r = subprocess.run(
            [micropython_binary(), str(script), str(path), str(repeats)],
            capture_output=True,
            timeout=600,
            env=env,
        )
    if r.returncode != 0:
        raise RuntimeError(f"the MicroPython benchmark failed on {path}:\n{r.stderr.decode()}")
    out = {}
    for line in r.stdout.decode().splitlines():
        name, us, _n = line.split()
        out[name] = float(us)
    return out


def bench_host(data: bytes, repeats: int) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter
    from tflite_micro import runtime as tflm

    micro = tflm.Interpreter.from_bytes(data)
    n_in = int(micro.get_input_details(0)["shape"][-1])
    x = (np.arange(n_in) % 128).astype(np.int8)[None, :]
    micro.set_input(x, 0)

    def micro_io() -> None:
        micro.set_input(x, 0)
        micro.invoke()
        micro.get_output(0)

    lite = Interpreter(model_content=data)
    lite.allocate_tensors()
    i_in = lite.get_input_details()[0]["index"]
    i_out = lite.get_output_details()[0]["index"]

    def lite_io() -> None:
        lite.set_tensor(i_in, x)
        lite.invoke()
        lite.get_tensor(i_out)

    res = {
        "tflite_micro_invoke": _median_us(micro.invoke, repeats)[0],
        "tflite_micro_with_io": _median_us(micro_io, repeats)[0],
        "litert_with_io": _median_us(lite_io, repeats)[0],
    }
    batch = np.tile(x, (4096, 1))
    big = Interpreter(model_content=data)
    big.resize_tensor_input(big.get_input_details()[0]["index"], list(batch.shape))
    big.allocate_tensors()
    b_in = big.get_input_details()[0]["index"]
    b_out = big.get_output_details()[0]["index"]

    def lite_batch() -> None:
        big.set_tensor(b_in, batch)
        big.invoke()
        big.get_tensor(b_out)

    res["litert_batch4096_per_row"] = _median_us(lite_batch, repeats)[0] / len(batch)
    return res


def bench_models(models_dir: Path = MODELS_DIR, repeats: int = 7) -> dict[str, Any]:
    paths = model_paths(models_dir)
    if not paths:
        raise FileNotFoundError(f"no models registered in {models_dir / 'manifest.json'}")
    r = subprocess.run([micropython_binary(), "-c", "import sys; print(sys.version)"], capture_output=True)
    out: dict[str, Any] = {
        "unit": "microseconds per inference (median of repeats)",
        "repeats": repeats,
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "python": platform.python_version(),
            "micropython": r.stdout.decode().strip(),
        },
        "models": {},
    }
    for name, path in paths.items():
        data = path.read_bytes()
        us = {**bench_node(path, repeats), **bench_host(data, repeats)}
        base = us["tflite_micro_invoke"]
        ratios = {k: round(v / base, 2) for k, v in us.items() if k != "tflite_micro_invoke"}
        out["models"][name] = {
            "file": str(path),
            "us": {k: round(v, 3) for k, v in us.items()},
            "ratio_to_tflite_micro_invoke": ratios,
        }
    return out


def _bench_node_model(args: argparse.Namespace) -> int:
    import json

    r = bench_models(args.models_dir, args.repeats)
    for name, m in r["models"].items():
        print(f"{name}:")
        for k, v in m["us"].items():
            ratio = m["ratio_to_tflite_micro_invoke"].get(k)
            print(
                f"  {k:32s} {v:10.3f} us" + (f"   x{ratio} tflite-micro invoke" if ratio is not None else "")
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


def add_node_model_bench(bench_sub: Any) -> argparse.ArgumentParser:
    """Add `node-model` to an existing `edgeline bench` subparsers object."""
    b = bench_sub.add_parser(
        "node-model",
        help="us per inference of each committed model: node (viper, plain), tflite-micro, LiteRT",
    )
    b.add_argument("--json", type=Path, default=None, help="write the results here")
    b.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    b.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is reported")
    b.set_defaults(func=_bench_node_model)
    return b


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `bench` (with `node-model`) to the `edgeline` subparsers `sub`. If another module
    already adds `bench`, call `add_node_model_bench` on its subparsers instead."""
    b = sub.add_parser("bench", help="benchmarks")
    bs = b.add_subparsers(dest="bench_what", required=True)
    add_node_model_bench(bs)
    return b


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeline.quantize.bench node-model ...`: the same as `edgeline bench node-model ...`."""
    parser = argparse.ArgumentParser(prog="edgeline")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
