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


# Shewhart X-bar/R control chart constants for subgroups of n samples (ASTM STP 15D / the
# standard SPC tables): A2 (X-bar limits from R-bar), D3 and D4 (R limits), d2 (E[R] / sigma).
_XBAR_R = {
    2: (1.880, 0.0, 3.267, 1.128),
    3: (1.023, 0.0, 2.574, 1.693),
    4: (0.729, 0.0, 2.282, 2.059),
    5: (0.577, 0.0, 2.114, 2.326),
    6: (0.483, 0.0, 2.004, 2.534),
    7: (0.419, 0.076, 1.924, 2.704),
    8: (0.373, 0.136, 1.864, 2.847),
    9: (0.337, 0.184, 1.816, 2.970),
    10: (0.308, 0.223, 1.777, 3.078),
}


class XbarRChart:
    """A Shewhart X-bar/R chart over one sensor's raw samples, one chart point per window.

    Subgroups: each window is cut into consecutive sub-groups of `subgroup` samples (5 by
    default; a remainder shorter than that is left out), not taken as one subgroup of 256.
    The tabulated A2/D3/D4/d2 exist only for small n (here 2..10), and they assume the n
    samples of a subgroup are close in time, so that their range measures the short-term
    (common-cause) spread; a whole window of a vibration signal has a range set by the
    shaft's sine, not by noise.

    Chart point per window: X-bar = the mean of the window's subgroup means, R = the mean of
    its subgroup ranges. Calibration (the first `calibration` windows) gives the centre lines
    X-dbar and R-bar as the means of those; the limits are the standard ones for ONE subgroup
    of n: X-dbar +- A2 R-bar, and D3 R-bar .. D4 R-bar. The window's average subgroup is
    compared with these single-subgroup limits on purpose: a window holds m ~ n_samples / n
    subgroups, and narrowing the limits by sqrt(m) would assume the samples of a window are
    independent, which a vibration or mains-current signal is not (its window mean wanders by
    a fraction of its amplitude with the phase at which the window starts). The price is
    sensitivity: the X-bar chart fires on a mean shift beyond 3 sigma / sqrt(n) (sigma = the
    short-term sigma, R-bar / d2), the R chart on a spread increase of D4 (2.11x for n = 5).

    score: the larger of |X-bar - X-dbar| / sigma_xbar (sigma_xbar = A2 R-bar / 3, so 3 is
    the X-bar limit) and |R - R-bar| / sigma_R (sigma_R = (D4 - 1) R-bar / 3, so 3 is the
    upper R limit): sigma units like ControlChart's |z|. out_of_control after `run` windows
    in a row with score > k_sigma, as ControlChart does. At the default k_sigma = 3 the
    limits are the tabulated ones: X-dbar +- A2 R-bar, and max(0, R-bar - 3 sigma_R) = D3 R-bar
    .. R-bar + 3 sigma_R = D4 R-bar (for n <= 6 D3 is 0: R has no lower limit); another
    k_sigma moves them to k sigma, so that spc.k_sigma means the same for both charts. Like
    ControlChart's, k_sigma and run are plain attributes, changed live by a config push.
    """

    def __init__(self, calibration=20, subgroup=5, run=2, k_sigma=3.0):
        if calibration < 2:
            raise ValueError("calibration must be at least 2 windows, got %r" % calibration)
        if subgroup not in _XBAR_R:
            raise ValueError("subgroup must be 2..10 samples (the tabulated X-bar/R constants), got %r"
                             % (subgroup,))
        if run < 1:
            raise ValueError("run must be at least 1 window, got %r" % run)
        if not k_sigma > 0:
            raise ValueError("k_sigma must be > 0, got %r" % (k_sigma,))
        self.calibration = calibration
        self.subgroup = subgroup
        self.run = run
        self.k_sigma = k_sigma
        self.a2, self.d3, self.d4, self.d2 = _XBAR_R[subgroup]
        self.n = 0  # windows seen while calibrating
        self._sum_x = 0.0
        self._sum_r = 0.0
        self.xbarbar = 0.0
        self.rbar = 0.0
        self.sigma_xbar = self.sigma_r = 0.0
        self.xbar = 0.0  # the last window's chart point
        self.r = 0.0
        self._outside = 0

    @property
    def ready(self):
        return self.n >= self.calibration

    @property
    def sigma(self):
        """The short-term (within-subgroup) sigma, R-bar / d2, once calibrated."""
        return self.rbar / self.d2

    # The control limits at the current k_sigma (for display and tests: update_window
    # compares the score with k_sigma, which is the same test).
    @property
    def x_lcl(self):
        return self.xbarbar - self.k_sigma * self.sigma_xbar

    @property
    def x_ucl(self):
        return self.xbarbar + self.k_sigma * self.sigma_xbar

    @property
    def r_lcl(self):
        lcl = self.rbar - self.k_sigma * self.sigma_r
        return lcl if lcl > 0.0 else 0.0

    @property
    def r_ucl(self):
        return self.rbar + self.k_sigma * self.sigma_r

    def update_window(self, buf):
        """Feed one window of raw samples; return (score, out_of_control)."""
        g = self.subgroup
        groups = len(buf) // g
        if groups < 1:
            raise ValueError("a window of %d samples has no subgroup of %d" % (len(buf), g))
        sx = 0.0
        sr = 0.0
        i = 0
        for _ in range(groups):
            x = buf[i]
            s = x
            lo = x
            hi = x
            for j in range(i + 1, i + g):
                x = buf[j]
                s += x
                if x < lo:
                    lo = x
                elif x > hi:
                    hi = x
            sx += s
            sr += hi - lo
            i += g
        xbar = sx / (groups * g)
        r = sr / groups
        self.xbar = xbar
        self.r = r
        if self.n < self.calibration:
            self.n += 1
            self._sum_x += xbar
            self._sum_r += r
            if self.n == self.calibration:
                self._limits()
            return 0.0, False
        zx = abs(xbar - self.xbarbar) / self.sigma_xbar
        zr = abs(r - self.rbar) / self.sigma_r
        z = zx if zx > zr else zr
        # z > k_sigma is "beyond a limit": an R below R-bar - k sigma_R has zr > k_sigma, and
        # when that lower limit is below 0 (clipped to 0) no R (>= 0) gets there.
        if z > self.k_sigma:
            self._outside += 1
        else:
            self._outside = 0
        return z, self._outside >= self.run

    def _limits(self):
        self.xbarbar = self._sum_x / self.n
        # A floor on R-bar keeps a perfectly flat (or quantised-flat) signal from alarming on
        # rounding, as ControlChart's floor on sigma does.
        self.rbar = max(self._sum_r / self.n, 1e-6 * (abs(self.xbarbar) + 1.0))
        self.sigma_xbar = self.a2 * self.rbar / 3.0
        self.sigma_r = (self.d4 - 1.0) * self.rbar / 3.0
