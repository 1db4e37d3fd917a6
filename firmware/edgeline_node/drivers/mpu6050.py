# Device code. InvenSense MPU-6050 accelerometer (its gyro unused) on I2C (register map
# rev. 4.2). Registers are big-endian two's complement. The accelerometer's data rate is
# 1 kHz / (1 + SMPLRT_DIV) with the low-pass filter on, so the chip's own clock paces the
# samples into its 1024-byte FIFO (170 samples of x, y, z) and reads may lag without loss.
from ..compat import const, sleep_ms

TYPE_CHECKING = const(0)
if TYPE_CHECKING:
    from machine import I2C

_SMPLRT_DIV = const(0x19)
_CONFIG = const(0x1A)
_ACCEL_CONFIG = const(0x1C)
_FIFO_EN = const(0x23)
_INT_STATUS = const(0x3A)
_ACCEL_XOUT_H = const(0x3B)
_USER_CTRL = const(0x6A)
_PWR_MGMT_1 = const(0x6B)
_FIFO_COUNTH = const(0x72)
_FIFO_R_W = const(0x74)
_WHO_AM_I = const(0x75)

_WHO_AM_I_VALUE = const(0x68)
_DEVICE_RESET = const(0x80)  # PWR_MGMT_1; clears itself when the reset is done
_CLK_PLL_XGYRO = const(0x01)  # PWR_MGMT_1: awake, clocked from the x gyro's PLL (datasheet advice)
_ACCEL_FIFO = const(0x08)  # FIFO_EN: accelerometer x, y, z (6 bytes a sample)
_USER_FIFO_EN = const(0x40)
_USER_FIFO_RESET = const(0x04)
_FIFO_OFLOW = const(0x10)  # INT_STATUS, cleared by reading it
_DATA_RDY = const(0x01)  # INT_STATUS
_FIFO_BYTES = const(1024)
_SAMPLE_BYTES = const(6)
FIFO_DEPTH = const(170)  # whole samples the FIFO holds (1024 // 6)

ADDR = const(0x68)  # AD0 low
ADDR_ALT = const(0x69)  # AD0 high
# The whole-Hz rates 1 kHz / (1 + SMPLRT_DIV) gives, fastest first.
RATES_HZ = (1000, 500, 250, 200, 125, 100, 50, 40, 25, 20, 10, 8, 5, 4)
RANGES_G = (2, 4, 8, 16)  # AFS_SEL 0-3: 16384, 8192, 4096, 2048 LSB/g
# DLPF_CFG 1-6 and the accelerometer bandwidth each gives, Hz (register map, CONFIG).
_DLPF_BW_HZ = (184, 94, 44, 21, 10, 5)
AXES = "xyz"


def sample_divider(rate_hz):
    """SMPLRT_DIV for an accelerometer rate of exactly rate_hz (1 kHz base with the DLPF on)."""
    if isinstance(rate_hz, int) and 4 <= rate_hz <= 1000 and 1000 % rate_hz == 0:
        return 1000 // rate_hz - 1
    raise ValueError("the MPU-6050 samples at 1000/n Hz (n = 1-256): %r Hz is not one of them; "
                     "use e.g. 1000, 500, 250, 200, 125, 100, 50" % (rate_hz,))


def dlpf_config(rate_hz):
    """The widest low-pass filter that stays under rate/2 (anti-aliasing), else the narrowest."""
    for i in range(len(_DLPF_BW_HZ)):
        if 2 * _DLPF_BW_HZ[i] <= rate_hz:
            return i + 1
    return len(_DLPF_BW_HZ)


def range_code(range_g):
    for i in range(len(RANGES_G)):
        if RANGES_G[i] == range_g:
            return i
    raise ValueError("the MPU-6050 has no +-%r g range: use one of 2, 4, 8, 16" % (range_g,))


