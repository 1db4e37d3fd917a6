# Device code. The node's anomaly detector: one int8 .tflite model and the scoring recipe in
# its manifest (docs/model-format.md), applied to one window's feature vector at a time.
#
#   z     = (x - scaler.mean) / scaler.std               per feature, in the port's floats
#   q     = clamp(round_half_away(z / s_in) + zp_in)     int8 model input
#   y_q   = Model.invoke_into(q)                          tflite_model.py, bit-exact with tflite-micro
#   y     = (y_q - zp_out) * s_out
#   score = pca_t2_q:            sum(y[:k]^2) / t2_mean + sum((z - y[k:])^2) / q_mean
#           reconstruction_mse:  mean((z - y)^2) / scale
#           raw:                 y[index]
#   alarm = mean of the last `alarm.smooth` scores > threshold, held `alarm.hold` more windows
#
# The gateway scores the same way (host/model_scorer.py) with LiteRT, which rounds once where
# this interpreter rounds twice, so the two can disagree right at the threshold; they agree
# on >= 99.9 % of decisions (tests/firmware/test_detector.py).
#
# Memory: the input bytes, output bytes, standardized input and the score ring are
# allocated once, at load; `score` allocates nothing but the float temporaries of its
# arithmetic (boxed floats on most ports). The model bytes are read in place (see
# tflite_model.py): keep the buffer alive and unchanged while the detector is in use.
from .tflite_model import Model, ModelError

_PCA = 0
_MSE = 1
_RAW = 2
_KINDS = {"pca_t2_q": _PCA, "reconstruction_mse": _MSE, "raw": _RAW}
_CLAMP = 1000.0  # |z / s_in| beyond this saturates anyway; keeps int() small


def _num(d, key, where, default=None):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), -float("inf")):
        raise ModelError("manifest key %r must be a finite number, got %r" % (where + key, v))
    return float(v)


def _int(d, key, where, default, lo):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ModelError("manifest key %r must be an integer >= %d, got %r" % (where + key, lo, v))
    return v


