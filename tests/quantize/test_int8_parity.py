"""int8 parity: the numpy reference, tflite-micro, LiteRT and the node interpreter.

For a few seeded dense chains, quantized with `edgeline.quantize.int8` on random
calibration data and written with `tflite_writer`, 10,000 random int8 inputs give
byte-identical outputs from tflite-micro, the numpy "double" reference and the node
interpreter (under CPython, and under the MicroPython unix port with both its plain and
its viper kernel, in one process). LiteRT is within 1 LSB; its reference kernels equal the
numpy "single" reference exactly; how often it differs from tflite-micro is printed
(run with -s to see it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tflite
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from edgeline.firmware.edgeline_node.tflite_model import Model
from edgeline.host.inference import InferenceBackend, load_backend
from edgeline.quantize import int8_reference as ref
from edgeline.quantize.int8 import (
    QuantizationError,
    QuantizedLayer,
    QuantizedModel,
    asymmetric_params,
    effective_scales,
    quantize_chain,
    quantize_multiplier,
    quantize_weights,
)
from edgeline.quantize.tflite_writer import Manifest, ManifestError, read_manifest, write_tflite
from tflite_micro import runtime as tflm

from micropython_runner import run_micropython

N_INPUTS = 10_000


@dataclass
class Built:
    name: str
    model: QuantizedModel
    data: bytes
    x: np.ndarray  # int8[N_INPUTS, in]
    y_double: np.ndarray  # int8[N_INPUTS, out], the numpy "double" reference


def _dense(
    rng: np.random.Generator, n_in: int, n_out: int, gain: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(size=(n_out, n_in)).astype(np.float32) * np.float32(gain / np.sqrt(n_in))
    b = (rng.normal(size=n_out) * 0.1).astype(np.float32)
    return w, b


def _chain(seed: int, sizes: list[int], acts: list[str], gain: float = 1.0) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out, act in zip(sizes[:-1], sizes[1:], acts, strict=True):
        w, b = _dense(rng, n_in, n_out, gain)
        layers.append((w, b, act))
    return layers, rng.normal(size=(512, sizes[0])).astype(np.float32)


def _pca_like(seed: int, n: int = 8, k: int = 3) -> tuple[list, np.ndarray]:
    """One linear layer n -> k + n: the k principal scores and the n-dim reconstruction."""
    rng = np.random.default_rng(seed)
    cov = rng.normal(size=(n, n))
    basis, _ = np.linalg.qr(cov)
    p = basis[:, :k].astype(np.float32)  # [n, k], orthonormal columns
    w = np.vstack([p.T, p @ p.T]).astype(np.float32)
    x = (rng.normal(size=(512, k)) @ p.T * 2.0 + rng.normal(size=(512, n)) * 0.3).astype(np.float32)
    return [(w, np.zeros(k + n, np.float32), "none")], x


def _stress_model() -> QuantizedModel:
    """Hand-made: a multiplier > 1 and accumulators past 2**28 after the left shift, so the
    node takes its exact arbitrary-precision path; then a relu6 layer. The first layer's
    outputs all saturate (int8 inputs cannot reach such accumulators otherwise), so this
    checks the path end to end; its rounding is covered value by value in
    tests/firmware/test_tflite_model.py::test_requantization_paths_equal_the_reference."""
    rng = np.random.default_rng(77)
    w0 = rng.choice(np.array([-127, 127], np.int8), size=(8, 64))
    l0 = QuantizedLayer(
        weight=w0,
        weight_scale=np.full(8, 1.0, np.float32),
        bias=rng.integers(-(2**22), 2**22, size=8).astype(np.int32),
        activation="none",
        input_scale=1.0,
        input_zero_point=3,
        output_scale=float(np.float32(1 / 90.0)),
        output_zero_point=-5,
    )
    l1 = QuantizedLayer(
        weight=rng.integers(-127, 128, size=(4, 8)).astype(np.int8),
        weight_scale=rng.uniform(0.001, 0.01, size=4).astype(np.float32),
        bias=rng.integers(-500, 500, size=4).astype(np.int32),
        activation="relu6",
        input_scale=l0.output_scale,
        input_zero_point=-5,
        output_scale=float(np.float32(0.03)),
        output_zero_point=-100,
    )
    return QuantizedModel((l0, l1))


def _build(name: str) -> Built:
    if name == "stress":
        qm = _stress_model()
    else:
        if name == "ae16":
            layers, cal = _chain(1, [16, 8, 16], ["relu", "none"])
        elif name == "ae8":
            layers, cal = _chain(2, [8, 3, 8], ["relu", "none"])
        elif name == "pca8":
            layers, cal = _pca_like(3)
        elif name == "relu6":  # large weights, so the fused clamp at 6.0 is hit
            layers, cal = _chain(4, [8, 6, 8], ["relu6", "none"], gain=6.0)
        elif name == "unit":  # a one-unit layer: per-tensor weight scale
            layers, cal = _chain(5, [8, 1, 4], ["relu", "relu"])
        else:
            raise KeyError(name)
        qm = quantize_chain(layers, cal)
    n = qm.in_features
    manifest = Manifest(
        features=[f"f{i}" for i in range(n)],
        mean=[0.0] * n,
        std=[1.0] * n,
        threshold=2.5,
        scoring="raw",
        version="test-1",
    )
    data = write_tflite(qm, manifest)
    rng = np.random.default_rng(1000 + sum(map(ord, name)))
    x = rng.integers(-128, 128, size=(N_INPUTS, n), dtype=np.int16).astype(np.int8)
    return Built(name, qm, data, x, ref.run(qm, x, "double"))


MODEL_NAMES = ["ae16", "ae8", "pca8", "relu6", "unit", "stress"]


@pytest.fixture(scope="module")
def built() -> dict[str, Built]:
    return {name: _build(name) for name in MODEL_NAMES}


def _tflm_run(data: bytes, x: np.ndarray) -> np.ndarray:
    interp = tflm.Interpreter.from_bytes(data)
    out = np.empty((len(x), interp.get_output_details(0)["shape"][-1]), np.int8)
    for i in range(len(x)):
        interp.set_input(x[i : i + 1], 0)
        interp.invoke()
        out[i] = interp.get_output(0)[0]
    return out


def _litert_run(data: bytes, x: np.ndarray, resolver: OpResolverType | None = None) -> np.ndarray:
    kw = {} if resolver is None else {"experimental_op_resolver_type": resolver}
    interp = Interpreter(model_content=data, **kw)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))


# --- the quantizer's arithmetic ---------------------------------------------------------


def test_quantize_multiplier_known_values() -> None:
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    assert quantize_multiplier(1.0) == (1 << 30, 1)
    assert quantize_multiplier(0.75) == (3 << 29, 0)
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # shifts below -31 flush to zero
    assert quantize_multiplier(1 - 2.0**-40) == (1 << 30, 1)  # rounds up to 2**31: renormalized
    assert quantize_multiplier(2.0**40, "double") == (1 << 30, 41)
    assert quantize_multiplier(2.0**40, "single") == ((1 << 31) - 1, 30)
    with pytest.raises(ValueError):
        quantize_multiplier(-1.0)


def test_effective_scale_per_tensor_rounds_product_to_float32() -> None:
    si, sw, so = 0.1, 0.3, 0.7
    per_channel = effective_scales(si, [sw, sw], so)
    per_tensor = effective_scales(si, [sw], so)
    assert per_channel[0] == float(np.float32(si)) * float(np.float32(sw)) / float(np.float32(so))
    assert per_tensor[0] == float(np.float32(si) * np.float32(sw)) / float(np.float32(so))


@pytest.mark.parametrize(
    ("rmin", "rmax", "zp"),
    [(0.0, 6.0, -128), (-1.0, 1.0, 0), (-3.0, 0.0, 127), (0.5, 2.0, -128), (-2.0, -0.5, 127)],
)
def test_asymmetric_params_include_zero(rmin: float, rmax: float, zp: int) -> None:
    scale, z = asymmetric_params(rmin, rmax)
    assert z == zp
    assert scale == pytest.approx((max(rmax, 0) - min(rmin, 0)) / 255, rel=1e-6)
    # 0.0 is exactly representable
    assert (0.0 / scale) + z == z


def test_weights_are_symmetric_per_channel() -> None:
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]], np.float32)
    q, s = quantize_weights(w)
    assert q.dtype == np.int8
    assert s.tolist() == pytest.approx([1.0 / 127, 1.0, 3.0 / 127])
    assert np.abs(q).max(axis=1).tolist() == [127, 0, 127]
    np.testing.assert_allclose(q * s[:, None], w, atol=s.max() / 2)


def test_quantize_chain_rejects_bad_input() -> None:
    layers, cal = _chain(9, [4, 2], ["none"])
    with pytest.raises(QuantizationError, match="calibration data"):
        quantize_chain(layers, cal[:, :3])
    with pytest.raises(QuantizationError, match="takes 3 inputs"):
        quantize_chain([*layers, (np.zeros((2, 3), np.float32), np.zeros(2, np.float32), "none")], cal)
    with pytest.raises(QuantizationError, match="unsupported activation 'tanh'"):
        quantize_chain([(layers[0][0], layers[0][1], "tanh")], cal)


def test_huge_bias_over_tiny_weights_keeps_accumulator_in_int32() -> None:
    w = np.full((2, 4), 1e-9, np.float32)
    b = np.array([100.0, -100.0], np.float32)
    qm = quantize_chain([(w, b, "none")], np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    layer = qm.layers[0]
    assert np.abs(layer.bias.astype(np.int64)).max() + 256 * 127 * 4 < 2**31 - 1
    Model(write_tflite(qm))  # the node accepts it (it refuses overflowing accumulators)


# --- the file -------------------------------------------------------------------------


def test_writer_is_deterministic_and_carries_the_manifest(built: dict[str, Built]) -> None:
    b = built["ae16"]
    again = _build("ae16")
    assert hashlib.sha256(again.data).hexdigest() == hashlib.sha256(b.data).hexdigest()
    man = read_manifest(b.data)
    assert man == {
        "schema": 1,
        "version": "test-1",
        "features": [f"f{i}" for i in range(16)],
        "scaler": {"mean": [0.0] * 16, "std": [1.0] * 16},
        "threshold": 2.5,
        "scoring": "raw",
    }
    assert Manifest.from_dict(man).threshold == 2.5
    assert len(b.data) % 16 == 0


def test_written_file_structure(built: dict[str, Built]) -> None:
    data = built["ae16"].data
    m = tflite.Model.GetRootAsModel(data, 0)
    assert m.Version() == 3 and m.SubgraphsLength() == 1
    assert tflite.Model.ModelBufferHasIdentifier(data, 0)
    sg = m.Subgraphs(0)
    assert sg.OperatorsLength() == 2
    assert m.OperatorCodes(0).BuiltinCode() == tflite.BuiltinOperator.FULLY_CONNECTED
    types = [sg.Tensors(i).Type() for i in range(sg.TensorsLength())]
    i8, i32 = tflite.TensorType.INT8, tflite.TensorType.INT32
    assert types == [i8] + [i8, i32, i8] * 2  # input, then (weights, bias, output) per op
    w = sg.Tensors(1)
    q = w.Quantization()
    assert q.QuantizedDimension() == 0
    assert q.ScaleLength() == 8 and q.ZeroPointAsNumpy().tolist() == [0] * 8
    # constant data is 16-byte aligned (tflite-micro's expectation for weight buffers)
    for i in range(1, m.BuffersLength()):
        buf = m.Buffers(i)
        if buf.DataLength():
            start = buf._tab.Vector(buf._tab.Offset(4))
            assert start % 16 == 0


def test_manifest_is_validated() -> None:
    qm = _build("ae8").model
    good = {"features": [f"f{i}" for i in range(8)], "mean": [0.0] * 8, "std": [1.0] * 8, "threshold": 1.0}
    with pytest.raises(ManifestError, match="'features' lists 3 names but the model takes 8"):
        write_tflite(qm, Manifest(**{**good, "features": ["a", "b", "c"]}))  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=r"scaler\.std"):
        write_tflite(qm, Manifest(**{**good, "std": [0.0] * 8}))  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="'scoring'"):
        write_tflite(qm, Manifest(**good, scoring="Psychic Powers"))  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=r"no 'edgeline\.manifest'"):
        read_manifest(write_tflite(qm))
    with pytest.raises(ManifestError, match=r"not a \.tflite"):
        read_manifest(b"not a model at all")


# --- parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tflite_micro_equals_double_reference(built: dict[str, Built], name: str) -> None:
    b = built[name]
    y = _tflm_run(b.data, b.x)
    assert np.array_equal(y, b.y_double), f"{name}: {np.mean(y != b.y_double):.4%} of values differ"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_node_interpreter_under_cpython_equals_reference(built: dict[str, Built], name: str) -> None:
    b = built[name]
    m = Model(b.data)
    y = np.frombuffer(b"".join(m.invoke(row.tobytes()) for row in b.x), np.int8).reshape(b.y_double.shape)
    assert np.array_equal(y, b.y_double), f"{name}: {np.mean(y != b.y_double):.4%} of values differ"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_litert_within_one_lsb(built: dict[str, Built], name: str) -> None:
    b = built[name]
    y_single = ref.run(b.model, b.x, "single")
    rates = {}
    for label, resolver in [
        ("default", None),
        ("builtin", OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
        ("reference", OpResolverType.BUILTIN_REF),
    ]:
        y = _litert_run(b.data, b.x, resolver)
        diff = np.abs(y.astype(np.int16) - b.y_double)
        assert diff.max() <= 1, f"{name} LiteRT {label}: off by {diff.max()} LSB"
        rates[label] = float(np.mean(diff != 0))
        if label == "reference":
            # LiteRT's reference kernels are TFLITE_SINGLE_ROUNDING, exactly.
            assert np.array_equal(y, y_single)
    rates["single-vs-double"] = float(np.mean(y_single != b.y_double))
    print(
        f"\n{name}: LiteRT differs from tflite-micro in "
        + ", ".join(f"{k} {v:.3%}" for k, v in rates.items())
    )


def test_rounding_modes_differ_rarely_and_by_one(built: dict[str, Built]) -> None:
    total = differ = 0
    for b in built.values():
        y_single = ref.run(b.model, b.x, "single")
        assert np.abs(y_single.astype(np.int16) - b.y_double).max() <= 1
        total += y_single.size
        differ += int(np.sum(y_single != b.y_double))
    assert 0 < differ / total < 0.02


MICROPYTHON_PARITY = """
import sys
from edgeline_node.tflite_model import Model, KERNELS
for line in sys.stdin:
    name, model_path, x_path, out_prefix, n_in, n_out = line.split()
    n_in = int(n_in); n_out = int(n_out)
    with open(model_path, "rb") as f:
        data = f.read()
    for kernel in KERNELS:
        m = Model(data, kernel=kernel)
        out = bytearray(n_out)
        inp = bytearray(n_in)
        with open(x_path, "rb") as fx, open(out_prefix + "." + kernel, "wb") as fo:
            while fx.readinto(inp) == n_in:
                m.invoke_into(inp, out)
                fo.write(out)
        print(name, kernel, m.layers)
