# Device code (MicroPython first; also imports under CPython, where the gateway's tests use it).
# The node's own CBOR codec, RFC 8949. docs/cbor-codec.md says what it supports and refuses.
#
#   dumps(obj) -> bytes                      preferred serialization, definite lengths,
#                                            map keys sorted length-first
#   dumps_into(obj, buf, offset=0) -> end    the same, written into a preallocated buffer
#   loads(buf, max_depth=16) -> obj          exactly one item; trailing bytes are an error
#   loads_prefix(buf, offset=0, max_depth=16) -> (obj, end)   one item, the rest left alone
#   CBORError(ValueError)                    the one error class, for every problem
#   Tag(tag, value), Simple(value), UNDEFINED  the items Python has no type for
#
# Decoding never trusts a declared length: every length is checked against the bytes that
# are really left before anything is read or allocated, and nothing is pre-sized from it.
# Nesting (arrays, maps, tags) is limited by max_depth, so recursion is bounded.
# Portability: %-formatting (f-strings can be compiled out of small ports), no struct 'e'
# (half floats are done by hand), no int.bit_length(), no signed int.from_bytes, no reliance
# on dict order: all of those are missing or different on some MicroPython ports.
import struct

from .compat import IS_MICROPYTHON, const

_MAJOR_UINT = const(0)
_MAJOR_NINT = const(1)
_MAJOR_BYTES = const(2)
_MAJOR_TEXT = const(3)
_MAJOR_ARRAY = const(4)
_MAJOR_MAP = const(5)
_MAJOR_TAG = const(6)
_MAJOR_SIMPLE = const(7)

_AI_1 = const(24)  # additional information: the argument follows in 1, 2, 4, 8 bytes
_AI_2 = const(25)
_AI_4 = const(26)
_AI_8 = const(27)
_AI_INDEF = const(31)
_BREAK = const(0xFF)

_SIMPLE_FALSE = const(20)
_SIMPLE_TRUE = const(21)
_SIMPLE_NULL = const(22)
_SIMPLE_UNDEFINED = const(23)

_TAG_POS_BIGNUM = const(2)
_TAG_NEG_BIGNUM = const(3)

_HALF_NAN = const(0x7E00)
_HALF_INF = const(0x7C00)
_SIGN_HALF = const(0x8000)

DEFAULT_MAX_DEPTH = const(16)
# dumps() refuses deeper structures (and so reference cycles) instead of exhausting the stack.
_MAX_ENCODE_DEPTH = const(64)
_INITIAL_CAPACITY = const(64)

_FLT_MAX = 3.4028234663852886e38  # largest finite IEEE single
_INF = float("inf")
_NAN = float("nan")
_TWO_M24 = 2.0**-24  # half's subnormal step, exact


class CBORError(ValueError):
    """Anything wrong with CBOR data or with a value that cannot be encoded."""


class Tag:
    """A tagged item whose tag this codec does not interpret (all but 2 and 3)."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __ne__(self, other):  # MicroPython does not derive != from __eq__ for every type
        return not self.__eq__(other)

    def __hash__(self):
        return hash((self.tag, self.value))

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Simple:
    """A simple value without a Python type: 0..19 and 32..255 (20..23 are False, True,
    None and UNDEFINED; 24..31 are reserved)."""

    def __init__(self, value):
        if (
            not isinstance(value, int)
            or value is True
            or value is False
            or not (0 <= value <= 19 or 32 <= value <= 255)
        ):
            raise CBORError("simple value must be 0..19 or 32..255, got %r" % (value,))
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Simple) and self.value == other.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.value) ^ 0x5A5A

    def __repr__(self):
        return "Simple(%d)" % self.value


class _Undefined:
    """The CBOR `undefined` simple value (f7). Use the UNDEFINED singleton."""

    def __repr__(self):
        return "UNDEFINED"

    def __bool__(self):
        return False


UNDEFINED = _Undefined()

# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


class _Writer:
    """Output position in a buffer. grow=False: a caller's preallocated buffer, never resized."""

    def __init__(self, buf, pos, grow):
        self.buf = buf
        self.pos = pos
        self.grow = grow

    def reserve(self, n):
        # Returns where n bytes may be written, after making sure they fit.
        start = self.pos
        end = start + n
        size = len(self.buf)
        if end > size:
            if not self.grow:
                raise CBORError("buffer too small: %d bytes, the encoding needs more" % size)
            self.buf.extend(bytearray(end - size if end - size > size else size))  # doubling
        self.pos = end
        return start

    def head(self, major, n):
        # The shortest head for argument n (preferred serialization).
        ib = major << 5
        buf = self.buf
        if n < 24:
            buf[self.reserve(1)] = ib | n
        elif n < 0x100:
            p = self.reserve(2)
            buf[p] = ib | _AI_1
            buf[p + 1] = n
        elif n < 0x10000:
            struct.pack_into(">BH", buf, self.reserve(3), ib | _AI_2, n)
        elif n >> 32 == 0:
            struct.pack_into(">BI", buf, self.reserve(5), ib | _AI_4, n)
        elif n >> 64 == 0:
            # Two 32-bit halves: not every port packs 'Q'.
            struct.pack_into(">BII", buf, self.reserve(9), ib | _AI_8, n >> 32, n & 0xFFFFFFFF)
        else:
            raise CBORError("argument %d does not fit in 64 bits" % n)

    def data(self, b):
        n = len(b)
        p = self.reserve(n)
        self.buf[p : p + n] = b


