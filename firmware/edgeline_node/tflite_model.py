# Device code. The node's interpreter for int8 `.tflite` detectors.
#
# It runs the op subset edgeline's detectors use -- a chain of int8 FULLY_CONNECTED ops
# with fused NONE/RELU/RELU6, per-channel (or per-tensor) int8 weights and int32 biases --
# and refuses anything else at load, with a message naming the op, tensor or field.
# Its outputs are bit-exact with tflite-micro: requantization rounds twice, like gemmlowp
# (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT), and the per-channel
# multipliers are derived from the float32 scales with integer arithmetic that reproduces
# tflite-micro's double-precision QuantizeMultiplier exactly, even on ports whose floats
# are single precision. LiteRT's wheel rounds once and may differ by 1 LSB.
#
# The flatbuffer is read in place through a memoryview (weights are never copied) by a
# small bounded reader: every offset, vtable and vector is checked against the buffer
# length before it is read, so a truncated or corrupted file raises ModelError and
# nothing else. Activations live in arrays preallocated at load; `invoke_into` allocates
# nothing, `invoke` only its result.
#
# Kernels: a plain Python one everywhere, and on MicroPython a @micropython.viper one that
# runs a whole layer (int8 dot products and requantization) in native code. The viper
# kernel keeps every intermediate below 2**30 in magnitude (checked per layer at load), so
# its machine-word arithmetic is exact on 32-bit and 64-bit ports alike; a layer that
# fails that bound runs the exact arbitrary-precision path instead. mpy-cross must be
# given -march (xtensawin, armv6m, armv7emsp, x64, ...) to compile this file.
import struct
from array import array

from .compat import IS_MICROPYTHON, const

try:
    import json
except ImportError:  # pragma: no cover - every target port has json
    json = None


class ModelError(ValueError):
    """The model file is truncated or corrupt, or uses an op or type the node cannot run."""


# --- schema numbers (tensorflow/lite/schema/schema.fbs) ---------------------------------
_TYPE_INT32 = const(2)
_TYPE_INT8 = const(9)
_OP_FULLY_CONNECTED = const(9)
_OPTIONS_FULLY_CONNECTED = const(8)
_ACT_NONE = const(0)
_ACT_RELU = const(1)
_ACT_RELU6 = const(3)

# Table field slots, by declaration order in schema.fbs.
_MODEL_VERSION = const(0)
_MODEL_OPCODES = const(1)
_MODEL_SUBGRAPHS = const(2)
_MODEL_BUFFERS = const(4)
_MODEL_METADATA = const(6)
_SG_TENSORS = const(0)
_SG_INPUTS = const(1)
_SG_OUTPUTS = const(2)
_SG_OPERATORS = const(3)
_T_SHAPE = const(0)
_T_TYPE = const(1)
_T_BUFFER = const(2)
_T_NAME = const(3)
_T_QUANT = const(4)
_T_SPARSITY = const(6)
_Q_SCALE = const(2)
_Q_ZERO_POINT = const(3)
_Q_DETAILS_TYPE = const(4)
_Q_DIM = const(6)
_OP_OPCODE = const(0)
_OP_INPUTS = const(1)
_OP_OUTPUTS = const(2)
_OP_OPTIONS_TYPE = const(3)
_OP_OPTIONS = const(4)
_OP_OPTIONS2_TYPE = const(11)
_OC_DEPRECATED = const(0)
_OC_BUILTIN = const(3)
_BUF_DATA = const(0)
_BUF_OFFSET = const(1)
_MD_NAME = const(0)
_MD_BUFFER = const(1)
_FC_ACTIVATION = const(0)
_FC_WEIGHTS_FORMAT = const(1)
_FC_BIAS_TYPE = const(4)

# Bounds a node accepts: a model beyond them is refused rather than half-loaded.
_MAX_BUFFERS = const(512)
_MAX_TENSORS = const(512)
_MAX_OPS = const(64)
_MAX_OPCODES = const(64)
_MAX_METADATA = const(32)
_MAX_DIMS = const(8)
_MAX_NAME = const(256)

# Per-channel requantization record in a layer's parameter array (after a 3-word header
# holding output zero point, activation min, activation max).
_HDR = const(3)
_REC = const(7)  # bias', m0, m1, m2, left shift, right shift, rounding half
_FAST_LIMIT = const(0x10000000)  # 2**28: accumulator bound for the small-int path

