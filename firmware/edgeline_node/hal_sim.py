# Device code. The simulated HAL: a rotating machine (shaft vibration, bearing temperature,
# motor current) whose faults can be switched on, so a node runs without any hardware.
# Every HAL fills caller-owned float arrays of one window; nothing is allocated per window.
import math
import random

from .compat import const

_TWO_PI = 2 * math.pi
_BPFO_RATIO = 3.58  # outer-race defect frequency / shaft frequency of a typical 6205 bearing

FAULTS = ("none", "bearing", "imbalance")

# name, unit: what this HAL measures; the node's birth announces them.
SENSORS = (("vibration", "g"), ("temperature", "degC"), ("current", "A"))

_VIB = const(0)
_TEMP = const(1)
_CUR = const(2)


class SimulatedMachine:
    """A seeded rotating machine sampled at `rate_hz`, read one window at a time."""

    def __init__(self, seed=1, rate_hz=1000, shaft_hz=None):
        random.seed(seed)
        self.rate_hz = rate_hz
        # Each machine differs a little, as real ones do.
        self.shaft_hz = shaft_hz or 24.0 + (seed % 7) * 0.5
        self.vib_amp = 0.5 + (seed % 5) * 0.02
        self.temp_base = 38.0 + (seed % 4)
        self.cur_rms = 9.0 + (seed % 3) * 0.5
        self.fault = "none"
        self._t = 0.0  # simulated time of the next sample, s
        self._heat = 0.0  # temperature rise from a fault, degC
        self._spare = None  # the second Box-Muller normal

    def sensors(self):
        return SENSORS

    def set_fault(self, name):
        if name not in FAULTS:
            raise ValueError("unknown fault %r: use one of %s" % (name, ", ".join(FAULTS)))
        self.fault = name

    def _gauss(self):
        if self._spare is not None:
            z = self._spare
            self._spare = None
            return z
        u1 = random.random() or 1e-12
        u2 = random.random()
        r = math.sqrt(-2.0 * math.log(u1))
        self._spare = r * math.sin(_TWO_PI * u2)
        return r * math.cos(_TWO_PI * u2)

    def read_window(self, bufs):
        """Fill bufs[i] (one float array per sensor, all the same length) with fresh samples."""
        n = len(bufs[0])
        dt = 1.0 / self.rate_hz
        vib = bufs[_VIB]
        temp = bufs[_TEMP]
        cur = bufs[_CUR]
        fault = self.fault
        w_shaft = _TWO_PI * self.shaft_hz
        imbalance = 2.2 if fault == "imbalance" else 1.0
        bearing = fault == "bearing"
        bpfo_period = 1.0 / (self.shaft_hz * _BPFO_RATIO)
        # A fault heats the bearing slowly, as friction does; without one it cools back.
        if fault != "none":
            self._heat = min(self._heat + 0.4, 15.0)
        else:
            self._heat = max(self._heat - 0.4, 0.0)
        cur_amp = self.cur_rms * 1.41421356 * (1.08 if fault != "none" else 1.0)
        t = self._t
        for i in range(n):
            v = self.vib_amp * imbalance * math.sin(w_shaft * t)
            v += 0.15 * self.vib_amp * math.sin(2 * w_shaft * t + 0.7)
            if bearing:
                # Decaying ringing after each outer-race impact.
                tau = t % bpfo_period
                v += 1.6 * math.exp(-tau * 900.0) * math.sin(_TWO_PI * 3000.0 * tau)
            vib[i] = v + 0.05 * self._gauss()
            temp[i] = self.temp_base + self._heat + 0.05 * self._gauss()
            cur[i] = cur_amp * math.sin(_TWO_PI * 50.0 * t) + 0.1 * self._gauss()
            t += dt
        self._t = t
