# Device code. Window features with fixed memory: one pass over a preallocated float array.
# docs/features.md says what each feature is and what it costs on the node.
import math
from array import array as _array

FEATURE_NAMES = ("mean", "std", "rms", "peak", "crest")
# The feature each sensor's control chart watches (index into FEATURE_NAMES).
CHART_FEATURE = {"vibration": 2, "temperature": 0, "current": 2}
_DEFAULT_CHART_FEATURE = 2


def chart_feature(sensor):
    return CHART_FEATURE.get(sensor, _DEFAULT_CHART_FEATURE)


def compute(buf, out):
    """Write FEATURE_NAMES of the samples in `buf` into the 5-slot list `out`; return out."""
    n = len(buf)
    s = 0.0
    s2 = 0.0
    peak = 0.0
    for x in buf:
        s += x
        s2 += x * x
        a = abs(x)
        if a > peak:
            peak = a
    mean = s / n
    var = s2 / n - mean * mean
    rms = math.sqrt(s2 / n)
    out[0] = mean
    out[1] = math.sqrt(var) if var > 0.0 else 0.0
    out[2] = rms
    out[3] = peak
    out[4] = peak / rms if rms > 0.0 else 0.0
    return out


# --------------------------------------------------------------------------------------------
# Per-sensor features: FEATURE_NAMES, then the kurtosis, then (vibration only) FFT band
# energies. FEATURE_NAMES and compute() above stay as they are: the committed demo model and
# the gateway are bound to those five names and values, in that order, as the first five of
# every sensor's list.
#
# kurtosis: the population EXCESS kurtosis (Fisher's, biased: no small-sample correction),
#   m4 / m2^2 - 3 with m_k = sum((x - mean)^k) / n, taken in a second pass over the window
#   around compute()'s mean (two passes: the one-pass raw-moment form cancels badly on an
#   offset signal such as a temperature at 38 degC). 0 for a normal signal, -1.5 for a sine,
#   large for impacts (a bearing fault). 0.0 when the window has no spread (m2 == 0).
# band0..band3: the signal's mean square split into 4 equal frequency bands up to Nyquist:
#   band b holds the FFT bins of frequencies [b, b+1) * fs / 8 (the Nyquist bin goes to
#   band3), each bin weighted |X_k|^2 / n^2 (twice that for bins other than DC and Nyquist,
#   which stand for their negative-frequency twin too). Parseval: band0 + ... + band3 =
#   sum(x^2) / n = rms^2. DC is not removed (it is in band0), so that the identity holds
#   exactly and a DC offset shows. Names do not carry Hz: they stay the same whatever
#   hal.rate_hz is; band b spans b * rate_hz / 8 .. (b + 1) * rate_hz / 8 Hz.
KURTOSIS = "kurtosis"
N_BANDS = 4
BAND_NAMES = ("band0", "band1", "band2", "band3")
BAND_SENSORS = ("vibration",)  # the sensors that get band energies

# FFT scratch in the width of the port's floats: 'd' where floats are doubles (the unix port:
# the host's float64, to rounding), 'f' where they are single precision (most ESP32 and RP2040
# builds), which halves the scratch without losing anything: every value passes through a
# float object of that width anyway.
_FLOAT = "f"
_ITEM = 4
if 1.0 + 1e-12 != 1.0:  # double-precision floats
    try:
        _array("d", [0.0])
        _FLOAT = "d"
        _ITEM = 8
    except ValueError:  # pragma: no cover - a port without 'd'
        pass


def _zeros(n):
    # A zeroed float array of n items, made from raw bytes: no list of n boxed floats on the
    # way (4 KB of pointers and 16-32 bytes per float on a 64-bit port).
    return _array(_FLOAT, bytes(n * _ITEM))


class FFTScratch:
    """What the real FFT of an n-sample window works in: re/im (n/2 each) and one quarter-wave
    cosine table, cos(2 pi t / n) for t = 0..n/4, from which every twiddle of the n/2-point
    FFT and of the split step is read (cos and sin by symmetry). 2.5 n floats in all: 10 KB
    for n = 1024 with double floats, 5 KB with single ones.

    One scratch serves every Features of the same n (scratch(n)): the windows are processed
    one sensor at a time, and compute() leaves nothing in it that the next call needs.
    """

    def __init__(self, n):
        self.n = n
        half = n >> 1
        quarter = n >> 2
        self.re = _zeros(half)
        self.im = _zeros(half)
        q = _zeros(quarter + 1)
        w = 2.0 * math.pi / n
        for t in range(quarter):
            q[t] = math.cos(w * t)
        q[quarter] = 0.0  # cos(pi / 2) exactly, where math.cos gives 6e-17
        self.cos_q = q


