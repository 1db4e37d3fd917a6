# Device code. A per-sensor Shewhart individuals chart with 3-sigma limits.
# It learns its centre line and sigma from the first `calibration` windows (Welford's
# algorithm: constant memory), then flags a sensor out of control when `run` windows in a
# row fall outside the limits; one point outside alone is what noise does 0.27 % of the time.
import math


class ControlChart:
    def __init__(self, calibration=20, k_sigma=3.0, run=2):
        if calibration < 2:
            raise ValueError("calibration must be at least 2 windows, got %r" % calibration)
        self.calibration = calibration
        self.k_sigma = k_sigma
        self.run = run
        self.n = 0
        self.mean = 0.0
        self._m2 = 0.0
        self.sigma = 0.0
        self._outside = 0

    @property
    def ready(self):
        return self.n >= self.calibration

    def update(self, x):
        """Feed one window's value; return (score, out_of_control). score = |z| once ready."""
        if self.n < self.calibration:
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self._m2 += d * (x - self.mean)
            if self.n == self.calibration:
                # A floor on sigma keeps a perfectly flat signal from alarming on rounding.
                self.sigma = max(math.sqrt(self._m2 / (self.n - 1)), 1e-6 * (abs(self.mean) + 1.0))
            return 0.0, False
        z = abs(x - self.mean) / self.sigma
        if z > self.k_sigma:
            self._outside += 1
        else:
            self._outside = 0
        return z, self._outside >= self.run
