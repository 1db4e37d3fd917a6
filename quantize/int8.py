"""Post-training int8 quantization of a dense-layer chain, the way TFLite quantizes it.

Host code. A detector (see `quantize/detectors.py`) is a chain of dense layers, each
``(W: float32[out, in], b: float32[out], activation)`` with activation ``"none"`` or
``"relu"`` (``"relu6"`` is also accepted), applied to a standardized input vector.
This module turns such a chain into a `QuantizedModel`:

- weights: symmetric int8 per output channel (zero point 0, values in [-127, 127],
  ``scale[c] = max|W[c, :]| / 127``);
- activations (the input and every layer's output): asymmetric per-tensor int8, calibrated
  on representative data from the float model's min/max, the range always including 0
  (TFLite's ``GetAsymmetricQuantizationParams`` nudging);
- biases: int32 with ``scale[c] = input_scale * weight_scale[c]``;
- requantization: the effective scale ``input_scale * weight_scale[c] / output_scale``
  computed in double from the float32 scales, then TFLite's ``QuantizeMultiplier``
  (a Q31 significand and a power-of-two shift).

`tflite_writer.write_tflite` turns a `QuantizedModel` into a ``.tflite`` file;
`int8_reference` runs it in numpy with either rounding mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INT8_MIN = -128
INT8_MAX = 127
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

ACTIVATIONS = ("none", "relu", "relu6")


class QuantizationError(ValueError):
    """The float model or the calibration data cannot be quantized as asked."""


def round_half_away(x: Any) -> Any:
    """C's ``round``/``TfLiteRound``: halves away from zero (numpy's ``round`` goes to even)."""
    a = np.asarray(x, dtype=np.float64)
    return np.sign(a) * np.floor(np.abs(a) + 0.5)


def f32(x: float) -> float:
    """`x` rounded to the nearest float32, as a Python float."""
    return float(np.float32(x))


# --- TFLite's multiplier and range arithmetic ------------------------------------------


def quantize_multiplier(real: float, rounding: str = "double") -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: `real` ~= significand * 2**(shift - 31).

    Returns ``(significand, shift)`` with the significand in [2**30, 2**31) (or 0), as
    tflite-micro computes it. ``rounding="single"`` adds the saturation LiteRT's
    TFLITE_SINGLE_ROUNDING build applies (shift capped at 30).

    :raises ValueError: for a negative or non-finite multiplier.
    """
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"multiplier must be finite and >= 0, got {real!r}")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = math.floor(q * (1 << 31) + 0.5)  # exact: q * 2**31 < 2**31 has <= 53 bits
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    if rounding == "single" and shift > 30:
        shift, q_fixed = 30, (1 << 31) - 1
    return q_fixed, shift


def effective_scales(input_scale: float, weight_scales: Sequence[float], output_scale: float) -> list[float]:
    """Per-channel real multipliers exactly as tflite-micro and LiteRT compute them.

    With more than one weight scale (per-channel) each is ``double(in) * double(w[c]) /
    double(out)``; with a single scale (per-tensor, e.g. a one-unit layer) the kernels take
    ``GetQuantizedConvolutionMultipler``, which forms the product in float32 first.
    """
    si, so = f32(input_scale), f32(output_scale)
    if len(weight_scales) == 1:
        return [float(np.float32(si) * np.float32(f32(weight_scales[0]))) / so]
    return [si * f32(w) / so for w in weight_scales]


def activation_range(activation: str, output_scale: float, output_zero_point: int) -> tuple[int, int]:
    """TFLite's ``CalculateActivationRangeQuantized`` for an int8 output."""
    scale = np.float32(output_scale)

    def quantize(f: float) -> int:
        # f / scale in float32, then roundf (halves away from zero)
        return output_zero_point + int(round_half_away(np.float32(f) / scale))

    if activation == "none":
        return INT8_MIN, INT8_MAX
    if activation == "relu":
        return max(INT8_MIN, quantize(0.0)), INT8_MAX
    if activation == "relu6":
        return max(INT8_MIN, quantize(0.0)), min(INT8_MAX, quantize(6.0))
    raise QuantizationError(f"unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")