def _half_from_single_bits(bits):
    # The IEEE half with exactly the value of the IEEE single `bits`, or -1 when none exists.
    # (struct's 'e' format is missing on MicroPython.)
    sign = (bits >> 16) & _SIGN_HALF
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    if exp == 0:
        # Zero keeps its sign; single subnormals (< 1.2e-38) are far below half's range.
        return sign if mant == 0 else -1
    e = exp - 127
    if -14 <= e <= 15:  # half normal: 10 fraction bits, so the low 13 must be zero
        if mant & 0x1FFF:
            return -1
        return sign | ((e + 15) << 10) | (mant >> 13)
    if -24 <= e < -14:  # half subnormal: value = f * 2**-24 with f < 1024
        full = mant | 0x800000
        shift = -1 - e  # 14..23
        if full & ((1 << shift) - 1):
            return -1
        return sign | (full >> shift)
    return -1


def _enc_float(w, x):
    if x != x:  # NaN: the one canonical quiet NaN, payload and sign not kept
        struct.pack_into(">BH", w.buf, w.reserve(3), 0xF9, _HALF_NAN)
        return
    if x == _INF or x == -_INF:
        struct.pack_into(">BH", w.buf, w.reserve(3), 0xF9, _HALF_INF | (_SIGN_HALF if x < 0 else 0))
        return
    if -_FLT_MAX <= x <= _FLT_MAX:
        single = struct.pack(">f", x)
        if struct.unpack(">f", single)[0] == x:
            bits = struct.unpack(">I", single)[0]
            half = _half_from_single_bits(bits)
            if half >= 0:
                struct.pack_into(">BH", w.buf, w.reserve(3), 0xF9, half)
            else:
                p = w.reserve(5)
                w.buf[p] = 0xFA
                w.buf[p + 1 : p + 5] = single
            return
    struct.pack_into(">Bd", w.buf, w.reserve(9), 0xFB, x)


def _enc_int(w, x):
    if x >= 0:
        major = _MAJOR_UINT
        n = x
    else:
        major = _MAJOR_NINT
        n = -1 - x
    if n >> 64 == 0:
        w.head(major, n)
        return
    # Bignum, tag 2 or 3 over the big-endian magnitude, without leading zero bytes.
    length = 9
    while n >> (8 * length):
        length += 1
    w.head(_MAJOR_TAG, _TAG_POS_BIGNUM if major == _MAJOR_UINT else _TAG_NEG_BIGNUM)
    w.head(_MAJOR_BYTES, length)
    w.data(n.to_bytes(length, "big"))


def _small_uint_keys(d):
    for k in d:
        if not isinstance(k, int) or k is True or k is False or k < 0 or k >> 64:
            return False
    return True


def _length_first(pair):
    return (len(pair[0]), pair[0])


