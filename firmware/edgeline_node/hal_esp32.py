# Device code. The ESP32 / ESP32-S3 board HAL: I2C on any output-capable pins (null pins:
# the port's defaults), a hardware Timer for timer pacing, ADC1 inputs with 11 dB
# attenuation (about 0-3.1 V, factory-calibrated by read_uv). ADC2 is not offered: the
# Wi-Fi driver owns it while the station is up. Everything shared is in hal_board.py.
import sys

from .hal_board import BoardHAL, HalError

# ADC1 GPIOs: ESP32 32-39, ESP32-S3 1-10.
_ADC1_ESP32 = (32, 33, 34, 35, 36, 37, 38, 39)
_ADC1_ESP32S3 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
# Input-only pins of the classic ESP32: they cannot drive an open-drain I2C line.
_INPUT_ONLY_ESP32 = (34, 35, 36, 37, 38, 39)


def variant():
    """'esp32s3' or 'esp32', from the firmware's machine description."""
    name = getattr(sys.implementation, "_machine", "")
    return "esp32s3" if "ESP32S3" in name.replace("-", "").upper() else "esp32"


def pin_problem(hal, chip=None):
    """(config key, what is wrong) for pins this board cannot use, or None. `chip`: 'esp32' or
    'esp32s3' when known (on the board); None checks only what holds for both."""
    pin = hal["adc"]["pin"]
    if pin is not None:
        ok = _ADC1_ESP32S3 if chip == "esp32s3" else _ADC1_ESP32 if chip == "esp32" else \
            _ADC1_ESP32 + _ADC1_ESP32S3
        if pin not in ok:
            return ("adc.pin", "must be an ADC1 input (ESP32: GPIO 32-39, ESP32-S3: GPIO 1-10), got %r"
                    % (pin,))
    if chip == "esp32":
        for key in ("scl", "sda"):
            if hal["i2c"][key] in _INPUT_ONLY_ESP32:
                return ("i2c." + key, "GPIO %d is input-only on the ESP32: pick an output-capable pin"
                        % hal["i2c"][key])
    return None


class ESP32HAL(BoardHAL):
    BOARD = "esp32"
    TIMER_ID = 0  # hardware timer group 0, timer 0

    def __init__(self, cfg_hal, machine=None, onewire=None, chip=None):
        self.chip = chip or variant()
        problem = pin_problem(cfg_hal, self.chip)
        if problem is not None:
            raise HalError("config key %r %s (this is an %s)" % ("hal." + problem[0], problem[1], self.chip))
        BoardHAL.__init__(self, cfg_hal, machine, onewire)

    def _make_adc(self, pin):
        m = self._m
        return m.ADC(m.Pin(pin), atten=m.ADC.ATTN_11DB)

    def _adc_volts(self):
        return self._adc.read_uv() * 1e-6