def asymmetric_params(rmin: float, rmax: float) -> tuple[float, int]:
    """int8 (scale, zero_point) for a real range, TFLite's ``GetAsymmetricQuantizationParams``.

    The range is first widened to include 0, so that 0.0 (ReLU's floor, zero padding) is
    exactly representable. The scale is returned as a float32 value.
    """
    rmin = min(float(rmin), 0.0)
    rmax = max(float(rmax), 0.0)
    if not (math.isfinite(rmin) and math.isfinite(rmax)):
        raise QuantizationError(f"calibration range is not finite: [{rmin}, {rmax}]")
    if rmax == rmin:  # all zeros: any scale represents it; 1.0 keeps the arithmetic tame
        return 1.0, 0
    qmin, qmax = float(INT8_MIN), float(INT8_MAX)
    scale = f32((rmax - rmin) / (qmax - qmin))
    zp_from_min = qmin - rmin / scale
    zp_from_max = qmax - rmax / scale
    err_min = abs(qmin) + abs(rmin / scale)
    err_max = abs(qmax) + abs(rmax / scale)
    zp_real = zp_from_min if err_min < err_max else zp_from_max
    if zp_real <= qmin:
        zp = INT8_MIN
    elif zp_real >= qmax:
        zp = INT8_MAX
    else:
        zp = int(round_half_away(zp_real))
    return scale, zp


# --- the model ----------------------------------------------------------------------


@dataclass(frozen=True)
class FloatLayer:
    """One dense layer of the float model: ``y = act(W @ x + b)``."""

    weight: np.ndarray  # float32[out, in]
    bias: np.ndarray  # float32[out]
    activation: str = "none"

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float32)
        b = np.asarray(self.bias, dtype=np.float32)
        if w.ndim != 2:
            raise QuantizationError(f"layer weight must be 2-D [out, in], got shape {w.shape}")
        if b.shape != (w.shape[0],):
            raise QuantizationError(f"layer bias must have shape ({w.shape[0]},), got {b.shape}")
        if self.activation not in ACTIVATIONS:
            raise QuantizationError(
                f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise QuantizationError("layer weights and biases must be finite")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T + self.bias
        if self.activation == "relu":
            y = np.maximum(y, 0.0)
        elif self.activation == "relu6":
            y = np.clip(y, 0.0, 6.0)
        return y.astype(np.float32)


def as_float_layers(layers: Iterable[Any]) -> list[FloatLayer]:
    """Accept ``(W, b, activation)`` tuples, `FloatLayer`s, or objects with ``W``/``weight``,
    ``b``/``bias`` and ``activation`` attributes; check that consecutive shapes chain.

    :raises QuantizationError: for an empty chain or mismatched shapes.
    """
    out: list[FloatLayer] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, FloatLayer):
            fl = layer
        elif isinstance(layer, tuple | list):
            if len(layer) != 3:
                raise QuantizationError(f"layer {i}: expected (W, b, activation), got {len(layer)} items")
            fl = FloatLayer(layer[0], layer[1], layer[2])
        else:
            w = getattr(layer, "W", None)
            if w is None:
                w = layer.weight
            b = getattr(layer, "b", None)
            if b is None:
                b = layer.bias
            fl = FloatLayer(w, b, getattr(layer, "activation", "none"))
        if out and fl.weight.shape[1] != out[-1].weight.shape[0]:
            raise QuantizationError(
                f"layer {i} takes {fl.weight.shape[1]} inputs but layer {i - 1} gives "
                f"{out[-1].weight.shape[0]} outputs"
            )
        out.append(fl)
    if not out:
        raise QuantizationError("a detector needs at least one dense layer")
    return out


def float_forward(layers: Sequence[FloatLayer], x: np.ndarray) -> list[np.ndarray]:
    """Every intermediate of the float chain: ``[x, y0, y1, ...]``."""
    acts = [np.asarray(x, dtype=np.float32)]
    for layer in layers:
        acts.append(layer(acts[-1]))
    return acts


@dataclass(frozen=True)
class QuantizedLayer:
    """One int8 FULLY_CONNECTED op with everything the kernels need."""

    weight: np.ndarray  # int8[out, in], symmetric
    weight_scale: np.ndarray  # float32[out] (length 1 when the layer has one unit)
    bias: np.ndarray  # int32[out]
    activation: str
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def bias_scale(self) -> np.ndarray:
        """float32[out]: input_scale * weight_scale[c], as written into the bias tensor."""
        return (np.float32(self.input_scale) * self.weight_scale).astype(np.float32)

    def multipliers(self, rounding: str = "double") -> tuple[np.ndarray, np.ndarray]:
        """Per-output-channel ``(significand int64[out], shift int64[out])``."""
        reals = effective_scales(self.input_scale, [float(s) for s in self.weight_scale], self.output_scale)
        pairs = [quantize_multiplier(r, rounding) for r in reals]
        if len(pairs) == 1 and self.out_features > 1:
            pairs = pairs * self.out_features
        sig = np.array([p[0] for p in pairs], dtype=np.int64)
        shift = np.array([p[1] for p in pairs], dtype=np.int64)
        return sig, shift

    def activation_range(self) -> tuple[int, int]:
        return activation_range(self.activation, self.output_scale, self.output_zero_point)


