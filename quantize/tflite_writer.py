"""Write a `QuantizedModel` as a ``.tflite`` flatbuffer, without TensorFlow.

Host code, built on the ``tflite`` schema bindings and ``flatbuffers``. The file holds one
subgraph: an int8 input tensor ``[1, in]``, one FULLY_CONNECTED op per layer (fused
NONE/RELU/RELU6, int8 weights quantized per output channel along dimension 0, int32
bias), and an int8 output tensor ``[1, out]``. The same file runs on the gateway (LiteRT),
in tflite-micro, and in the node's own interpreter (firmware/edgeline_node/tflite_model.py).

A JSON manifest rides in ``Model.metadata`` under the name ``edgeline.manifest``: feature
names, the standardizing scaler, the threshold, the scoring kind and a version (see
docs/model-format.md). Writing is deterministic: the same model and manifest give the
same bytes, so a model's sha256 identifies it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import tflite

from .int8 import QuantizedLayer, QuantizedModel

MANIFEST_NAME = "edgeline.manifest"
RUNTIME_VERSION_NAME = "min_runtime_version"
MIN_RUNTIME_VERSION = b"1.14.0"  # what the TFLite converter stamps for int8 FULLY_CONNECTED v4
MANIFEST_SCHEMA = 1
# Scoring kinds edgeline's detectors use; others are allowed if they are lowercase identifiers.
SCORING_KINDS = ("reconstruction_mse", "pca_t2_q", "raw")
_SCORING_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
FULLY_CONNECTED_VERSION = 4  # int8 FULLY_CONNECTED, as the TFLite converter stamps it
_DATA_ALIGNMENT = 16  # constant buffers 16-byte aligned, as TFLM's flatbuffer tools do

_ACTIVATION_CODES = {
    "none": tflite.ActivationFunctionType.NONE,
    "relu": tflite.ActivationFunctionType.RELU,
    "relu6": tflite.ActivationFunctionType.RELU6,
}


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or does not fit its model."""