class Detector:
    """Score feature vectors with an edgeline .tflite model: `score(features) -> (score, anomalous)`."""

    def __init__(self, model_bytes, kernel="auto"):
        self.model = Model(model_bytes, kernel)
        self._buf = model_bytes
        man = self.model.manifest()
        if man is None:
            raise ModelError("model has no 'edgeline.manifest' metadata: not an edgeline detector")
        if not isinstance(man, dict):
            raise ModelError("metadata 'edgeline.manifest' is not a JSON object")
        if man.get("schema") != 1:
            raise ModelError("manifest schema is %r; this node reads schema 1" % (man.get("schema"),))
        try:
            feats = man["features"]
            mean = man["scaler"]["mean"]
            std = man["scaler"]["std"]
            kind = man["scoring"]
        except (KeyError, TypeError) as e:
            raise ModelError("manifest is missing key %s" % e)
        n = self.model.input_shape[-1]
        m = self.model.output_shape[-1]
        if not isinstance(feats, list) or len(feats) != n:
            raise ModelError("manifest 'features' must list %d names (the model's inputs)" % n)
        if not isinstance(mean, list) or not isinstance(std, list) or len(mean) != n or len(std) != n:
            raise ModelError("manifest 'scaler' needs %d means and %d stds" % (n, n))
        self.features = tuple(feats)
        self.version = man.get("version")
        self.threshold = _num(man, "threshold", "")
        self._mean = [_num({"v": v}, "v", "scaler.mean.") for v in mean]
        self._std = [_num({"v": v}, "v", "scaler.std.") for v in std]
        for s in self._std:
            if s <= 0.0:
                raise ModelError("manifest 'scaler.std' values must be > 0")
        if kind not in _KINDS:
            raise ModelError("manifest 'scoring' is %r; this node scores %s" % (kind, ", ".join(sorted(_KINDS))))
        self.scoring = kind
        self._kind = _KINDS[kind]
        p = man.get("score_params", {})
        a = man.get("alarm", {})
        if not isinstance(p, dict) or not isinstance(a, dict):
            raise ModelError("manifest 'score_params' and 'alarm' must be objects")
        self._k = 0
        self._t2_mean = 1.0
        self._q_mean = 0.0
        self._scale = 1.0
        self._index = 0
        if self._kind == _PCA:
            self._k = _int(p, "k", "score_params.", -1, 1)
            self._t2_mean = _num(p, "t2_mean", "score_params.")
            self._q_mean = _num(p, "q_mean", "score_params.")
            if self._t2_mean <= 0.0 or self._q_mean < 0.0:
                raise ModelError("manifest 'score_params' needs t2_mean > 0 and q_mean >= 0")
            if m != self._k + n:
                raise ModelError("pca_t2_q with k=%d over %d features needs %d outputs, the model has %d"
                                 % (self._k, n, self._k + n, m))
        elif self._kind == _MSE:
            self._scale = _num(p, "scale", "score_params.", 1.0)
            if self._scale <= 0.0:
                raise ModelError("manifest 'score_params.scale' must be > 0")
            if m != n:
                raise ModelError("reconstruction_mse needs as many outputs as inputs (%d), the model has %d"
                                 % (n, m))
        else:
            self._index = _int(p, "index", "score_params.", 0, 0)
            if self._index >= m:
                raise ModelError("manifest 'score_params.index' %d >= %d outputs" % (self._index, m))
        self.smooth = _int(a, "smooth", "alarm.", 1, 1)
        self.hold = _int(a, "hold", "alarm.", 0, 0)
        if self.smooth > 4096:
            raise ModelError("manifest 'alarm.smooth' %d is more than the node keeps (4096)" % self.smooth)

        self._s_in, self._zp_in = self.model.input_quant
        self._s_out, self._zp_out = self.model.output_quant
        self._n = n
        self._m = m
        # Preallocated: standardized input, int8 input and output bytes, the score ring.
        self._z = [0.0] * n
        self.input_bytes = bytearray(n)
        self.output_bytes = bytearray(m)
        self._ring = [0.0] * self.smooth
        self._bound = None
        self._vec = [0.0] * n
        self.reset()

    @classmethod
    def from_file(cls, path, kernel="auto"):
        """Load from a file (read once into RAM; a board may instead pass a memoryview of flash)."""
        with open(path, "rb") as f:
            data = f.read()
        return cls(data, kernel)

    def bind(self, sensors, feature_names):
        """Map the manifest's inputs, named "sensor.feature" (e.g. "vibration.rms"), onto the
        node's per-sensor feature lists: `sensors` are the node's sensor names in order;
        `feature_names` names each list's entries, either one list per sensor (each sensor's
        own names, as the birth announces them: features.Features(...).names) or one list of
        names shared by all sensors (e.g. features.FEATURE_NAMES). Inputs are found by name,
        so features the model does not use (kurtosis, band energies) are passed over. After
        this, `score_sensors(lists)` scores a window without building a vector by hand.

        :raises ModelError: an input the node does not compute, naming it.
        """
        sensors = list(sensors)
        shared = not feature_names or isinstance(feature_names[0], str)
        if not shared and len(feature_names) != len(sensors):
            raise ValueError("bind: %d feature name lists for %d sensors" % (len(feature_names), len(sensors)))
        idx = []
        for name in self.features:
            s, _, f = name.partition(".")
            if s not in sensors:
                if shared:
                    raise ModelError("model input %r: this node computes %s x %s" % (
                        name, "/".join(sensors), "/".join(feature_names)))
                raise ModelError("model input %r: this node computes %s, no sensor %r" % (
                    name, "/".join(sensors), s))
            si = sensors.index(s)
            names = list(feature_names if shared else feature_names[si])
            if f not in names:
                if shared:
                    raise ModelError("model input %r: this node computes %s x %s" % (
                        name, "/".join(sensors), "/".join(names)))
                raise ModelError("model input %r: sensor %r computes %s" % (name, s, "/".join(names)))
            idx.append((si, names.index(f)))
        self._bound = idx

    def score_sensors(self, feats):
        """`score` of the vector gathered from per-sensor feature lists (see `bind`)."""
        if self._bound is None:
            raise ValueError("call bind(sensors, feature_names) first")
        v = self._vec
        k = 0
        for si, fi in self._bound:
            v[k] = feats[si][fi]
            k += 1
        return self.score(v)

    def reset(self):
        """Forget the score history (smoothing and hold), as after a restart."""
        for i in range(self.smooth):
            self._ring[i] = 0.0
        self._count = 0
        self._pos = 0
        self._held = 0
        self.last_raw = 0.0

    def sha256(self):
        """The sha256 digest (32 bytes) of the model file, as the node's birth message carries it."""
        import hashlib

        return hashlib.sha256(bytes(self._buf)).digest()

    def self_test(self):
        """Score the training mean (every standardized feature 0): a model that loads but scores
        its own centre as anomalous, or not as a finite number, is broken. Returns that score;
        raises ModelError otherwise. Leaves the smoothing and hold state alone."""
        s = self._raw_score(self._mean)
        if not (s == s) or s == float("inf") or s > self.threshold:
            raise ModelError("model self-test failed: its training mean scores %r (threshold %r)"
                             % (s, self.threshold))
        return s

    def _raw_score(self, x):
        n = self._n
        if len(x) != n:
            raise ValueError("expected %d features (%s...), got %d" % (n, self.features[0], len(x)))
        z = self._z
        q = self.input_bytes
        mean = self._mean
        std = self._std
        s_in = self._s_in
        zp = self._zp_in
        for i in range(n):
            v = (x[i] - mean[i]) / std[i]
            if v != v:
                raise ValueError("feature %d (%s) is not a number" % (i, self.features[i]))
            z[i] = v
            t = v / s_in
            if t > _CLAMP:
                t = _CLAMP
            elif t < -_CLAMP:
                t = -_CLAMP
            if t >= 0.0:
                r = int(t + 0.5) + zp
            else:
                r = zp - int(0.5 - t)
            if r > 127:
                r = 127
            elif r < -128:
                r = -128
            q[i] = r & 0xFF
        out = self.output_bytes
        self.model.invoke_into(q, out)
        s_out = self._s_out
        zo = self._zp_out
        kind = self._kind
        if kind == _PCA:
            k = self._k
            t2 = 0.0
            for j in range(k):
                b = out[j]
                y = ((b - 256 if b > 127 else b) - zo) * s_out
                t2 += y * y
            score = t2 / self._t2_mean
            if self._q_mean > 0.0:
                qs = 0.0
                for i in range(n):
                    b = out[k + i]
                    d = z[i] - ((b - 256 if b > 127 else b) - zo) * s_out
                    qs += d * d
                score += qs / self._q_mean
            return score
        if kind == _MSE:
            se = 0.0
            for i in range(n):
                b = out[i]
                d = z[i] - ((b - 256 if b > 127 else b) - zo) * s_out
                se += d * d
            return se / n / self._scale
        b = out[self._index]
        return ((b - 256 if b > 127 else b) - zo) * s_out

    def score(self, features):
        """Score one window's feature vector (a list or array of len(features) numbers, in the
        manifest's order). Returns (score, anomalous): the score smoothed per the manifest
        (the raw one is in `last_raw`) and whether the alarm is raised.

        :raises ValueError: a wrong number of features, or a NaN among them.
        """
        raw = self._raw_score(features)
        self.last_raw = raw
        if self.smooth == 1:
            s = raw
        else:
            ring = self._ring
            ring[self._pos] = raw
            self._pos += 1
            if self._pos == self.smooth:
                self._pos = 0
            if self._count < self.smooth:
                self._count += 1
            total = 0.0
            for i in range(self._count):
                total += ring[i]
            s = total / self._count
        if s > self.threshold:
            self._held = self.hold + 1
        elif self._held:
            self._held -= 1
        return s, self._held > 0