@dataclass(frozen=True)
class QuantizedModel:
    """An int8 dense chain: what `tflite_writer.write_tflite` serializes."""

    layers: tuple[QuantizedLayer, ...]

    @property
    def input_scale(self) -> float:
        return self.layers[0].input_scale

    @property
    def input_zero_point(self) -> int:
        return self.layers[0].input_zero_point

    @property
    def output_scale(self) -> float:
        return self.layers[-1].output_scale

    @property
    def output_zero_point(self) -> int:
        return self.layers[-1].output_zero_point

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """float[..., in] -> int8, as TFLite's QUANTIZE op would (round half away, clamp)."""
        q = round_half_away(np.asarray(x, dtype=np.float32) / np.float32(self.input_scale))
        return np.clip(q + self.input_zero_point, INT8_MIN, INT8_MAX).astype(np.int8)

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        """int8[..., out] -> float32."""
        return (
            (np.asarray(q, dtype=np.int32) - self.output_zero_point).astype(np.float32)
            * np.float32(self.output_scale)
        ).astype(np.float32)


def _min_weight_scales(bias: np.ndarray, input_scale: float, in_features: int) -> np.ndarray:
    """Smallest weight scale per channel that keeps the int32 accumulator from overflowing.

    The bias is quantized with scale input_scale * weight_scale[c]; a large bias over tiny
    weights would saturate int32 (or leave no headroom for the dot product, which adds up to
    256 * 127 * in, the bound the node checks at load). Raise the weight scale until the
    bias needs at most half the remaining int32 range.
    """
    headroom = INT32_MAX - 256 * INT8_MAX * in_features
    if headroom <= 0:
        raise QuantizationError(f"a layer with {in_features} inputs can overflow an int32 accumulator")
    return (np.abs(np.asarray(bias, dtype=np.float64)) / (float(input_scale) * headroom * 0.5)).astype(
        np.float32
    )


def quantize_weights(
    weight: np.ndarray, min_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``(q int8[out, in], scale float32[out])``.

    A channel whose weights are all zero gets scale 1.0 (any scale represents it exactly);
    `min_scale` (per channel) is a floor on the scale, see `_min_weight_scales`.
    """
    w = np.asarray(weight, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float32))
    q = round_half_away(w / scale[:, None])
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def quantize_bias(bias: np.ndarray, bias_scale: np.ndarray) -> np.ndarray:
    """int32 bias with the given per-channel scale (saturated to the int32 range)."""
    q = round_half_away(np.asarray(bias, dtype=np.float64) / np.asarray(bias_scale, dtype=np.float64))
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int32)


def quantize_chain(layers: Iterable[Any], calibration: np.ndarray) -> QuantizedModel:
    """Post-training int8 quantization of a dense chain, calibrated on representative inputs.

    :param layers: the float chain (see `as_float_layers` for the accepted forms).
    :param calibration: float[N, in] standardized inputs, representative of what the model
        will see (a few hundred rows is plenty for a dense chain).
    :raises QuantizationError: for a bad chain or calibration data.
    """
    chain = as_float_layers(layers)
    x = np.asarray(calibration, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != chain[0].weight.shape[1] or x.shape[0] == 0:
        raise QuantizationError(
            f"calibration data must be float[N, {chain[0].weight.shape[1]}] with N >= 1, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise QuantizationError("calibration data contains NaN or infinity")
    acts = float_forward(chain, x)
    params = [asymmetric_params(float(a.min()), float(a.max())) for a in acts]

    qlayers = []
    for i, layer in enumerate(chain):
        in_scale, in_zp = params[i]
        out_scale, out_zp = params[i + 1]
        wq, wscale = quantize_weights(
            layer.weight, _min_weight_scales(layer.bias, in_scale, layer.weight.shape[1])
        )
        if wq.shape[0] == 1:
            # One output unit: TFLite treats a single scale as per-tensor.
            wscale = wscale[:1]
        bias_scale = (np.float32(in_scale) * wscale).astype(np.float32)
        bq = quantize_bias(layer.bias, np.broadcast_to(bias_scale, layer.bias.shape))
        qlayers.append(
            QuantizedLayer(
                weight=wq,
                weight_scale=wscale,
                bias=bq,
                activation=layer.activation,
                input_scale=in_scale,
                input_zero_point=in_zp,
                output_scale=out_scale,
                output_zero_point=out_zp,
            )
        )
    return QuantizedModel(tuple(qlayers))