def _enc_map(w, d, depth):
    # Keys in length-first order (RFC 8949 section 4.2.3, RFC 7049 "canonical"), the order
    # cbor2's canonical=True uses: the node's maps come out byte for byte as the gateway's,
    # and the same on MicroPython, whose dicts do not keep insertion order.
    if _small_uint_keys(d):  # the wire format's maps: numeric order is that order
        for k in sorted(d):
            _enc(w, k, depth)
            _enc(w, d[k], depth)
        return
    pairs = []
    for k, v in d.items():
        kw = _Writer(bytearray(16), 0, True)
        _enc(kw, k, depth)
        pairs.append((bytes(memoryview(kw.buf)[: kw.pos]), v))
    pairs.sort(key=_length_first)
    prev = None
    for kb, v in pairs:
        if kb == prev:  # e.g. two distinct NaN objects as keys
            raise CBORError("two map keys encode to the same bytes %r" % (kb,))
        prev = kb
        w.data(kb)
        _enc(w, v, depth)


def _enc(w, obj, depth):
    # Identity first: on MicroPython bool is not an int subclass, on CPython it is.
    if obj is None:
        w.buf[w.reserve(1)] = 0xF6
    elif obj is True:
        w.buf[w.reserve(1)] = 0xF5
    elif obj is False:
        w.buf[w.reserve(1)] = 0xF4
    elif obj is UNDEFINED:
        w.buf[w.reserve(1)] = 0xF7
    elif isinstance(obj, int):
        _enc_int(w, obj)
    elif isinstance(obj, float):
        _enc_float(w, obj)
    elif isinstance(obj, str):
        try:
            b = obj.encode("utf-8")
        except UnicodeError:  # CPython: lone surrogates have no UTF-8 form
            raise CBORError("text is not encodable as UTF-8 (lone surrogate?)") from None
        w.head(_MAJOR_TEXT, len(b))
        w.data(b)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        w.head(_MAJOR_BYTES, len(obj))
        w.data(obj)
    else:
        if depth >= _MAX_ENCODE_DEPTH:
            raise CBORError("nesting deeper than %d (a reference cycle?)" % _MAX_ENCODE_DEPTH)
        depth += 1
        if isinstance(obj, (list, tuple)):
            w.head(_MAJOR_ARRAY, len(obj))
            for item in obj:
                _enc(w, item, depth)
        elif isinstance(obj, dict):
            w.head(_MAJOR_MAP, len(obj))
            _enc_map(w, obj, depth)
        elif isinstance(obj, Tag):
            t = obj.tag
            if not isinstance(t, int) or t is True or t is False or t < 0 or t >> 64:
                raise CBORError("tag number must be an int 0..2**64-1, got %r" % (t,))
            w.head(_MAJOR_TAG, t)
            _enc(w, obj.value, depth)
        elif isinstance(obj, Simple):
            v = obj.value
            if v < 24:
                w.buf[w.reserve(1)] = 0xE0 | v
            else:
                p = w.reserve(2)
                w.buf[p] = 0xF8
                w.buf[p + 1] = v
        else:
            raise CBORError("cannot encode a %s as CBOR" % type(obj).__name__)


def _encode(w, obj):
    try:
        _enc(w, obj, 0)
    except RuntimeError:  # the interpreter's own recursion limit (RecursionError on CPython)
        raise CBORError("structure nests too deeply for this interpreter's stack") from None


def dumps(obj):
    """Encode obj with preferred serialization and definite lengths.

    :raises CBORError: for a type CBOR cannot carry, an int tag number out of range,
        text with lone surrogates, or nesting deeper than 64 (a reference cycle).
    """
    w = _Writer(bytearray(_INITIAL_CAPACITY), 0, True)
    _encode(w, obj)
    return bytes(memoryview(w.buf)[: w.pos])


def dumps_into(obj, buf, offset=0):
    """Encode obj into the preallocated bytearray (or writable memoryview) buf at offset;
    return the offset just past the encoding. The buffer is never resized.

    :raises CBORError: as dumps(), and when the encoding does not fit (the bytes from offset
        on are then partly overwritten).
    """
    if not isinstance(buf, (bytearray, memoryview)):
        raise CBORError("dumps_into needs a bytearray or memoryview, got %s" % type(buf).__name__)
    if not 0 <= offset <= len(buf):
        raise CBORError("offset %d is outside the buffer of %d bytes" % (offset, len(buf)))
    w = _Writer(buf, offset, False)
    _encode(w, obj)
    return w.pos


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def _check_utf8(b):
    # Strict UTF-8 (Unicode Table 3-7): no overlong forms, no surrogates, nothing above
    # U+10FFFF. MicroPython's own decoder checks only the byte structure, so this runs there.
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            raise CBORError("invalid UTF-8 in text string: byte 0x%02x" % c)
        if i + k >= n:
            raise CBORError("invalid UTF-8 in text string: truncated sequence")
        c = b[i + 1]
        if c < lo or c > hi:
            raise CBORError("invalid UTF-8 in text string: byte 0x%02x" % c)
        for j in range(i + 2, i + k + 1):
            if b[j] & 0xC0 != 0x80:
                raise CBORError("invalid UTF-8 in text string: byte 0x%02x" % b[j])
        i += k + 1


