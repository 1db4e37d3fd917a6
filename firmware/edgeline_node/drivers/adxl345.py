# Device code. Analog Devices ADXL345 3-axis accelerometer on I2C (datasheet Rev. G).
#
# Full-resolution mode (3.9 mg/LSB on every range), stream FIFO of 32 samples, so the chip is
# the sample clock and reads can lag by up to 32 samples without losing any. Registers are
# little-endian, two's complement, right-justified and sign-extended by the chip.
#
# Rates above 800 Hz need a bus faster than 400 kHz I2C to be drained continuously (the
# datasheet recommends SPI >= 2 MHz for 1600/3200 Hz): the FIFO then overruns, which the
# driver reports through overrun() rather than hiding.
from ..compat import const

TYPE_CHECKING = const(0)
if TYPE_CHECKING:
    from machine import I2C

_DEVID = const(0x00)
_DEVID_VALUE = const(0xE5)
_BW_RATE = const(0x2C)
_POWER_CTL = const(0x2D)
_INT_SOURCE = const(0x30)
_DATA_FORMAT = const(0x31)
_DATAX0 = const(0x32)
_FIFO_CTL = const(0x38)
_FIFO_STATUS = const(0x39)

_MEASURE = const(0x08)  # POWER_CTL: measurement mode
_FULL_RES = const(0x08)  # DATA_FORMAT: 3.9 mg/LSB whatever the range
_FIFO_BYPASS = const(0x00)
_FIFO_STREAM = const(0x80)  # keep the newest 32 samples
_WATERMARK = const(16)
_DATA_READY = const(0x80)  # INT_SOURCE
_OVERRUN = const(0x01)  # INT_SOURCE
_ENTRIES = const(0x3F)  # FIFO_STATUS
FIFO_DEPTH = const(32)

ADDR = const(0x53)  # SDO/ALT ADDRESS pin low (most breakout boards)
ADDR_ALT = const(0x1D)  # SDO high
SCALE_G = 0.0039  # g per LSB in full-resolution mode (datasheet Table 1, typical)
RANGES_G = (2, 4, 8, 16)
# Output data rates that are whole numbers of Hz; BW_RATE code 0x0F is 3200 Hz, each step
# down halves it.
RATES_HZ = (3200, 1600, 800, 400, 200, 100, 50, 25)
AXES = "xyz"


def rate_code(rate_hz):
    for i in range(len(RATES_HZ)):
        if RATES_HZ[i] == rate_hz:
            return 0x0F - i
    raise ValueError("the ADXL345 has no %r Hz output data rate: use one of %s"
                     % (rate_hz, ", ".join(str(r) for r in RATES_HZ)))


def range_code(range_g):
    for i in range(len(RANGES_G)):
        if RANGES_G[i] == range_g:
            return i
    raise ValueError("the ADXL345 has no +-%r g range: use one of 2, 4, 8, 16" % (range_g,))


class ADXL345:
    """One ADXL345. `fifo=True`: stream mode, drain with available()/read(); False: polled."""

    def __init__(self, i2c, addr=ADDR, rate_hz=3200, range_g=16, fifo=True):
        # type: (I2C, int, int, int, bool) -> None
        self.i2c = i2c
        self.addr = addr
        self.rate_hz = rate_hz
        self.fifo = fifo
        self._b1 = bytearray(1)
        self._xyz = bytearray(6)
        rate = rate_code(rate_hz)
        rng = range_code(range_g)
        devid = self._read8(_DEVID)
        if devid != _DEVID_VALUE:
            raise ValueError("no ADXL345 at I2C address 0x%02x: DEVID reads 0x%02x, expected 0xe5"
                             % (addr, devid))
        # Configure in standby (datasheet: change settings with measurement off).
        self._write8(_POWER_CTL, 0)
        self._write8(_DATA_FORMAT, _FULL_RES | rng)
        self._write8(_BW_RATE, rate)
        self._write8(_POWER_CTL, _MEASURE)
        self.restart()

    def _read8(self, reg):
        self.i2c.readfrom_mem_into(self.addr, reg, self._b1)
        return self._b1[0]

    def _write8(self, reg, value):
        self._b1[0] = value
        self.i2c.writeto_mem(self.addr, reg, self._b1)

    def restart(self):
        """Drop samples taken so far (bypass mode clears the FIFO) and the overrun flag."""
        self._write8(_FIFO_CTL, _FIFO_BYPASS)
        if self.fifo:
            self._write8(_FIFO_CTL, _FIFO_STREAM | _WATERMARK)

    def available(self):
        """Samples ready to read: FIFO entries (0-32), or 0/1 (data ready) when polled."""
        if self.fifo:
            return self._read8(_FIFO_STATUS) & _ENTRIES
        return 1 if self._read8(_INT_SOURCE) & _DATA_READY else 0

    def overrun(self):
        """True when samples were lost because the FIFO (or data register) was not read in time."""
        return bool(self._read8(_INT_SOURCE) & _OVERRUN)

    def _sample(self):
        # One 6-byte burst: the datasheet requires a multi-byte read so that the three axes
        # belong to one sample and one FIFO entry is popped.
        self.i2c.readfrom_mem_into(self.addr, _DATAX0, self._xyz)

    def _axis(self, axis):
        b = self._xyz
        v = b[2 * axis] | (b[2 * axis + 1] << 8)
        return v - 0x10000 if v & 0x8000 else v

    def read_raw(self, axis=2):
        """Pop one sample; return the raw LSB count of axis 0 (x), 1 (y) or 2 (z)."""
        self._sample()
        return self._axis(axis)

    def read(self, axis=2):
        """Pop one sample; return axis 0 (x), 1 (y) or 2 (z) in g."""
        self._sample()
        return self._axis(axis) * SCALE_G

    def read_xyz(self, out):
        """Pop one sample into out[0:3] (a float array or list), in g."""
        self._sample()
        out[0] = self._axis(0) * SCALE_G
        out[1] = self._axis(1) * SCALE_G
        out[2] = self._axis(2) * SCALE_G
        return out
