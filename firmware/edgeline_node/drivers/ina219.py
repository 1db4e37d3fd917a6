# Device code. TI INA219 high-side current / bus voltage monitor on I2C (datasheet SBOS448G).
# 16-bit big-endian registers. The chip computes current itself once the calibration
# register holds trunc(0.04096 / (current_LSB * R_shunt)); a brown-out resets that register
# to 0 (current then reads 0), so check_calibration() restores it when the HAL asks.
from ..compat import const

TYPE_CHECKING = const(0)
if TYPE_CHECKING:
    from machine import I2C

_CONFIG = const(0x00)
_SHUNT = const(0x01)
_BUS = const(0x02)
_POWER = const(0x03)
_CURRENT = const(0x04)
_CAL = const(0x05)

_RESET = const(0x8000)
_POR_CONFIG = const(0x399F)  # CONFIG after a reset: 32 V, /8 gain, 12-bit, continuous
_BRNG_32V = const(0x2000)
_ADC_12BIT = const(0x3)  # BADC/SADC: one 12-bit conversion, 532 us
_MODE_CONTINUOUS = const(0x7)  # shunt and bus, continuous
_BUS_OVF = const(0x01)  # BUS register: math overflow

ADDR = const(0x40)  # A0 = A1 = GND; 0x40-0x4F by strapping
SHUNT_LSB_V = 10e-6
BUS_LSB_V = 0.004
# PGA full-scale shunt voltages, V, for gain code PG = 0..3.
_PGA_RANGE_V = (0.04, 0.08, 0.16, 0.32)


def calibration(shunt_ohm, max_a):
    """(CAL register value, current LSB in A, PGA code) for a shunt and the largest current."""
    if not shunt_ohm > 0 or not max_a > 0:
        raise ValueError("INA219 shunt_ohm and max_a must be positive, got %r and %r" % (shunt_ohm, max_a))
    v_max = shunt_ohm * max_a * 0.999999  # 0.1 ohm * 3.2 A is 0.32 V, not 0.32000000000000006
    pg = 0
    while pg < len(_PGA_RANGE_V) and _PGA_RANGE_V[pg] < v_max:
        pg += 1
    if pg == len(_PGA_RANGE_V):
        raise ValueError("INA219: %r A through %r ohm is %.3f V across the shunt, over the 0.32 V "
                         "it measures: use a smaller shunt_ohm" % (max_a, shunt_ohm, v_max))
    cal = int(0.04096 / (max_a / 32768 * shunt_ohm)) & 0xFFFE  # bit 0 is void
    if cal == 0:
        raise ValueError("INA219: max_a %r with shunt_ohm %r gives calibration 0" % (max_a, shunt_ohm))
    cal = min(cal, 0xFFFE)
    return cal, 0.04096 / (cal * shunt_ohm), pg


class INA219:
    def __init__(self, i2c, addr=ADDR, shunt_ohm=0.1, max_a=3.2):
        # type: (I2C, int, float, float) -> None
        self.i2c = i2c
        self.addr = addr
        self._b2 = bytearray(2)
        self.cal, self.current_lsb, pg = calibration(shunt_ohm, max_a)
        self.config = _BRNG_32V | (pg << 11) | (_ADC_12BIT << 7) | (_ADC_12BIT << 3) | _MODE_CONTINUOUS
        # The INA219 has no ID register: a reset must bring back the documented CONFIG.
        self._write16(_CONFIG, _RESET)
        got = self._read16(_CONFIG)
        if got != _POR_CONFIG:
            raise ValueError("no INA219 at I2C address 0x%02x: CONFIG reads 0x%04x after reset, "
                             "expected 0x399f" % (addr, got))
        self._program()
        self.recalibrations = 0

    def _read16(self, reg):
        self.i2c.readfrom_mem_into(self.addr, reg, self._b2)
        return (self._b2[0] << 8) | self._b2[1]

    def _read_s16(self, reg):
        v = self._read16(reg)
        return v - 0x10000 if v & 0x8000 else v

    def _write16(self, reg, value):
        self._b2[0] = value >> 8
        self._b2[1] = value & 0xFF
        self.i2c.writeto_mem(self.addr, reg, self._b2)

    def _program(self):
        self._write16(_CONFIG, self.config)
        self._write16(_CAL, self.cal)

    def check_calibration(self):
        """Re-program after a brown-out reset the chip; True when nothing had to be done."""
        if self._read16(_CAL) == self.cal and self._read16(_CONFIG) == self.config:
            return True
        self._program()
        self.recalibrations += 1
        return False

    def current(self):
        """Shunt current in A (negative when it flows backwards)."""
        return self._read_s16(_CURRENT) * self.current_lsb

    def shunt_voltage(self):
        """Volts across the shunt."""
        return self._read_s16(_SHUNT) * SHUNT_LSB_V

    def bus_voltage(self):
        """Volts from IN- to ground; raises OSError when the chip flags a math overflow."""
        v = self._read16(_BUS)
        if v & _BUS_OVF:
            raise OSError("INA219 at 0x%02x: overflow (current beyond max_a or shunt range)" % self.addr)
        return (v >> 3) * BUS_LSB_V

    def power(self):
        """Watts (the chip multiplies current by bus voltage; its LSB is 20 current LSBs)."""
        return self._read16(_POWER) * 20 * self.current_lsb