def _text(b):
    # b: memoryview slice of the input.
    if IS_MICROPYTHON and len(b) and max(b) > 0x7F:
        _check_utf8(b)
    try:
        return str(b, "utf-8")
    except UnicodeError:
        raise CBORError("invalid UTF-8 in text string") from None


def _half_to_float(h):
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        val = mant * _TWO_M24
    elif exp == 0x1F:
        val = _NAN if mant else _INF  # NaN: any payload decodes to the one NaN
    else:
        val = (mant + 1024) * (2.0 ** (exp - 25))
    return -val if h & _SIGN_HALF else val


def _has_nan_key(d, k):
    # k is unequal to itself (a NaN, or a tag around one): look for a key that encodes alike.
    kb = dumps(k)
    for other in d:
        if other != other and dumps(other) == kb:
            return True
    return False


class _Decoder:
    def __init__(self, buf, pos, max_depth):
        if isinstance(buf, memoryview):
            mv = buf
        elif isinstance(buf, (bytes, bytearray)):
            mv = memoryview(buf)
        else:
            raise CBORError("expected bytes, bytearray or memoryview, got %s" % type(buf).__name__)
        if not 0 <= pos <= len(mv):
            raise CBORError("offset %d is outside the %d-byte input" % (pos, len(mv)))
        self.mv = mv
        self.pos = pos
        self.end = len(mv)
        self.max_depth = max_depth

    def byte(self):
        p = self.pos
        if p >= self.end:
            raise CBORError("truncated: input ends at offset %d inside an item" % p)
        self.pos = p + 1
        return self.mv[p]

    def take(self, n):
        # n bytes as a memoryview slice, after checking they are really there.
        p = self.pos
        if n > self.end - p:
            raise CBORError(
                "truncated: %d bytes declared at offset %d, only %d left" % (n, p, self.end - p)
            )
        self.pos = p + n
        return self.mv[p : p + n]

    def arg(self, ai):
        if ai < 24:
            return ai
        if ai == _AI_1:
            return self.byte()
        if ai == _AI_2:
            return struct.unpack(">H", self.take(2))[0]
        if ai == _AI_4:
            return struct.unpack(">I", self.take(4))[0]
        if ai == _AI_8:
            hi, lo = struct.unpack(">II", self.take(8))
            return (hi << 32) | lo
        raise CBORError("reserved additional information %d at offset %d" % (ai, self.pos - 1))

    def item(self, depth):
        ib = self.byte()
        major = ib >> 5
        ai = ib & 0x1F
        if major == _MAJOR_SIMPLE:
            return self.special(ai)
        if ai == _AI_INDEF:
            if major == _MAJOR_BYTES or major == _MAJOR_TEXT:
                return self.indefinite_string(major)
            if major < _MAJOR_BYTES or major == _MAJOR_TAG:
                raise CBORError(
                    "indefinite length is not allowed for major type %d (offset %d)"
                    % (major, self.pos - 1)
                )
        else:
            n = self.arg(ai)
            if major == _MAJOR_UINT:
                return n
            if major == _MAJOR_NINT:
                return -1 - n
            if major == _MAJOR_BYTES:
                return bytes(self.take(n))
            if major == _MAJOR_TEXT:
                return _text(self.take(n))
        # Arrays, maps and tags nest: this is where the depth is bounded.
        if depth >= self.max_depth:
            raise CBORError("nesting deeper than max_depth=%d" % self.max_depth)
        depth += 1
        if major == _MAJOR_TAG:
            return self.tagged(n, depth)
        if major == _MAJOR_ARRAY:
            out = []  # grown item by item, never pre-sized from the declared count
            if ai == _AI_INDEF:
                while not self.at_break():
                    out.append(self.item(depth))
            else:
                if n > self.end - self.pos:  # every item takes at least one byte
                    raise CBORError(
                        "truncated: array of %d items declared, only %d bytes left"
                        % (n, self.end - self.pos)
                    )
                for _ in range(n):
                    out.append(self.item(depth))
            return out
        out = {}
        if ai == _AI_INDEF:
            while not self.at_break():
                self.map_put(out, self.item(depth), self.item(depth))
        else:
            if n > (self.end - self.pos) >> 1:  # every pair takes at least two bytes
                raise CBORError(
                    "truncated: map of %d pairs declared, only %d bytes left" % (n, self.end - self.pos)
                )
            for _ in range(n):
                self.map_put(out, self.item(depth), self.item(depth))
        return out

    def at_break(self):
        # True (and consumed) at the break that ends an indefinite-length item.
        p = self.pos
        if p >= self.end:
            raise CBORError("truncated: indefinite-length item has no break")
        if self.mv[p] == _BREAK:
            self.pos = p + 1
            return True
        return False

    def map_put(self, out, k, v):
        # Keys are compared as Python compares them: 1, 1.0 and True are the same key, and
        # so are 0.0 and -0.0. NaNs, never equal in Python, are the same key when they
        # encode alike (all NaNs encode as f97e00), or dumps could not write the map back.
        try:
            if k in out or (k != k and _has_nan_key(out, k)):
                raise CBORError("duplicate map key %r" % (k,))
            out[k] = v
        except TypeError:
            raise CBORError("map key of type %s is not hashable" % type(k).__name__) from None

    def indefinite_string(self, major):
        parts = []
        while not self.at_break():
            ib = self.byte()
            if ib >> 5 != major or ib & 0x1F == _AI_INDEF:
                raise CBORError(
                    "indefinite-length string chunk at offset %d is not a definite string of "
                    "the same type" % (self.pos - 1)
                )
            chunk = self.take(self.arg(ib & 0x1F))
            parts.append(bytes(chunk) if major == _MAJOR_BYTES else _text(chunk))
        return (b"" if major == _MAJOR_BYTES else "").join(parts)

    def tagged(self, tag, depth):
        value = self.item(depth)
        if tag == _TAG_POS_BIGNUM or tag == _TAG_NEG_BIGNUM:
            if not isinstance(value, bytes):
                raise CBORError("bignum (tag %d) must hold a byte string" % tag)
            n = int.from_bytes(value, "big")
            return n if tag == _TAG_POS_BIGNUM else -1 - n
        return Tag(tag, value)

    def special(self, ai):
        if ai < _SIMPLE_FALSE:
            return Simple(ai)
        if ai == _SIMPLE_FALSE:
            return False
        if ai == _SIMPLE_TRUE:
            return True
        if ai == _SIMPLE_NULL:
            return None
        if ai == _SIMPLE_UNDEFINED:
            return UNDEFINED
        if ai == _AI_1:
            v = self.byte()
            if v < 32:
                raise CBORError("two-byte simple value %d < 32 is not well-formed (RFC 8949)" % v)
            return Simple(v)
        if ai == _AI_2:
            return _half_to_float(struct.unpack(">H", self.take(2))[0])
        if ai == _AI_4:
            return struct.unpack(">f", self.take(4))[0]
        if ai == _AI_8:
            return struct.unpack(">d", self.take(8))[0]
        if ai == _AI_INDEF:
            raise CBORError("break (0xff) outside an indefinite-length item at offset %d" % (self.pos - 1))
        raise CBORError("reserved simple/float encoding 0x%02x at offset %d" % (0xE0 | ai, self.pos - 1))

    def run(self):
        try:
            return self.item(0)
        except RuntimeError:  # the interpreter's recursion limit, for a very large max_depth
            raise CBORError("nesting too deep for this interpreter's stack") from None


def loads_prefix(buf, offset=0, max_depth=DEFAULT_MAX_DEPTH):
    """Decode the one item that starts at offset; return (item, offset just past it).

    :raises CBORError: for any malformed, truncated, unsupported or too deeply nested input.
    """
    d = _Decoder(buf, offset, max_depth)
    obj = d.run()
    return obj, d.pos


def loads(buf, max_depth=DEFAULT_MAX_DEPTH):
    """Decode buf, which must hold exactly one CBOR item (RFC 8949).

    :raises CBORError: for any malformed, truncated, unsupported or too deeply nested input,
        and for bytes left over after the item.
    """
    d = _Decoder(buf, 0, max_depth)
    obj = d.run()
    if d.pos != d.end:
        raise CBORError("%d trailing bytes after the item at offset %d" % (d.end - d.pos, d.pos))
    return obj