# fmt: off
_TYPE_NAMES = (
    "FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "STRING", "BOOL", "INT16", "COMPLEX64",
    "INT8", "FLOAT64", "COMPLEX128", "UINT64", "RESOURCE", "VARIANT", "UINT32", "UINT16",
    "INT4", "BFLOAT16",
)
_OP_NAMES = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
    6: "DEQUANTIZE", 9: "FULLY_CONNECTED", 14: "LOGISTIC", 17: "MAX_POOL_2D", 18: "MUL",
    19: "RELU", 21: "RELU6", 22: "RESHAPE", 25: "SOFTMAX", 28: "TANH", 32: "CUSTOM", 34: "PAD",
    39: "TRANSPOSE", 40: "MEAN", 41: "SUB", 43: "SQUEEZE", 45: "STRIDED_SLICE",
    70: "EXPAND_DIMS", 74: "SUM", 92: "SQUARE", 98: "LEAKY_RELU", 99: "SQUARED_DIFFERENCE",
    114: "QUANTIZE", 117: "HARD_SWISH", 126: "BATCH_MATMUL",
}
_ACT_NAMES = ("NONE", "RELU", "RELU_N1_TO_1", "RELU6", "TANH", "SIGN_BIT")
# fmt: on


def _type_name(t):
    return _TYPE_NAMES[t] if 0 <= t < len(_TYPE_NAMES) else "TYPE_%d" % t


def _op_name(code):
    return _OP_NAMES.get(code, "BUILTIN_%d" % code)


# --- exact multiplier arithmetic (load time; long ints are fine here) -------------------


def _f32_parts(bits):
    """(significand, exponent) of a positive normal float32: value = sig * 2**exp, or None."""
    e = (bits >> 23) & 0xFF
    if bits >> 31 or e == 0 or e == 0xFF:
        return None  # negative, zero, subnormal, infinity or NaN
    return (bits & 0x7FFFFF) | 0x800000, e - 150


def _round_ratio(num, den, bits):
    """Round num/den (positive ints) to `bits` significant bits, to nearest, ties to even.

    Returns (q, k) with 2**(bits-1) <= q < 2**bits and num/den ~= q * 2**-k.
    """
    lo = 1 << (bits - 1)
    k = 0
    while num < den * lo:
        num <<= 1
        k += 1
    while num >= (den * lo) << 1:
        den <<= 1
        k -= 1
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q & 1):
        q += 1
        if q == lo << 1:
            q >>= 1
            k -= 1
    return q, k


def _quantize_multiplier(in_bits, w_bits, out_bits, per_channel):
    """tflite-micro's multiplier and shift for one channel, from float32 scale bits.

    Per-channel: QuantizeMultiplier(double(in) * double(w) / double(out)). Per-tensor
    (a single weight scale): the product is first rounded to float32, as
    GetQuantizedConvolutionMultipler does. double() products of float32s are exact; the
    division is rounded to 53 bits like an IEEE double; the Q31 significand is rounded half
    away from zero like TfLiteRound.
    """
    mi, ei = _f32_parts(in_bits)
    mw, ew = _f32_parts(w_bits)
    mo, eo = _f32_parts(out_bits)
    num = mi * mw
    exp = ei + ew - eo
    if not per_channel:
        num, k = _round_ratio(num, 1, 24)
        exp -= k
    q53, k = _round_ratio(num, mo, 53)
    shift = exp - k + 53  # frexp exponent: value = (q53 / 2**53) * 2**shift
    q_fixed = (q53 + (1 << 21)) >> 22
    if q_fixed == 1 << 31:
        q_fixed >>= 1
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def _quantize_f32(value_num, out_bits, zero_point):
    """zero_point + roundf(float32(value / scale)) for a small positive integer value."""
    mo, eo = _f32_parts(out_bits)
    q24, k = _round_ratio(value_num, mo, 24)
    s = -eo - k  # value/scale ~= q24 * 2**s, a float32
    if s >= 0:
        return zero_point + min(q24 << min(s, 40), 1 << 40)
    if -s > 60:
        return zero_point
    return zero_point + ((q24 + (1 << (-s - 1))) >> -s)


# --- requantization, plain Python -------------------------------------------------------


def _requant_exact(acc, mult, shift):
    """MultiplyByQuantizedMultiplier, double rounding, any magnitude (the slow, exact path)."""
    if shift > 0:
        acc = (((acc << shift) + 0x80000000) & 0xFFFFFFFF) - 0x80000000  # C int32 wrap
    ab = acc * mult
    if ab >= 0:
        r = (ab + 0x40000000) >> 31
    else:
        r = -((-ab + 0x3FFFFFFF) >> 31)
    rs = -shift if shift < 0 else 0
    if rs:
        mask = (1 << rs) - 1
        threshold = (mask >> 1) + (1 if r < 0 else 0)
        r = (r >> rs) + (1 if (r & mask) > threshold else 0)
    return r


