# Device code. The RP2040 (Raspberry Pi Pico / Pico W) board HAL: I2C only on the pins each
# controller can reach, a virtual machine.Timer for timer pacing, ADC0-2 on GPIO 26-28
# read against the 3.3 V reference (GPIO 29 is VSYS/3 on the Pico and the Wi-Fi chip's
# clock on the Pico W, so it is not offered). Everything shared is in hal_board.py.
from .hal_board import BoardHAL, HalError

# (SDA pins, SCL pins) per I2C controller (RP2040 datasheet, GPIO function table).
_I2C_PINS = (
    ((0, 4, 8, 12, 16, 20, 24, 28), (1, 5, 9, 13, 17, 21, 25, 29)),
    ((2, 6, 10, 14, 18, 22, 26), (3, 7, 11, 15, 19, 23, 27)),
)
_ADC_PINS = (26, 27, 28)
_VREF = 3.3


def pin_problem(hal, chip=None):
    """(config key, what is wrong) for pins the RP2040 cannot use this way, or None."""
    i2c = hal["i2c"]
    if i2c["scl"] is not None:
        sda_ok, scl_ok = _I2C_PINS[i2c["id"]]
        if i2c["sda"] not in sda_ok:
            return ("i2c.sda", "GPIO %r is no SDA pin of I2C%d: use one of %s"
                    % (i2c["sda"], i2c["id"], ", ".join(str(p) for p in sda_ok)))
        if i2c["scl"] not in scl_ok:
            return ("i2c.scl", "GPIO %r is no SCL pin of I2C%d: use one of %s"
                    % (i2c["scl"], i2c["id"], ", ".join(str(p) for p in scl_ok)))
    pin = hal["adc"]["pin"]
    if pin is not None and pin not in _ADC_PINS:
        return ("adc.pin", "must be GPIO 26, 27 or 28 (ADC0-2), got %r" % (pin,))
    return None


class RP2040HAL(BoardHAL):
    BOARD = "rp2040"
    TIMER_ID = -1  # the virtual (software-scheduled) timer

    def __init__(self, cfg_hal, machine=None, onewire=None):
        problem = pin_problem(cfg_hal)
        if problem is not None:
            raise HalError("config key %r %s" % ("hal." + problem[0], problem[1]))
        BoardHAL.__init__(self, cfg_hal, machine, onewire)

    def _make_adc(self, pin):
        return self._m.ADC(self._m.Pin(pin))

    def _adc_volts(self):
        return self._adc.read_u16() * (_VREF / 65535)