_SCRATCH = {}  # n -> FFTScratch, created by the first Features that needs it


def scratch(n):
    """The FFTScratch shared by all band sensors of n-sample windows, created on first use."""
    s = _SCRATCH.get(n)
    if s is None:
        s = _SCRATCH[n] = FFTScratch(n)
    return s


def feature_names(sensor):
    """The names of `sensor`'s features, in the order Features.compute writes them."""
    if sensor in BAND_SENSORS:
        return FEATURE_NAMES + (KURTOSIS,) + BAND_NAMES
    return FEATURE_NAMES + (KURTOSIS,)


def kurtosis(buf, mean):
    """Population excess kurtosis of `buf` around its `mean` (second pass); 0.0 if flat."""
    m2 = 0.0
    m4 = 0.0
    for x in buf:
        d = x - mean
        d2 = d * d
        m2 += d2
        m4 += d2 * d2
    if m2 <= 0.0:
        return 0.0
    n = len(buf)
    m2 /= n
    return (m4 / n) / (m2 * m2) - 3.0


class Features:
    """The features of one sensor's windows of `n_samples`.

    compute(buf, out) fills `out` (a list or float array of len(names)) and allocates
    nothing per window but the float results. A band sensor works in the FFTScratch shared by all band sensors of
    the same window size (scratch(n)), made here, once. For a band sensor `n_samples` must
    be a power of two >= 8 (radix-2 FFT, 4 bands of at least one bin): ValueError otherwise
    (the node's config check says so first, naming window.samples).
    """

    def __init__(self, sensor, n_samples):
        self.sensor = sensor
        self.names = feature_names(sensor)
        self.n = n_samples
        self.bands = sensor in BAND_SENSORS
        self._fft_scratch = None
        if n_samples < 1:
            raise ValueError("a window needs at least one sample, got %r" % (n_samples,))
        if not self.bands:
            return
        if n_samples < 8 or n_samples & (n_samples - 1):
            raise ValueError("the %s FFT needs a window of a power of two >= 8 samples, got %d "
                             "(use 256 or 512, say)" % (sensor, n_samples))
        self._fft_scratch = scratch(n_samples)

    def compute(self, buf, out):
        """Write self.names' features of the samples in `buf` into `out`; return out."""
        if len(buf) != self.n:
            raise ValueError("%s window of %d samples, %d expected" % (self.sensor, len(buf), self.n))
        compute(buf, out)
        out[5] = kurtosis(buf, out[0])
        if self.bands:
            self._band_energies(buf, out, 6)
        return out

    def _fft(self, m):
        # In-place iterative radix-2 decimation-in-time FFT of the m = n/2 points in re/im.
        # Written for MicroPython, where every float result is a heap object: the twiddle loop
        # is outside the butterfly loop (each twiddle read from the quarter-wave table once
        # per stage, m - 1 reads per FFT), array items are read once into locals, and the
        # butterflies of twiddle 1 (the whole first stage: about a fifth of all) and of
        # twiddle -i (a tenth) take no multiplication. Each other butterfly does the usual
        # arithmetic.
        sc = self._fft_scratch
        re = sc.re
        im = sc.im
        q = sc.cos_q
        n4 = self.n >> 2
        j = 0
        for i in range(1, m):  # bit-reversal permutation, indices computed as we go
            bit = m >> 1
            while j & bit:
                j ^= bit
                bit >>= 1
            j |= bit
            if i < j:
                t = re[i]
                re[i] = re[j]
                re[j] = t
                t = im[i]
                im[i] = im[j]
                im[j] = t
        size = 2
        while size <= m:
            half = size >> 1
            tstep = self.n // size  # e^(-2 pi i k / size) is e^(-2 pi i t / n), t = k * n / size
            for k in range(0, m, size):  # twiddle 1
                h = k + half
                ar = re[h]
                ai = im[h]
                br = re[k]
                bi = im[k]
                re[h] = br - ar
                im[h] = bi - ai
                re[k] = br + ar
                im[k] = bi + ai
            t = tstep
            for k0 in range(1, half):
                if t == n4:  # twiddle -i: (ar + i ai)(-i) = ai - i ar
                    for k in range(k0, m, size):
                        h = k + half
                        ar = re[h]
                        ai = im[h]
                        br = re[k]
                        bi = im[k]
                        re[h] = br - ai
                        im[h] = bi + ar
                        re[k] = br + ai
                        im[k] = bi - ar
                else:
                    # cos and sin of 2 pi t / n, 0 < t < n/2, from cos on [0, pi/2].
                    if t < n4:
                        c = q[t]
                        s = q[n4 - t]
                    else:
                        c = -q[m - t]
                        s = q[t - n4]
                    for k in range(k0, m, size):
                        h = k + half
                        ar = re[h]
                        ai = im[h]
                        xr = ar * c + ai * s
                        xi = ai * c - ar * s
                        br = re[k]
                        bi = im[k]
                        re[h] = br - xr
                        im[h] = bi - xi
                        re[k] = br + xr
                        im[k] = bi + xi
                t += tstep
            size <<= 1

    def _band_energies(self, buf, out, first):
        n = self.n
        m = n >> 1
        n4 = n >> 2  # = m/2
        sc = self._fft_scratch
        re = sc.re
        im = sc.im
        q = sc.cos_q
        for i in range(m):
            re[i] = buf[2 * i]
            im[i] = buf[2 * i + 1]
        self._fft(m)
        # Split Z (the n/2-point spectrum of z = x_even + i x_odd) into the spectra of the even
        # and odd samples, E_k = (Z_k + conj Z_{m-k}) / 2, O_k = (Z_k - conj Z_{m-k}) / 2i,
        # and X_k = E_k + W^k O_k with W = e^(-2 pi i / n). For a real x, E and O are
        # conjugate-symmetric and W^(m-k) = -conj(W^k), so X_{m-k} = conj(E_k - W^k O_k):
        # one E_k, W^k O_k gives the bins k and m - k, for k = 1 .. m/2 - 1. Computed here
        # without the / 2 (2E, 2O, so 2X): the powers are 4 |X|^2, taken back by `scale`.
        # DC and Nyquist: X_0 = Re Z_0 + Im Z_0, X_m = Re Z_0 - Im Z_0; the middle bin m/2:
        # |X|^2 = |Z_{m/2}|^2. Bins other than DC and Nyquist count twice (their
        # negative-frequency twins). Bands: bin k < m is in band k // (n/8), Nyquist in 3.
        zr = re[0]
        zi = im[0]
        d = zr + zi
        dc = 4.0 * (d * d)
        d = zr - zi
        nyq = 4.0 * (d * d)
        zr = re[n4]
        zi = im[n4]
        mid = 4.0 * (zr * zr + zi * zi)  # band 2 (m/2 // (m/4))
        per_band = n >> 3
        b0 = 0.0
        b1 = 0.0
        b2 = 0.0
        b3 = 0.0
        for k in range(1, n4):
            r = m - k
            zr = re[k]
            zi = im[k]
            cr = re[r]
            cim = im[r]
            er = zr + cr  # 2E = Z_k + conj Z_{m-k}
            ei = zi - cim
            orr = zi + cim  # 2O = (Z_k - conj Z_{m-k}) / i
            oi = cr - zr
            c = q[k]  # k < n/4: cos and sin of 2 pi k / n straight from the table
            s = q[n4 - k]
            pr = orr * c + oi * s  # 2 W^k O_k
            pi = oi * c - orr * s
            a = er + pr
            b = ei + pi
            lo = a * a + b * b  # 4 |X_k|^2
            a = er - pr
            b = ei - pi
            hi = a * a + b * b  # 4 |X_{m-k}|^2
            if k < per_band:
                b0 += lo
            else:
                b1 += lo
            if r >= 3 * per_band:
                b3 += hi
            else:
                b2 += hi
        scale = 1.0 / (4.0 * float(n) * float(n))
        out[first] = (dc + 2.0 * b0) * scale
        out[first + 1] = (2.0 * b1) * scale
        out[first + 2] = (mid + mid + 2.0 * b2) * scale
        out[first + 3] = (nyq + 2.0 * b3) * scale