def _requant_small(acc, m0, m1, m2, ls, rs, half):
    """The same result as _requant_exact, with every intermediate below 2**30 when
    |acc << ls| < 2**28 (the multiplier in 14-bit limbs m0, m1, m2). Mirrors the viper code.
    """
    acc = acc << ls
    neg = 0
    if acc < 0:
        neg = 1
        acc = -acc
    a0 = acc & 0x3FFF
    a1 = acc >> 14
    t = a0 * m0 + neg * 0x3FFF
    t = (t >> 14) + a0 * m1 + a1 * m0 + neg * 0x3FFF
    t = (t >> 14) + a0 * m2 + a1 * m1 + 4 - neg
    v = (t >> 3) + ((a1 * m2) << 11)
    if rs:
        v = (v + half) >> rs
    return -v if neg else v


# --- the bounded flatbuffer reader ---------------------------------------------------------


class _Reader:
    def __init__(self, buf):
        self.b = buf
        self.n = len(buf)

    def need(self, pos, size, what):
        if pos < 0 or size < 0 or pos + size > self.n:
            raise ModelError(
                "truncated or corrupt model: %s at byte %d (+%d) lies outside the %d-byte file"
                % (what, pos, size, self.n)
            )

    def u8(self, pos, what):
        self.need(pos, 1, what)
        return self.b[pos]

    def u16(self, pos, what):
        self.need(pos, 2, what)
        b = self.b
        return b[pos] | (b[pos + 1] << 8)

    def u32(self, pos, what):
        self.need(pos, 4, what)
        b = self.b
        return b[pos] | (b[pos + 1] << 8) | (b[pos + 2] << 16) | (b[pos + 3] << 24)

    def i32(self, pos, what):
        v = self.u32(pos, what)
        return v - 0x100000000 if v & 0x80000000 else v

    def i64(self, pos, what):
        lo = self.u32(pos, what)
        hi = self.i32(pos + 4, what)
        return (hi << 32) | lo

    def table(self, pos, what):
        """Validate the table at `pos` and its vtable; return (pos, vtable, vt_len, t_len)."""
        vt = pos - self.i32(pos, what)
        vt_len = self.u16(vt, what + " vtable")
        t_len = self.u16(vt + 2, what + " vtable")
        if vt_len < 4 or vt_len & 1 or t_len < 4:
            raise ModelError("corrupt model: %s has a malformed vtable at byte %d" % (what, vt))
        self.need(vt, vt_len, what + " vtable")
        self.need(pos, t_len, what)
        return (pos, vt, vt_len, t_len)

    def field(self, t, slot, size, what):
        """Absolute position of field `slot` (size bytes) in table t, or -1 when absent."""
        pos, vt, vt_len, t_len = t
        at = 4 + 2 * slot
        if at + 2 > vt_len:
            return -1
        off = self.u16(vt + at, what)
        if off == 0:
            return -1
        if off < 4 or off + size > t_len:
            raise ModelError("corrupt model: field %d of %s lies outside its table" % (slot, what))
        return pos + off

    def scalar(self, t, slot, size, signed, default, what):
        p = self.field(t, slot, size, what)
        if p < 0:
            return default
        if size == 1:
            v = self.b[p]
            return v - 256 if signed and v > 127 else v
        if size == 4:
            return self.i32(p, what) if signed else self.u32(p, what)
        if size == 8:
            return self.i64(p, what)
        return self.u16(p, what)

    def ref(self, t, slot, what):
        """Target of an offset field (table, vector or string), or -1 when absent."""
        p = self.field(t, slot, 4, what)
        if p < 0:
            return -1
        return p + self.u32(p, what)

    def vector(self, pos, elem, limit, what):
        """(first element position, count) of the vector at pos, checked to fit the file."""
        n = self.u32(pos, what)
        if n > limit:
            raise ModelError("%s has %d entries; the node accepts at most %d" % (what, n, limit))
        self.need(pos + 4, n * elem, what)
        return pos + 4, n

    def opt_vector(self, t, slot, elem, limit, what):
        p = self.ref(t, slot, what)
        if p < 0:
            return 0, 0
        return self.vector(p, elem, limit, what)

    def table_at(self, start, i, what):
        p = start + 4 * i
        return self.table(p + self.u32(p, what), what)

    def int32s(self, start, n, what):
        return [self.i32(start + 4 * i, what) for i in range(n)]

    def string(self, pos, what):
        start, n = self.vector(pos, 1, _MAX_NAME, what)
        try:
            return bytes(self.b[start : start + n]).decode()
        except UnicodeError:
            return repr(bytes(self.b[start : start + n]))


# --- kernels --------------------------------------------------------------------------------


