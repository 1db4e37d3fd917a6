# Device code. Maxim DS18B20 1-Wire temperature sensor, without blocking: start() a
# conversion, go on sampling, read() once ready() (750 ms at 12 bits). Works with parasite
# power too, as readiness is timed rather than polled on the bus.
#
# The bus object is MicroPython's onewire.OneWire (reset, writebyte, write, readinto, scan)
# or a test's fake with the same methods. Every scratchpad read is checked with the
# Dallas/Maxim CRC-8 and the chip's fixed bits, so a shorted or open bus (all 0x00 or all
# 0xFF, whose CRC happens to check) is an error, never a temperature.
from ..compat import const, ticks_diff, ticks_ms

TYPE_CHECKING = const(0)
if TYPE_CHECKING:
    from onewire import OneWire

_MATCH_ROM = const(0x55)
_SKIP_ROM = const(0xCC)
_CONVERT_T = const(0x44)
_READ_SCRATCH = const(0xBE)
_WRITE_SCRATCH = const(0x4E)
FAMILY = const(0x28)
_CONFIG_FIXED = const(0x1F)  # scratchpad byte 4: bits 0-4 always read 1
_RESERVED_5 = const(0xFF)  # scratchpad byte 5 always reads 0xFF

RESOLUTIONS = (9, 10, 11, 12)
CONVERSION_MS = (94, 188, 375, 750)  # maximum conversion time per resolution (datasheet)


def crc8(buf, n):
    """Dallas/Maxim CRC-8 (x^8 + x^5 + x^4 + 1, reflected) of buf[0:n]; 0 over data + CRC."""
    crc = 0
    for i in range(n):
        b = buf[i]
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


class DS18B20:
    """One DS18B20 on a 1-Wire bus; `rom` picks it when several share the bus."""

    def __init__(self, ow, rom=None, resolution=12):
        # type: (OneWire, bytes | None, int) -> None
        if resolution not in RESOLUTIONS:
            raise ValueError("DS18B20 resolution must be 9, 10, 11 or 12 bits, got %r" % (resolution,))
        self.ow = ow
        self._scratch = bytearray(9)
        self._cfg = bytearray(3)  # TH, TL, configuration
        self._rom = bytearray(8)
        self.roms = [bytes(r) for r in ow.scan() if r[0] == FAMILY]
        if rom is None:
            if not self.roms:
                raise ValueError("no DS18B20 (family 0x28) answers on the 1-Wire bus")
            rom = self.roms[0]
        elif bytes(rom) not in self.roms:
            raise ValueError("no DS18B20 with ROM %s on the 1-Wire bus" % bytes(rom).hex())
        self._rom[:] = rom
        self.resolution = resolution
        self.conversion_ms = CONVERSION_MS[resolution - 9]
        self._mask = ~((1 << (12 - resolution)) - 1)  # bits a lower resolution leaves undefined
        self._t0 = ticks_ms()
        self.busy = False
        # Keep the alarm bytes, set the resolution.
        self._read_scratch()
        self._cfg[0] = self._scratch[2]
        self._cfg[1] = self._scratch[3]
        self._cfg[2] = ((resolution - 9) << 5) | _CONFIG_FIXED
        self._select()
        self.ow.writebyte(_WRITE_SCRATCH)
        self.ow.write(self._cfg)

    def _select(self):
        if not self.ow.reset():
            raise OSError("DS18B20 %s: no presence pulse on the 1-Wire bus" % bytes(self._rom).hex())
        self.ow.writebyte(_MATCH_ROM)
        self.ow.write(self._rom)

    def _read_scratch(self):
        self._select()
        self.ow.writebyte(_READ_SCRATCH)
        s = self._scratch
        self.ow.readinto(s)
        if crc8(s, 9) != 0 or s[4] & _CONFIG_FIXED != _CONFIG_FIXED or s[5] != _RESERVED_5:
            raise OSError("DS18B20 %s: bad scratchpad %s (CRC or fixed bits): check wiring and the "
                          "4.7k pull-up" % (bytes(self._rom).hex(), bytes(s).hex()))

    def start(self):
        """Start a temperature conversion; it is ready() conversion_ms later."""
        self._select()
        self.ow.writebyte(_CONVERT_T)
        self._t0 = ticks_ms()
        self.busy = True

    def ready(self):
        return self.busy and ticks_diff(ticks_ms(), self._t0) >= self.conversion_ms

    def read(self):
        """The last conversion's temperature in degC (call once ready())."""
        self._read_scratch()
        self.busy = False
        s = self._scratch
        raw = s[0] | (s[1] << 8)
        if raw & 0x8000:
            raw -= 0x10000
        return (raw & self._mask) / 16.0
