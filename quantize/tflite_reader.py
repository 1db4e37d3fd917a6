"""Read a ``.tflite`` file written by `tflite_writer.write_tflite` back into a `QuantizedModel`.

Host code, on the ``tflite`` schema bindings. It closes the loop of the int8 path: a detector
is quantized (`int8.quantize_chain`), written (`tflite_writer.write_tflite`), and what is
evaluated is what this module reads back from the bytes, so a metric computed with the numpy
reference (`int8_reference.run`) is a metric of the file, not of an in-memory object that
might differ from it.

Only what the writer produces is accepted: one subgraph, a chain of int8 FULLY_CONNECTED ops
with NONE/RELU/RELU6 fused, int8 weights quantized per output channel (or per tensor for a
one-unit layer), int32 biases. Anything else raises `TFLiteReadError` naming what it found.
"""

from __future__ import annotations

import numpy as np
import tflite

from .int8 import QuantizedLayer, QuantizedModel

_ACTIVATIONS = {
    tflite.ActivationFunctionType.NONE: "none",
    tflite.ActivationFunctionType.RELU: "relu",
    tflite.ActivationFunctionType.RELU6: "relu6",
}


class TFLiteReadError(ValueError):
    """The bytes are not an edgeline int8 dense-chain model."""


def _constant(model: tflite.Model, tensor: tflite.Tensor, dtype: str, what: str) -> np.ndarray:
    buf = model.Buffers(tensor.Buffer())
    if buf is None or buf.DataLength() == 0:
        raise TFLiteReadError(f"{what} has no constant data (buffer {tensor.Buffer()})")
    raw = buf.DataAsNumpy().tobytes()
    out: np.ndarray = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.ShapeAsNumpy().tolist()))
    return out.copy()


def _scales(tensor: tflite.Tensor, what: str) -> tuple[np.ndarray, np.ndarray]:
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
        raise TFLiteReadError(f"{what} has no quantization scale")
    return q.ScaleAsNumpy().astype(np.float32), q.ZeroPointAsNumpy().astype(np.int64)


def _activation_quant(tensor: tflite.Tensor, what: str) -> tuple[float, int]:
    if tensor.Type() != tflite.TensorType.INT8:
        raise TFLiteReadError(f"{what} is tensor type {tensor.Type()}, not INT8")
    s, z = _scales(tensor, what)
    if s.size != 1 or z.size != 1:
        raise TFLiteReadError(f"{what} must be quantized per tensor, has {s.size} scales")
    return float(s[0]), int(z[0])


def read_tflite(data: bytes | bytearray | memoryview) -> QuantizedModel:
    """The `QuantizedModel` stored in `data`.

    :raises TFLiteReadError: when the file is not an int8 FULLY_CONNECTED chain.
    """
    buf = bytes(data)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise TFLiteReadError("not a .tflite flatbuffer (file identifier 'TFL3' missing)")
    try:
        return _read(tflite.Model.GetRootAsModel(buf, 0))
    except TFLiteReadError:
        raise
    except (IndexError, ValueError, TypeError, AttributeError) as e:  # flatbuffers on bad bytes
        raise TFLiteReadError(f"cannot read the model: {e}") from e


def _read(m: tflite.Model) -> QuantizedModel:
    if m.SubgraphsLength() != 1:
        raise TFLiteReadError(f"model has {m.SubgraphsLength()} subgraphs, expected 1")
    sg = m.Subgraphs(0)
    layers: list[QuantizedLayer] = []
    prev = int(sg.Inputs(0))
    for k in range(sg.OperatorsLength()):
        op = sg.Operators(k)
        code = m.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin != tflite.BuiltinOperator.FULLY_CONNECTED:
            raise TFLiteReadError(f"operator {k} is builtin {builtin}, not FULLY_CONNECTED")
        ins = op.InputsAsNumpy().tolist()
        out = int(op.Outputs(0))
        if ins[0] != prev:
            raise TFLiteReadError(f"operator {k} reads tensor {ins[0]}, not the previous output {prev}")
        act = tflite.ActivationFunctionType.NONE
        if op.BuiltinOptionsType() == tflite.BuiltinOptions.FullyConnectedOptions:
            t = op.BuiltinOptions()
            opts = tflite.FullyConnectedOptions()
            opts.Init(t.Bytes, t.Pos)
            act = opts.FusedActivationFunction()
        if act not in _ACTIVATIONS:
            raise TFLiteReadError(f"operator {k} has fused activation {act}; supported: NONE, RELU, RELU6")
        x_t, w_t, y_t = sg.Tensors(ins[0]), sg.Tensors(ins[1]), sg.Tensors(out)
        in_scale, in_zp = _activation_quant(x_t, f"operator {k} input")
        out_scale, out_zp = _activation_quant(y_t, f"operator {k} output")
        if w_t.Type() != tflite.TensorType.INT8:
            raise TFLiteReadError(f"operator {k} weights are type {w_t.Type()}, not INT8")
        weight = _constant(m, w_t, "<i1", f"operator {k} weights").astype(np.int8)
        w_scale, w_zp = _scales(w_t, f"operator {k} weights")
        if np.any(w_zp != 0):
            raise TFLiteReadError(f"operator {k} weights have a nonzero zero point")
        n_out = weight.shape[0]
        if len(ins) > 2 and ins[2] >= 0:
            bias = _constant(m, sg.Tensors(ins[2]), "<i4", f"operator {k} bias").astype(np.int32)
        else:
            bias = np.zeros(n_out, np.int32)
        layers.append(
            QuantizedLayer(
                weight=weight,
                weight_scale=w_scale,
                bias=bias,
                activation=_ACTIVATIONS[act],
                input_scale=in_scale,
                input_zero_point=in_zp,
                output_scale=out_scale,
                output_zero_point=out_zp,
            )
        )
        prev = out
    if not layers:
        raise TFLiteReadError("the subgraph has no operators")
    if prev != int(sg.Outputs(0)):
        raise TFLiteReadError(
            f"the last operator writes tensor {prev}, the subgraph output is {sg.Outputs(0)}"
        )
    return QuantizedModel(tuple(layers))