def _layer_python(w, woff, n, m, p, fast, x, y):
    """One FULLY_CONNECTED layer in plain Python: x array('b')[n] -> y array('b')[m]."""
    zp = p[0]
    lo = p[1]
    hi = p[2]
    q = _HDR
    base = woff
    for c in range(m):
        acc = p[q]
        for i in range(n):
            acc += x[i] * ((w[base + i] ^ 0x80) - 0x80)
        base += n
        if fast:
            # _requant_small, inlined (a call per output costs more than the arithmetic)
            acc = acc << p[q + 4]
            neg = 0
            if acc < 0:
                neg = 1
                acc = -acc
            m0 = p[q + 1]
            m1 = p[q + 2]
            m2 = p[q + 3]
            a0 = acc & 0x3FFF
            a1 = acc >> 14
            t = a0 * m0 + neg * 0x3FFF
            t = (t >> 14) + a0 * m1 + a1 * m0 + neg * 0x3FFF
            t = (t >> 14) + a0 * m2 + a1 * m1 + 4 - neg
            v = (t >> 3) + ((a1 * m2) << 11)
            rs = p[q + 5]
            if rs:
                v = (v + p[q + 6]) >> rs
            if neg:
                v = -v
        else:
            mult = p[q + 1] | (p[q + 2] << 14) | (p[q + 3] << 28)
            v = _requant_exact(acc, mult, p[q + 4] - p[q + 5])
        v += zp
        if v < lo:
            v = lo
        elif v > hi:
            v = hi
        y[c] = v
        q += _REC


_layer_viper = None
if IS_MICROPYTHON:
    try:
        import micropython

        @micropython.viper
        def _layer_viper(x: ptr8, w: ptr8, woff: int, n: int, m: int, p: ptr32, y: ptr8):
            # The same arithmetic as the fast path of _layer_python, on machine words. ptr8
            # loads are unsigned (sign-extended by hand); ptr32 loads are sign-extended by
            # hand too, since on 64-bit ports they come back zero-extended.
            s31 = 1
            s31 = s31 << 31  # at run time: a folded 1 << 31 would be a long-int object on 32-bit
            zp = (int(p[0]) ^ s31) - s31
            lo = (int(p[1]) ^ s31) - s31
            hi = (int(p[2]) ^ s31) - s31
            q = 3
            base = woff
            c = 0
            while c < m:
                acc = (int(p[q]) ^ s31) - s31
                i = 0
                while i < n:
                    acc += ((int(x[i]) ^ 0x80) - 0x80) * ((int(w[base + i]) ^ 0x80) - 0x80)
                    i += 1
                base += n
                acc = acc << int(p[q + 4])
                neg = 0
                if acc < 0:
                    neg = 1
                    acc = 0 - acc
                m0 = int(p[q + 1])
                m1 = int(p[q + 2])
                m2 = int(p[q + 3])
                a0 = acc & 0x3FFF
                a1 = acc >> 14
                t = a0 * m0 + neg * 0x3FFF
                t = (t >> 14) + a0 * m1 + a1 * m0 + neg * 0x3FFF
                t = (t >> 14) + a0 * m2 + a1 * m1 + 4 - neg
                v = (t >> 3) + ((a1 * m2) << 11)
                rs = int(p[q + 5])
                if rs:
                    v = (v + int(p[q + 6])) >> rs
                if neg:
                    v = 0 - v
                v += zp
                if v < lo:
                    v = lo
                elif v > hi:
                    v = hi
                y[c] = v
                q += 7
                c += 1

    except (ImportError, AttributeError):  # pragma: no cover - a port without viper
        _layer_viper = None

KERNELS = ("viper", "python") if _layer_viper is not None else ("python",)


# --- the model -------------------------------------------------------------------------------


