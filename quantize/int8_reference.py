"""A numpy reference of int8 FULLY_CONNECTED (fused NONE/RELU/RELU6), both rounding modes.

Host code. Two runtimes round the requantization step differently:

- ``"double"``: tflite-micro (and gemmlowp): ``SaturatingRoundingDoublingHighMul`` (round
  half away from zero on the Q31 product) then ``RoundingDivideByPOT`` (round half away
  from zero again). The node interpreter is bit-exact with this mode.
- ``"single"``: LiteRT's wheel, built with ``TFLITE_SINGLE_ROUNDING``: one rounding,
  ``(acc * m + 2**(30 - shift)) >> (31 - shift)`` (halves toward +infinity).

They disagree by one LSB on a fraction of a percent of values (see docs/model-format.md).
Everything is computed in int64 numpy, so the arithmetic is exact.
"""

from __future__ import annotations

import numpy as np

from .int8 import INT8_MAX, INT8_MIN, QuantizedLayer, QuantizedModel

ROUNDINGS = ("double", "single")


def _wrap_int32(x: np.ndarray) -> np.ndarray:
    """C int32 wrap-around (what ``x * (1 << left_shift)`` does on overflow in practice)."""
    return ((x + 2**31) % 2**32) - 2**31


def _trunc_div_pow2(x: np.ndarray, bits: int) -> np.ndarray:
    """C integer division by 2**bits (truncation toward zero)."""
    return np.where(x >= 0, x >> bits, -((-x) >> bits))


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b  # |a|, |b| <= 2**31: fits int64
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    hi = _trunc_div_pow2(ab + nudge, 31)
    overflow = (a == b) & (a == -(2**31))
    return np.where(overflow, np.int64(2**31 - 1), hi)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's ``RoundingDivideByPOT``: x / 2**exponent, halves away from zero."""
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(
    acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, rounding: str = "double"
) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier`` (int32 in, int32 out, held in int64).

    :raises ValueError: for an unknown rounding mode.
    """
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if rounding == "double":
        left = np.maximum(s, 0)
        right = np.maximum(-s, 0)
        return rounding_divide_by_pot(
            saturating_rounding_doubling_high_mul(_wrap_int32(acc << left), m), right
        )
    if rounding == "single":
        total = 31 - s  # 1..62
        rnd = np.int64(1) << (total - 1)
        return (acc * m + rnd) >> total
    raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}")


def accumulate(x_q: np.ndarray, layer: QuantizedLayer) -> np.ndarray:
    """int32 accumulators ``sum((x - in_zp) * w) + bias`` for int8[N, in] -> int64[N, out]."""
    x = np.asarray(x_q, dtype=np.int64) - layer.input_zero_point
    return x @ layer.weight.astype(np.int64).T + layer.bias.astype(np.int64)


def fully_connected(x_q: np.ndarray, layer: QuantizedLayer, rounding: str = "double") -> np.ndarray:
    """One int8 FULLY_CONNECTED op with its fused activation: int8[N, in] -> int8[N, out]."""
    x_q = np.asarray(x_q)
    if x_q.ndim != 2 or x_q.shape[1] != layer.in_features:
        raise ValueError(f"input must be int8[N, {layer.in_features}], got shape {x_q.shape}")
    mult, shift = layer.multipliers(rounding)
    scaled = multiply_by_quantized_multiplier(accumulate(x_q, layer), mult, shift, rounding)
    lo, hi = layer.activation_range()
    out = np.clip(scaled + layer.output_zero_point, max(lo, INT8_MIN), min(hi, INT8_MAX))
    return out.astype(np.int8)


def run(model: QuantizedModel, x_q: np.ndarray, rounding: str = "double") -> np.ndarray:
    """The whole chain: int8[N, in] -> int8[N, out]."""
    y = np.asarray(x_q, dtype=np.int8)
    for layer in model.layers:
        y = fully_connected(y, layer, rounding)
    return y
