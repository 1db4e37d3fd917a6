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