class Model:
    """An int8 dense-chain model, loaded from .tflite bytes (bytes, bytearray or memoryview).

    ``kernel`` is "auto" (viper where available), "viper" or "python".
    """

    def __init__(self, buf, kernel="auto"):
        if kernel == "auto":
            kernel = KERNELS[0]
        if kernel not in KERNELS:
            raise ValueError("kernel %r is not available here; available: %s" % (kernel, ", ".join(KERNELS)))
        self.kernel = kernel
        self._viper = kernel == "viper"
        try:
            mv = memoryview(buf)
        except TypeError:
            raise ModelError("a model must be bytes, bytearray or memoryview, got %s" % type(buf).__name__)
        self._buf = mv
        self._metadata = {}
        self._layers = []
        self._parse(_Reader(mv))
        # The input copy: the caller's bytes land here, as signed values (array 'b').
        self._x = array("b", bytes(self._in_features))
        # Activation buffers: the input copy and each op's output.
        self.arena_bytes = self._in_features + sum(L[2] for L in self._layers)
        # Per-channel requantization records (bias, multiplier limbs, shifts).
        self.param_bytes = sum(4 * len(L[4]) for L in self._layers)
        if IS_MICROPYTHON:
            self._x_raw = memoryview(self._x)
        else:
            self._x_raw = memoryview(self._x).cast("B")

    # -- loading -------------------------------------------------------------------------

    def _parse(self, r):
        if r.n < 8:
            raise ModelError("model is %d bytes: too short to be a .tflite file" % r.n)
        ident = bytes(r.b[4:8])
        if ident != b"TFL3":
            raise ModelError("not a .tflite model: file identifier is %r, expected b'TFL3'" % ident)
        root = r.table(r.u32(0, "root offset"), "model")
        version = r.scalar(root, _MODEL_VERSION, 4, False, 0, "model")
        if version != 3:
            raise ModelError("model schema version is %d; the node reads version 3" % version)

        # Every buffer is checked, so truncation anywhere in the file is caught.
        bstart, nbuf = r.opt_vector(root, _MODEL_BUFFERS, 4, _MAX_BUFFERS, "model buffers")
        buffers = []
        for i in range(nbuf):
            what = "buffer %d" % i
            t = r.table_at(bstart, i, what)
            if r.scalar(t, _BUF_OFFSET, 8, False, 0, what) > 1:
                raise ModelError(
                    "%s keeps its data outside the flatbuffer (offset/size); the node needs it inline" % what
                )
            d = r.ref(t, _BUF_DATA, what)
            buffers.append(r.vector(d, 1, r.n, what + " data") if d >= 0 else (0, 0))

        mstart, nmd = r.opt_vector(root, _MODEL_METADATA, 4, _MAX_METADATA, "model metadata")
        for i in range(nmd):
            what = "metadata %d" % i
            t = r.table_at(mstart, i, what)
            name_pos = r.ref(t, _MD_NAME, what)
            name = r.string(name_pos, what + " name") if name_pos >= 0 else ""
            bi = r.scalar(t, _MD_BUFFER, 4, False, 0, what)
            if bi >= nbuf:
                raise ModelError("%s (%r) points at buffer %d of %d" % (what, name, bi, nbuf))
            self._metadata[name] = buffers[bi]

        ostart, nops_codes = r.opt_vector(root, _MODEL_OPCODES, 4, _MAX_OPCODES, "operator codes")
        codes = []
        for i in range(nops_codes):
            what = "operator code %d" % i
            t = r.table_at(ostart, i, what)
            dep = r.scalar(t, _OC_DEPRECATED, 1, True, 0, what)
            code = r.scalar(t, _OC_BUILTIN, 4, True, 0, what)
            codes.append(code if code > dep else dep)  # TFLite's GetBuiltinCode rule

        sstart, nsg = r.opt_vector(root, _MODEL_SUBGRAPHS, 4, 8, "subgraphs")
        if nsg != 1:
            raise ModelError("model has %d subgraphs; the node runs exactly one" % nsg)
        sg = r.table_at(sstart, 0, "subgraph 0")
        tstart, ntensors = r.opt_vector(sg, _SG_TENSORS, 4, _MAX_TENSORS, "tensors")
        istart, nin = r.opt_vector(sg, _SG_INPUTS, 4, 4, "subgraph inputs")
        oustart, nout = r.opt_vector(sg, _SG_OUTPUTS, 4, 4, "subgraph outputs")
        opstart, nops = r.opt_vector(sg, _SG_OPERATORS, 4, _MAX_OPS, "operators")
        if nin != 1 or nout != 1:
            raise ModelError("subgraph has %d inputs and %d outputs; the node runs 1 and 1" % (nin, nout))
        if nops == 0:
            raise ModelError("subgraph has no operators")

        # 1. Ops: only FULLY_CONNECTED, with an activation the node implements.
        ops = []
        for k in range(nops):
            what = "operator %d" % k
            t = r.table_at(opstart, k, what)
            oc = r.scalar(t, _OP_OPCODE, 4, False, 0, what)
            if oc >= len(codes):
                raise ModelError("%s uses operator code %d of %d" % (what, oc, len(codes)))
            code = codes[oc]
            if code != _OP_FULLY_CONNECTED:
                raise ModelError(
                    "unsupported op %s (builtin code %d) in operator %d; supported: FULLY_CONNECTED"
                    % (_op_name(code), code, k)
                )
            opt_type = r.scalar(t, _OP_OPTIONS_TYPE, 1, False, 0, what)
            act = _ACT_NONE
            if opt_type == _OPTIONS_FULLY_CONNECTED:
                ot = r.table(r.ref(t, _OP_OPTIONS, what), what + " options")
                act = r.scalar(ot, _FC_ACTIVATION, 1, True, 0, what + " options")
                wf = r.scalar(ot, _FC_WEIGHTS_FORMAT, 1, True, 0, what + " options")
                if wf != 0:
                    raise ModelError("%s uses shuffled weights (format %d); supported: DEFAULT" % (what, wf))
                bt = r.scalar(ot, _FC_BIAS_TYPE, 1, False, 0, what + " options")
                if bt not in (0, _TYPE_INT32):
                    raise ModelError("%s has %s bias; supported: INT32" % (what, _type_name(bt)))
            elif opt_type != 0:
                raise ModelError(
                    "%s carries options of kind %d, not FullyConnectedOptions" % (what, opt_type)
                )
            if r.scalar(t, _OP_OPTIONS2_TYPE, 1, False, 0, what):
                raise ModelError("%s carries builtin_options_2, which FULLY_CONNECTED never has" % what)
            if act not in (_ACT_NONE, _ACT_RELU, _ACT_RELU6):
                name = _ACT_NAMES[act] if 0 <= act < len(_ACT_NAMES) else "activation %d" % act
                raise ModelError(
                    "unsupported fused activation %s (code %d) in operator %d; supported: NONE, RELU, RELU6"
                    % (name, act, k)
                )
            ins_start, nins = r.opt_vector(t, _OP_INPUTS, 4, 3, what + " inputs")
            outs_start, nouts = r.opt_vector(t, _OP_OUTPUTS, 4, 1, what + " outputs")
            if nins < 2 or nouts != 1:
                raise ModelError(
                    "%s has %d inputs and %d outputs; FULLY_CONNECTED takes 2-3 and gives 1"
                    % (what, nins, nouts)
                )
            ins = r.int32s(ins_start, nins, what + " inputs")
            if nins == 2:
                ins.append(-1)
            out = r.i32(outs_start, what + " outputs")
            for ti in ins[:2] + [out]:
                if not 0 <= ti < ntensors:
                    raise ModelError("%s refers to tensor %d of %d" % (what, ti, ntensors))
            if not -1 <= ins[2] < ntensors:
                raise ModelError("%s refers to bias tensor %d of %d" % (what, ins[2], ntensors))
            ops.append((ins[0], ins[1], ins[2], out, act))

        # 2. Tensors: int8 everywhere, int32 for biases, no sparsity.
        tensors = []
        for i in range(ntensors):
            tensors.append(self._tensor(r, r.table_at(tstart, i, "tensor %d" % i), i, buffers))

        # 3. The ops must form a chain from the subgraph input to its output.
        sub_in = r.i32(istart, "subgraph inputs")
        sub_out = r.i32(oustart, "subgraph outputs")
        if not (0 <= sub_in < ntensors and 0 <= sub_out < ntensors):
            raise ModelError(
                "subgraph input %d / output %d is not one of its %d tensors" % (sub_in, sub_out, ntensors)
            )
        prev = sub_in
        for k in range(nops):
            xi, wi, bi, yi, act = ops[k]
            if xi != prev:
                raise ModelError(
                    "operator %d reads tensor %d, not the previous output %d: the node runs a chain "
                    "of FULLY_CONNECTED ops" % (k, xi, prev)
                )
            self._layers.append(self._layer(r, k, tensors, xi, wi, bi, yi, act))
            prev = yi
        if prev != sub_out:
            raise ModelError(
                "the last operator writes tensor %d but the subgraph output is %d" % (prev, sub_out)
            )
        self._in_features = tensors[sub_in][3]
        self._out_features = self._layers[-1][2]
        self.input_shape = tensors[sub_in][1]
        self.output_shape = tensors[sub_out][1]
        self.input_quant = self._activation_quant(r, tensors[sub_in], sub_in, "model input")[2:]
        self.output_quant = self._activation_quant(r, tensors[sub_out], sub_out, "model output")[2:]

    def _tensor(self, r, t, i, buffers):
        """(type, shape tuple, (data_start, data_len), element count, quant) of tensor i."""
        what = "tensor %d" % i
        ttype = r.scalar(t, _T_TYPE, 1, False, 0, what)
        if ttype != _TYPE_INT8 and ttype != _TYPE_INT32:
            name_pos = r.ref(t, _T_NAME, what)
            name = r.string(name_pos, what + " name") if name_pos >= 0 else ""
            raise ModelError(
                "unsupported tensor type %s (type %d) for tensor %d %r; supported: INT8 "
                "(activations, weights), INT32 (bias)" % (_type_name(ttype), ttype, i, name)
            )
        if r.ref(t, _T_SPARSITY, what) >= 0:
            raise ModelError("%s is sparse; the node runs dense tensors only" % what)
        sstart, ndims = r.opt_vector(t, _T_SHAPE, 4, _MAX_DIMS, what + " shape")
        shape = tuple(r.int32s(sstart, ndims, what + " shape"))
        count = 1
        for d in shape:
            if d < 1 or d > 0xFFFF:
                raise ModelError("%s has dimension %d in shape %r" % (what, d, shape))
            count *= d
            if count > 0xFFFFFF:
                raise ModelError("%s is too large for a node: shape %r" % (what, shape))
        bi = r.scalar(t, _T_BUFFER, 4, False, 0, what)
        if bi >= len(buffers):
            raise ModelError("%s points at buffer %d of %d" % (what, bi, len(buffers)))
        quant = None
        qpos = r.ref(t, _T_QUANT, what)
        if qpos >= 0:
            qt = r.table(qpos, what + " quantization")
            if r.scalar(qt, _Q_DETAILS_TYPE, 1, False, 0, what):
                raise ModelError(
                    "%s uses custom quantization details; the node reads affine scales only" % what
                )
            sc_start, nsc = r.opt_vector(qt, _Q_SCALE, 4, 0xFFFF, what + " scales")
            zp_start, nzp = r.opt_vector(qt, _Q_ZERO_POINT, 8, 0xFFFF, what + " zero points")
            dim = r.scalar(qt, _Q_DIM, 4, True, 0, what)
            quant = (sc_start, nsc, zp_start, nzp, dim)
        return (ttype, shape, buffers[bi], count, quant)

    def _activation_quant(self, r, tensor, ti, role):
        """(scale bits, zero point, scale, zero point) of an int8 per-tensor activation."""
        what = "tensor %d (%s)" % (ti, role)
        if tensor[0] != _TYPE_INT8:
            raise ModelError("%s is %s; activations must be INT8" % (what, _type_name(tensor[0])))
        if tensor[2][1]:
            raise ModelError("%s holds constant data; an activation must not" % what)
        q = tensor[4]
        if q is None or q[1] != 1 or q[3] != 1:
            raise ModelError("%s must have exactly one scale and one zero point (per-tensor int8)" % what)
        bits = r.u32(q[0], what + " scale")
        scale = struct.unpack_from("<f", r.b, q[0])[0]
        if _f32_parts(bits) is None:
            raise ModelError("%s has scale %r; scales must be positive normal float32" % (what, scale))
        zp = r.i64(q[2], what + " zero point")
        if not -128 <= zp <= 127:
            raise ModelError("%s has zero point %d, outside int8" % (what, zp))
        return bits, zp, scale, zp

    def _layer(self, r, k, tensors, xi, wi, bi, yi, act):
        """Check one FULLY_CONNECTED op and build its runtime record:
        (weights start, in, out, fast path?, params array('i'), output array('b'))."""
        what = "operator %d" % k
        x, w, y = tensors[xi], tensors[wi], tensors[yi]
        in_bits, in_zp = self._activation_quant(r, x, xi, "input of " + what)[:2]
        out_bits, out_zp = self._activation_quant(r, y, yi, "output of " + what)[:2]
        if w[0] != _TYPE_INT8:
            raise ModelError("%s weights (tensor %d) are %s; supported: INT8" % (what, wi, _type_name(w[0])))
        if len(w[1]) != 2:
            raise ModelError("%s weights (tensor %d) have shape %r; expected [out, in]" % (what, wi, w[1]))
        m, n = w[1]
        if x[3] != n or not x[1] or x[1][-1] != n:
            raise ModelError(
                "%s input (tensor %d) has shape %r but its weights take %d features; the node "
                "runs batch size 1" % (what, xi, x[1], n)
            )
        if y[3] != m:
            raise ModelError(
                "%s output (tensor %d) has shape %r but its weights give %d" % (what, yi, y[1], m)
            )
        wstart, wlen = w[2]
        if wlen != m * n:
            raise ModelError(
                "%s weights (tensor %d) need %d bytes of data, the buffer has %d" % (what, wi, m * n, wlen)
            )
        q = w[4]
        if q is None or q[1] not in (1, m):
            raise ModelError("%s weights (tensor %d) need 1 or %d scales" % (what, wi, m))
        if q[1] > 1 and q[4] != 0:
            raise ModelError(
                "%s weights (tensor %d) are quantized along dimension %d; expected 0" % (what, wi, q[4])
            )
        if q[3] not in (0, 1, q[1]):
            raise ModelError(
                "%s weights (tensor %d) have %d zero points for %d scales" % (what, wi, q[3], q[1])
            )
        for j in range(q[3]):
            if r.i64(q[2] + 8 * j, what + " weight zero point"):
                raise ModelError(
                    "%s weights (tensor %d) have a nonzero zero point; int8 weights are symmetric"
                    % (what, wi)
                )
        w_bits = []
        for j in range(q[1]):
            bits = r.u32(q[0] + 4 * j, what + " weight scale")
            if _f32_parts(bits) is None:
                raise ModelError(
                    "%s weights (tensor %d) scale %d is not a positive normal float32" % (what, wi, j)
                )
            w_bits.append(bits)
        bias = None
        if bi >= 0:
            b = tensors[bi]
            if b[0] != _TYPE_INT32 or b[3] != m or len(b[1]) != 1:
                raise ModelError(
                    "%s bias (tensor %d) must be INT32 of shape [%d], is %s %r"
                    % (what, bi, m, _type_name(b[0]), b[1])
                )
            if b[2][1] != 4 * m:
                raise ModelError(
                    "%s bias (tensor %d) needs %d bytes of data, the buffer has %d"
                    % (what, bi, 4 * m, b[2][1])
                )
            bias = b[2][0]

        if act == _ACT_NONE:
            lo, hi = -128, 127
        else:
            lo = max(-128, out_zp)  # quantize(0.0) == zero point
            hi = 127 if act == _ACT_RELU else min(127, _quantize_f32(6, out_bits, out_zp))

        p = array("i", bytes(4 * (_HDR + _REC * m)))
        p[0] = out_zp
        p[1] = lo
        p[2] = hi
        buf = self._buf
        fast = True
        for c in range(m):
            wsum = 0
            wabs = 0
            base = wstart + c * n
            for i in range(n):
                v = buf[base + i]
                v = v - 256 if v > 127 else v
                wsum += v
                wabs += v if v >= 0 else -v
            b0 = r.i32(bias + 4 * c, "bias") if bias is not None else 0
            # tflite-micro accumulates in int32; refuse what would overflow it.
            if (b0 if b0 >= 0 else -b0) + 256 * wabs >= 0x7FFFFFFF:
                raise ModelError(
                    "%s channel %d: the int32 accumulator can overflow (bias %d); "
                    "re-quantize the model" % (what, c, b0)
                )
            folded = b0 - in_zp * wsum  # sum((x - zp) * w) + b == sum(x * w) + folded
            mult, shift = _quantize_multiplier(
                in_bits, w_bits[c if len(w_bits) > 1 else 0], out_bits, len(w_bits) > 1
            )
            ls = shift if shift > 0 else 0
            rs = -shift if shift < 0 else 0
            half = (1 << (rs - 1)) if rs else 0
            bound = (folded if folded >= 0 else -folded) + 128 * wabs
            if (bound << ls) >= _FAST_LIMIT or half >= (1 << 29) or ls > 31:
                fast = False
            j = _HDR + _REC * c
            p[j] = folded
            p[j + 1] = mult & 0x3FFF
            p[j + 2] = (mult >> 14) & 0x3FFF
            p[j + 3] = mult >> 28
            p[j + 4] = ls
            p[j + 5] = rs
            p[j + 6] = half
        return (wstart, n, m, fast, p, array("b", bytes(m)))

    # -- running -------------------------------------------------------------------------

    def invoke_into(self, data, out):
        """Run on `data` (in int8 values as bytes-like) and write the int8 result into `out`
        (a bytearray of the output size). Allocates nothing."""
        if len(data) != self._in_features:
            raise ValueError("input must be %d int8 bytes, got %d" % (self._in_features, len(data)))
        if len(out) != self._out_features:
            raise ValueError("output buffer must be %d bytes, got %d" % (self._out_features, len(out)))
        self._x_raw[:] = data
        x = self._x
        buf = self._buf
        viper = self._viper
        for L in self._layers:
            woff, n, m, fast, p, y = L
            if viper and fast:
                _layer_viper(x, buf, woff, n, m, p, y)
            else:
                _layer_python(buf, woff, n, m, p, fast, x, y)
            x = y
        out[:] = x
        return out

    def invoke(self, data):
        """Run on `data` (bytes-like, int8 values); return the int8 output as bytes."""
        out = bytearray(self._out_features)
        self.invoke_into(data, out)
        return bytes(out)

    # -- metadata --------------------------------------------------------------------------

    def metadata(self, name):
        """The raw bytes (memoryview) of metadata entry `name`, or None."""
        entry = self._metadata.get(name)
        if entry is None:
            return None
        start, n = entry
        return self._buf[start : start + n]

    def manifest(self):
        """The edgeline manifest (a dict: features, scaler, threshold, scoring, version), or None."""
        raw = self.metadata("edgeline.manifest")
        if raw is None:
            return None
        try:
            return json.loads(bytes(raw).decode())
        except ValueError as e:  # includes UnicodeError and json's errors
            raise ModelError("metadata 'edgeline.manifest' is not valid JSON: %s" % e)

    @property
    def layers(self):
        """[(in, out, fast_path)] per FULLY_CONNECTED op, for diagnostics."""
        return [(L[1], L[2], L[3]) for L in self._layers]