class MPU6050:
    """One MPU-6050. `fifo=True`: samples queue in the chip's FIFO; False: polled."""

    def __init__(self, i2c, addr=ADDR, rate_hz=1000, range_g=16, fifo=True):
        # type: (I2C, int, int, int, bool) -> None
        self.i2c = i2c
        self.addr = addr
        self.rate_hz = rate_hz
        self.fifo = fifo
        self._b1 = bytearray(1)
        self._b2 = bytearray(2)
        self._xyz = bytearray(6)
        div = sample_divider(rate_hz)
        afs = range_code(range_g)
        self.scale_g = 1.0 / (16384 >> afs)
        who = self._read8(_WHO_AM_I)
        if who != _WHO_AM_I_VALUE:
            raise ValueError("no MPU-6050 at I2C address 0x%02x: WHO_AM_I reads 0x%02x, expected 0x68"
                             % (addr, who))
        self._write8(_PWR_MGMT_1, _DEVICE_RESET)
        for _ in range(20):  # the bit clears itself; the register map allows up to 100 ms
            sleep_ms(5)
            if not self._read8(_PWR_MGMT_1) & _DEVICE_RESET:
                break
        else:
            raise OSError("MPU-6050 at 0x%02x did not come out of reset" % addr)
        self._write8(_PWR_MGMT_1, _CLK_PLL_XGYRO)  # wake up (reset leaves it asleep)
        self._write8(_CONFIG, dlpf_config(rate_hz))
        self._write8(_SMPLRT_DIV, div)
        self._write8(_ACCEL_CONFIG, afs << 3)
        self._write8(_FIFO_EN, _ACCEL_FIFO if fifo else 0)
        self.restart()

    def _read8(self, reg):
        self.i2c.readfrom_mem_into(self.addr, reg, self._b1)
        return self._b1[0]

    def _write8(self, reg, value):
        self._b1[0] = value
        self.i2c.writeto_mem(self.addr, reg, self._b1)

    def restart(self):
        """Empty the FIFO and clear the overflow flag; samples queue again from now."""
        if self.fifo:
            self._write8(_USER_CTRL, 0)  # FIFO_RESET acts only while FIFO_EN is 0
            self._write8(_USER_CTRL, _USER_FIFO_RESET)
            self._write8(_USER_CTRL, _USER_FIFO_EN)
        self._read8(_INT_STATUS)  # reading clears FIFO_OFLOW

    def _fifo_count(self):
        self.i2c.readfrom_mem_into(self.addr, _FIFO_COUNTH, self._b2)
        return (self._b2[0] << 8) | self._b2[1]

    def available(self):
        """Whole samples ready: FIFO bytes // 6, or 0/1 (data ready) when polled."""
        if self.fifo:
            return self._fifo_count() // _SAMPLE_BYTES
        return 1 if self._read8(_INT_STATUS) & _DATA_RDY else 0

    def overrun(self):
        """True when the FIFO overflowed since the last look. Its oldest bytes were lost and,
        as 1024 is no multiple of 6, sample boundaries too: call restart() before reading on."""
        return bool(self._read8(_INT_STATUS) & _FIFO_OFLOW)

    def _sample(self):
        reg = _FIFO_R_W if self.fifo else _ACCEL_XOUT_H
        self.i2c.readfrom_mem_into(self.addr, reg, self._xyz)

    def _axis(self, axis):
        b = self._xyz
        v = (b[2 * axis] << 8) | b[2 * axis + 1]
        return v - 0x10000 if v & 0x8000 else v

    def read_raw(self, axis=2):
        """Take one sample; return the raw LSB count of axis 0 (x), 1 (y) or 2 (z)."""
        self._sample()
        return self._axis(axis)

    def read(self, axis=2):
        """Take one sample; return axis 0 (x), 1 (y) or 2 (z) in g."""
        self._sample()
        return self._axis(axis) * self.scale_g

    def read_xyz(self, out):
        """Take one sample into out[0:3] (a float array or list), in g."""
        self._sample()
        s = self.scale_g
        out[0] = self._axis(0) * s
        out[1] = self._axis(1) * s
        out[2] = self._axis(2) * s
        return out
