# Device code. Window features with fixed memory: one pass over a preallocated float array.
import math

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

try:
    from array import array as _array

    _array("d", [0.0])
    _FLOAT = "d"  # double scratch where the port has it: the host's float64, to rounding
except (ImportError, ValueError):  # pragma: no cover - a port without 'd'
    from array import array as _array

    _FLOAT = "f"


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
    """The features of one sensor's windows of `n_samples`, with all scratch allocated here.

    compute(buf, out) fills `out` (a list of len(names)) and allocates nothing per window but
    the float results. For a band sensor, `n_samples` must be a power of two >= 8 (radix-2
    FFT, 4 bands of at least one bin): ValueError otherwise.
    """

    def __init__(self, sensor, n_samples):
        self.sensor = sensor
        self.names = feature_names(sensor)
        self.n = n_samples
        self.bands = sensor in BAND_SENSORS
        if n_samples < 1:
            raise ValueError("a window needs at least one sample, got %r" % (n_samples,))
        if not self.bands:
            return
        if n_samples < 8 or n_samples & (n_samples - 1):
            raise ValueError("the %s FFT needs a window of a power of two >= 8 samples, got %d "
                             "(use 256 or 512, say)" % (sensor, n_samples))
        half = n_samples // 2
        # The real FFT of n samples is a complex FFT of n/2 points (even samples in re, odd in
        # im), then one split step: re/im hold that half-size spectrum, in place.
        self._re = _array(_FLOAT, [0.0] * half)
        self._im = _array(_FLOAT, [0.0] * half)
        # Twiddles e^(-2 pi i t / n) = cos - i sin for t < n/2: the split step uses all of
        # them, the n/2-point FFT every other one.
        self._cos = _array(_FLOAT, [math.cos(2.0 * math.pi * t / n_samples) for t in range(half)])
        self._sin = _array(_FLOAT, [math.sin(2.0 * math.pi * t / n_samples) for t in range(half)])

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
        re = self._re
        im = self._im
        cos_t = self._cos
        sin_t = self._sin
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
            tstep = self.n // size  # e^(-2 pi i k / size) is table entry k * n / size
            start = 0
            while start < m:
                t = 0
                for k in range(start, start + half):
                    c = cos_t[t]
                    s = sin_t[t]
                    h = k + half
                    xr = re[h] * c + im[h] * s
                    xi = im[h] * c - re[h] * s
                    re[h] = re[k] - xr
                    im[h] = im[k] - xi
                    re[k] += xr
                    im[k] += xi
                    t += tstep
                start += size
            size <<= 1

    def _band_energies(self, buf, out, first):
        n = self.n
        m = n >> 1
        re = self._re
        im = self._im
        for i in range(m):
            re[i] = buf[2 * i]
            im[i] = buf[2 * i + 1]
        self._fft(m)
        cos_t = self._cos
        sin_t = self._sin
        per_band = n >> 3  # bins per band: the 4 bands split bins 0 .. n/2 - 1 evenly
        scale = 1.0 / (float(n) * float(n))
        k = 0
        for b in range(N_BANDS):
            e = 0.0
            stop = k + per_band if b < N_BANDS - 1 else m + 1  # the Nyquist bin m: last band
            while k < stop:
                # Split Z (n/2-point spectrum of z = x_even + i x_odd) into the spectra of the
                # even and odd samples, Ev = (Z_k + conj Z_{m-k}) / 2 and
                # Od = (Z_k - conj Z_{m-k}) / 2i; then X_k = Ev + e^(-2 pi i k / n) Od.
                a = k if k < m else 0
                r = m - k if k > 0 else 0
                zr = re[a]
                zi = im[a]
                cr = re[r]
                ci = -im[r]
                er = 0.5 * (zr + cr)
                ei = 0.5 * (zi + ci)
                orr = 0.5 * (zi - ci)
                oi = -0.5 * (zr - cr)
                if k < m:
                    c = cos_t[k]
                    s = sin_t[k]
                else:  # e^(-i pi) = -1
                    c = -1.0
                    s = 0.0
                xr = er + orr * c + oi * s
                xi = ei + oi * c - orr * s
                p = xr * xr + xi * xi
                if 0 < k < m:
                    p += p  # the negative-frequency twin
                e += p
                k += 1
            out[first + b] = e * scale