"""


@pytest.mark.micropython
def test_node_interpreter_under_micropython_equals_reference(built: dict[str, Built], tmp_path: Path) -> None:
    lines = []
    for b in built.values():
        (tmp_path / f"{b.name}.tflite").write_bytes(b.data)
        (tmp_path / f"{b.name}.x").write_bytes(b.x.tobytes())
        out = tmp_path / f"{b.name}.y"
        lines.append(
            f"{b.name} {tmp_path / b.name}.tflite {tmp_path / b.name}.x {out} {b.model.in_features} "
            f"{b.model.out_features}\n"
        )
    r = run_micropython(MICROPYTHON_PARITY, stdin="".join(lines).encode(), timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    report = r.stdout.decode()
    assert "viper" in report, "the viper kernel did not run under MicroPython:\n" + report
    for b in built.values():
        for kernel in ("viper", "python"):
            y = np.frombuffer((tmp_path / f"{b.name}.y.{kernel}").read_bytes(), np.int8)
            assert y.size == b.y_double.size, f"{b.name}/{kernel}: {y.size} values"
            y = y.reshape(b.y_double.shape)
            rate = np.mean(y != b.y_double)
            assert np.array_equal(y, b.y_double), f"{b.name}/{kernel}: {rate:.4%} of values differ"
    # the stress model's first layer runs the exact (long-int) path, the others the fast one
    assert "stress viper [(64, 8, False), (8, 4, True)]" in report


# --- the gateway backend -----------------------------------------------------------------


def test_gateway_backend_batches_through_litert(built: dict[str, Built]) -> None:
    b = built["ae16"]
    be = load_backend(b.data)
    assert isinstance(be, InferenceBackend)
    assert be.name == "litert"
    assert (be.in_features, be.out_features) == (16, 16)
    assert be.input_quant == (pytest.approx(b.model.input_scale), b.model.input_zero_point)
    y = np.concatenate(
        [be.invoke_batch(b.x[:64]), be.invoke_batch(b.x[64:65]), be.invoke_batch(b.x[65:1000])]
    )
    assert np.array_equal(y, _litert_run(b.data, b.x[:1000]))
    with pytest.raises(ValueError, match="int8 rows"):
        be.invoke_batch(b.x[:4].astype(np.int16))
    with pytest.raises(ValueError, match=r"int8\[N, 16\]"):
        be.invoke_batch(b.x[:4, :8])


def test_gateway_backend_falls_back_and_reports_which(built: dict[str, Built], tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(built["ae8"].data)
    try:
        import tflite_runtime  # noqa: F401

        expect = "tflite-runtime"
    except ImportError:
        expect = "litert"  # not installed here: the lazy import fails and LiteRT serves
    be = load_backend(path, prefer="tflite-runtime")
    assert be.name == expect
    assert be.invoke_batch(built["ae8"].x[:3]).shape == (3, 8)
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        load_backend(path, prefer="onnx")


def test_single_unit_layer_uses_per_tensor_scale(built: dict[str, Built]) -> None:
    data = built["unit"].data
    sg = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)
    assert sg.Tensors(1).Quantization().ScaleLength() == 1
    assert Model(data).layers == [(8, 1, True), (1, 4, True)]
