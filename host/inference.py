"""Gateway inference: one small interface over LiteRT and tflite-runtime.

Host code. The gateway scores batches of int8 feature rows with the same ``.tflite`` file
the nodes run. `load_backend` picks an implementation:

- ``"litert"`` (default): ``ai-edge-litert``, the maintained successor of tflite-runtime
  (numpy 2). Its int8 FULLY_CONNECTED rounds once (TFLITE_SINGLE_ROUNDING), so outputs
  can differ from tflite-micro and the node by 1 LSB on a fraction of a percent of values.
- ``"tflite-runtime"``: the older ``tflite-runtime`` wheel (needs numpy<2, has 32-bit ARM
  wheels), imported only when asked for or when LiteRT is missing.

Each call to `InferenceBackend.invoke_batch` resizes the input to the batch size when
it changes and invokes the interpreter once for the whole batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

BACKENDS = ("litert", "tflite-runtime")


class BackendUnavailable(ImportError):
    """No interpreter package for the requested backend is installed."""


@runtime_checkable
class InferenceBackend(Protocol):
    """Batched int8 inference on one model."""

    name: str
    in_features: int
    out_features: int
    input_quant: tuple[float, int]  # (scale, zero point)
    output_quant: tuple[float, int]

    def invoke_batch(self, x_int8: np.ndarray) -> np.ndarray:
        """int8[N, in] -> int8[N, out] (a fresh array the caller owns)."""
        ...


def _import_litert() -> Callable[..., Any]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise BackendUnavailable("LiteRT is not installed: pip install ai-edge-litert") from e
    return Interpreter


def _import_tflite_runtime() -> Callable[..., Any]:
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError as e:
        raise BackendUnavailable(
            "tflite-runtime is not installed: pip install tflite-runtime (needs numpy<2), "
            "or use the default backend, prefer='litert'"
        ) from e
    return Interpreter


_IMPORTERS: dict[str, Callable[[], Callable[..., Any]]] = {
    "litert": _import_litert,
    "tflite-runtime": _import_tflite_runtime,
}


class TFLiteInterpreterBackend:
    """An `InferenceBackend` over any interpreter with the tf.lite.Interpreter API
    (LiteRT's and tflite-runtime's share it).

    `invoke_batch` may be called from several threads: a lock serializes the calls (the
    interpreter's tensors are shared state).
    """

    def __init__(
        self, interpreter_cls: Callable[..., Any], model: bytes, name: str, num_threads: int = 1
    ) -> None:
        self.name = name
        self._interp = interpreter_cls(model_content=model, num_threads=num_threads)
        self._interp.allocate_tensors()
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; expected 1 and 1"
            )
        self._in = inputs[0]
        self._out = outputs[0]
        for role, d in (("input", self._in), ("output", self._out)):
            if d["dtype"] != np.int8:
                raise ValueError(f"the model's {role} is {np.dtype(d['dtype']).name}; expected int8")
        self.in_features = int(self._in["shape"][-1])
        self.out_features = int(self._out["shape"][-1])
        self.input_quant = (float(self._in["quantization"][0]), int(self._in["quantization"][1]))
        self.output_quant = (float(self._out["quantization"][0]), int(self._out["quantization"][1]))
        self._batch = int(self._in["shape"][0]) if len(self._in["shape"]) == 2 else -1
        self._lock = threading.Lock()

    def invoke_batch(self, x_int8: np.ndarray) -> np.ndarray:
        """int8[N, in] -> int8[N, out].

        :raises ValueError: for a wrong dtype or shape (N may be anything >= 1).
        """
        x = np.asarray(x_int8)
        if x.dtype != np.int8:
            raise ValueError(f"invoke_batch takes int8 rows, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.in_features or x.shape[0] < 1:
            raise ValueError(
                f"invoke_batch takes int8[N, {self.in_features}] with N >= 1, got shape {x.shape}"
            )
        n = x.shape[0]
        with self._lock:
            if n != self._batch:
                self._interp.resize_tensor_input(self._in["index"], [n, self.in_features])
                self._interp.allocate_tensors()
                self._batch = n
            self._interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
            self._interp.invoke()
            return np.array(self._interp.get_tensor(self._out["index"]), copy=True)


def _read_model(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview) -> bytes:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes)
    return Path(path_or_bytes).read_bytes()


def load_backend(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    prefer: str = "litert",
    num_threads: int = 1,
) -> InferenceBackend:
    """Load a ``.tflite`` model into the preferred backend, falling back to the other one
    if the preferred package is not installed. The returned backend's ``name`` says which.

    :raises ValueError: for an unknown `prefer`, or a model that is not a single int8
        input/output graph.
    :raises BackendUnavailable: when neither ai-edge-litert nor tflite-runtime is installed.
    """
    if prefer not in BACKENDS:
        raise ValueError(f"unknown backend {prefer!r}; choose one of {', '.join(BACKENDS)}")
    model = _read_model(path_or_bytes)
    order = [prefer] + [b for b in BACKENDS if b != prefer]
    errors = []
    for name in order:
        try:
            cls = _IMPORTERS[name]()
        except BackendUnavailable as e:
            errors.append(str(e))
            continue
        return TFLiteInterpreterBackend(cls, model, name, num_threads=num_threads)
    raise BackendUnavailable("no inference backend is installed: " + "; ".join(errors))