@dataclass(frozen=True)
class Manifest:
    """What the node and the gateway need besides the int8 graph to score a window.

    ``features`` names the model's inputs in order; the scaler maps a raw feature vector
    to the model's float input, ``(x - mean) / std``; ``threshold`` applies to the score
    of kind ``scoring`` computed in float from the dequantized output.
    """

    features: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    threshold: float
    scoring: str = "reconstruction_mse"
    version: str = "0"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def validate(self, in_features: int | None = None) -> None:
        """:raises ManifestError: naming the key that is wrong."""
        n = len(self.features)
        if in_features is not None and n != in_features:
            raise ManifestError(
                f"manifest 'features' lists {n} names but the model takes {in_features} inputs"
            )
        if len(set(self.features)) != n or not all(isinstance(f, str) and f for f in self.features):
            raise ManifestError("manifest 'features' must be distinct non-empty strings")
        if len(self.mean) != n or len(self.std) != n:
            raise ManifestError(
                f"manifest 'scaler' needs {n} means and stds, got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(float(m)) for m in self.mean):
            raise ManifestError("manifest 'scaler.mean' must be finite")
        if not all(math.isfinite(float(s)) and float(s) > 0 for s in self.std):
            raise ManifestError("manifest 'scaler.std' must be finite and > 0")
        if not math.isfinite(float(self.threshold)):
            raise ManifestError("manifest 'threshold' must be finite")
        if not isinstance(self.scoring, str) or not _SCORING_RE.fullmatch(self.scoring):
            raise ManifestError(
                f"manifest 'scoring' is {self.scoring!r}; use a lowercase identifier such as "
                f"{', '.join(SCORING_KINDS)}"
            )
        if not isinstance(self.version, str) or not self.version:
            raise ManifestError("manifest 'version' must be a non-empty string")
        reserved = {"schema", "features", "scaler", "threshold", "scoring", "version"}
        clash = reserved.intersection(self.extra)
        if clash:
            raise ManifestError(f"manifest 'extra' may not redefine {sorted(clash)}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            schema=MANIFEST_SCHEMA,
            version=self.version,
            features=list(self.features),
            scaler={"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]},
            threshold=float(self.threshold),
            scoring=self.scoring,
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """:raises ManifestError: for a missing key or an unknown schema."""
        if d.get("schema") != MANIFEST_SCHEMA:
            raise ManifestError(
                f"manifest 'schema' is {d.get('schema')!r}; this reader knows {MANIFEST_SCHEMA}"
            )
        try:
            scaler = d["scaler"]
            m = cls(
                features=list(d["features"]),
                mean=list(scaler["mean"]),
                std=list(scaler["std"]),
                threshold=float(d["threshold"]),
                scoring=d["scoring"],
                version=d["version"],
                extra={
                    k: v
                    for k, v in d.items()
                    if k not in {"schema", "features", "scaler", "threshold", "scoring", "version"}
                },
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"manifest is missing or mistypes key {e}") from e
        m.validate()
        return m

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces), padded with spaces to a multiple of 16.

        The padding makes the manifest the last thing in the file with no alignment bytes
        after it, so every truncation of a written model cuts into a checked vector.
        """
        raw = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        return raw + b" " * (-len(raw) % _DATA_ALIGNMENT)


# --- writing -------------------------------------------------------------------------


def _byte_vector(b: flatbuffers.Builder, data: bytes, alignment: int = _DATA_ALIGNMENT) -> int:
    b.StartVector(1, len(data), alignment)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    b.vectorNumElems = len(data)
    return int(b.EndVector())


def _int32_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype="<i4")))


def _int64_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype="<i8")))


def _float_vector(b: flatbuffers.Builder, values: Sequence[float]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype="<f4")))


def _quantization(
    b: flatbuffers.Builder, scales: Sequence[float], zero_points: Sequence[int], dim: int
) -> int:
    sv = _float_vector(b, scales)
    zv = _int64_vector(b, zero_points)
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, sv)
    tflite.QuantizationParametersAddZeroPoint(b, zv)
    tflite.QuantizationParametersAddQuantizedDimension(b, dim)
    return int(tflite.QuantizationParametersEnd(b))


def _tensor(
    b: flatbuffers.Builder, name: str, shape: Sequence[int], ttype: int, buffer: int, quant: int
) -> int:
    nv = b.CreateString(name)
    sv = _int32_vector(b, shape)
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, sv)
    tflite.TensorAddType(b, ttype)
    tflite.TensorAddBuffer(b, buffer)
    tflite.TensorAddName(b, nv)
    tflite.TensorAddQuantization(b, quant)
    return int(tflite.TensorEnd(b))


def _table_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def write_tflite(model: QuantizedModel, manifest: Manifest | Mapping[str, Any] | None = None) -> bytes:
    """Serialize `model` (and its manifest) as ``.tflite`` bytes.

    :raises ManifestError: if the manifest does not fit the model.
    """
    if manifest is not None and not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict({"schema": MANIFEST_SCHEMA, **manifest})
    if manifest is not None:
        manifest.validate(model.in_features)

    b = flatbuffers.Builder(4096)
    # Objects are laid out back to front: the first one created ends the file. That is the
    # "min_runtime_version" string TFLite converters also write, padded to 16 bytes, so no
    # alignment padding follows it: every truncation of the file then cuts into a vector a
    # reader checks. Then the manifest (also padded), the constant data, the tables.
    runtime_vec = _byte_vector(b, MIN_RUNTIME_VERSION.ljust(_DATA_ALIGNMENT, b"\0"))
    manifest_vec = None
    if manifest is not None:
        manifest_vec = _byte_vector(b, manifest.to_json_bytes())

    layers: list[QuantizedLayer] = list(model.layers)
    const_vecs: list[int] = []
    for layer in layers:
        const_vecs.append(_byte_vector(b, np.ascontiguousarray(layer.weight, dtype=np.int8).tobytes()))
        const_vecs.append(_byte_vector(b, np.ascontiguousarray(layer.bias, dtype="<i4").tobytes()))

    # Buffers: [0]=empty, then (weights, bias) per layer, then the metadata entries.
    buffer_tables = []
    tflite.BufferStart(b)
    buffer_tables.append(int(tflite.BufferEnd(b)))
    metadata: list[tuple[str, int]] = [(RUNTIME_VERSION_NAME, runtime_vec)]
    if manifest_vec is not None:
        metadata.append((MANIFEST_NAME, manifest_vec))
    metadata_buffers: list[tuple[str, int]] = []
    for vec in const_vecs + [vec for _, vec in metadata]:
        tflite.BufferStart(b)
        tflite.BufferAddData(b, vec)
        buffer_tables.append(int(tflite.BufferEnd(b)))
    for i, (name, _) in enumerate(metadata):
        metadata_buffers.append((name, 1 + len(const_vecs) + i))

    # Tensors: 0 = input, then per layer: weights, bias, output.
    tensors = []
    q = _quantization(b, [model.input_scale], [model.input_zero_point], 0)
    tensors.append(_tensor(b, "input", [1, model.in_features], tflite.TensorType.INT8, 0, q))
    op_io: list[tuple[list[int], list[int]]] = []
    prev = 0
    for i, layer in enumerate(layers):
        wq = _quantization(b, [float(s) for s in layer.weight_scale], [0] * len(layer.weight_scale), 0)
        w_idx = len(tensors)
        tensors.append(
            _tensor(b, f"dense_{i}/weights", list(layer.weight.shape), tflite.TensorType.INT8, 1 + 2 * i, wq)
        )
        bq = _quantization(b, [float(s) for s in layer.bias_scale], [0] * len(layer.bias_scale), 0)
        b_idx = len(tensors)
        tensors.append(
            _tensor(b, f"dense_{i}/bias", [layer.out_features], tflite.TensorType.INT32, 2 + 2 * i, bq)
        )
        oq = _quantization(b, [layer.output_scale], [layer.output_zero_point], 0)
        o_idx = len(tensors)
        last = i == len(layers) - 1
        name = "output" if last else f"dense_{i}/out"
        tensors.append(_tensor(b, name, [1, layer.out_features], tflite.TensorType.INT8, 0, oq))
        op_io.append(([prev, w_idx, b_idx], [o_idx]))
        prev = o_idx

    operators = []
    for (ins, outs), layer in zip(op_io, layers, strict=True):
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, _ACTIVATION_CODES[layer.activation])
        opts = tflite.FullyConnectedOptionsEnd(b)
        iv = _int32_vector(b, ins)
        ov = _int32_vector(b, outs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, 0)
        tflite.OperatorAddInputs(b, iv)
        tflite.OperatorAddOutputs(b, ov)
        tflite.OperatorAddBuiltinOptionsType(b, tflite.BuiltinOptions.FullyConnectedOptions)
        tflite.OperatorAddBuiltinOptions(b, opts)
        operators.append(int(tflite.OperatorEnd(b)))

    tensors_vec = _table_vector(b, tensors)
    inputs_vec = _int32_vector(b, [0])
    outputs_vec = _int32_vector(b, [prev])
    ops_vec = _table_vector(b, operators)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs_vec)
    tflite.SubGraphAddOutputs(b, outputs_vec)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = int(tflite.SubGraphEnd(b))

    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(b, FULLY_CONNECTED_VERSION)
    opcode = int(tflite.OperatorCodeEnd(b))

    md_tables = []
    for name, buffer_index in metadata_buffers:
        md_name = b.CreateString(name)
        tflite.MetadataStart(b)
        tflite.MetadataAddName(b, md_name)
        tflite.MetadataAddBuffer(b, buffer_index)
        md_tables.append(int(tflite.MetadataEnd(b)))
    metadata_vec = _table_vector(b, md_tables)

    opcodes_vec = _table_vector(b, [opcode])
    subgraphs_vec = _table_vector(b, [subgraph])
    buffers_vec = _table_vector(b, buffer_tables)
    desc = b.CreateString("edgeline int8 dense detector")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_vec)
    tflite.ModelAddMetadata(b, metadata_vec)
    root = tflite.ModelEnd(b)
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def write_tflite_file(
    path: str, model: QuantizedModel, manifest: Manifest | Mapping[str, Any] | None = None
) -> str:
    """Write the model to `path`; return its sha256 (hex)."""
    import hashlib

    data = write_tflite(model, manifest)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


# --- reading the manifest back --------------------------------------------------------


def read_manifest(tflite_bytes: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON manifest embedded by `write_tflite`, as a dict.

    :raises ManifestError: if the file has no ``edgeline.manifest`` metadata entry or its
        content is not valid JSON (a model from another tool, or a corrupted file).
    """
    data = bytes(tflite_bytes)
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise ManifestError("not a .tflite flatbuffer (file identifier 'TFL3' missing)")
    try:
        m = tflite.Model.GetRootAsModel(data, 0)
        for i in range(m.MetadataLength()):
            md = m.Metadata(i)
            if md is None or md.Name() != MANIFEST_NAME.encode():
                continue
            buf = m.Buffers(md.Buffer())
            if buf is None or buf.DataLength() == 0:
                raise ManifestError(f"metadata {MANIFEST_NAME!r} points at an empty buffer {md.Buffer()}")
            raw = buf.DataAsNumpy().tobytes()
            result = json.loads(raw.decode("utf-8"))
            if not isinstance(result, dict):
                raise ManifestError(f"metadata {MANIFEST_NAME!r} is not a JSON object")
            return result
    except ManifestError:
        raise
    except (IndexError, ValueError, TypeError, UnicodeDecodeError) as e:  # flatbuffers/json on bad bytes
        raise ManifestError(f"cannot read the manifest: {e}") from e
    raise ManifestError(f"model has no {MANIFEST_NAME!r} metadata entry (not written by edgeline?)")
