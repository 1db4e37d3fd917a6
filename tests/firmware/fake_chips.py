"""Fake buses and register-level models of the sensor chips the board HALs drive.

Each model keeps the chip's register file byte for byte as its datasheet describes it
(reset values, auto-increment, read-only and self-clearing bits, FIFO pops, byte order), so
a driver test checks what the driver writes and how it scales what it reads against the
chip, not against the driver's own idea of the chip.

- FakeI2C: the machine.I2C methods the drivers use, routing transactions by address, NACKing
  (OSError ENODEV, as MicroPython's ESP32 port does) where nothing answers, logging each one.
- ADXL345Model, MPU6050Model, INA219Model: I2C register models.
- FakeOneWire and DS18B20Model: the onewire.OneWire primitives at byte level (reset/presence,
  ROM commands, function commands, wired-AND reads of several devices).

Samples come from a signal function of time: `produce(now_s)` queues every sample the chip's
output data rate would have produced by then, so FIFO fill, overrun and pacing behave as on
hardware when the clock is the real one.
"""

from __future__ import annotations

import errno
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

Signal = Callable[[float], tuple[float, float, float]]


def _s16(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


def _clip(v: int, bits: int) -> int:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return max(lo, min(hi, v))


class I2CDevice:
    addr: int

    def read(self, reg: int, n: int) -> bytes:
        raise NotImplementedError

    def write(self, reg: int, data: bytes) -> None:
        raise NotImplementedError


class FakeI2C:
    """machine.I2C as the drivers use it: scan, readfrom_mem(_into), writeto_mem."""

    def __init__(self, *devices: I2CDevice) -> None:
        self.devices = {d.addr: d for d in devices}
        self.log: list[tuple[str, int, int, bytes]] = []

    def _dev(self, addr: int) -> I2CDevice:
        dev = self.devices.get(addr)
        if dev is None:
            raise OSError(errno.ENODEV, "ENODEV")
        return dev

    def scan(self) -> list[int]:
        return sorted(self.devices)

    def readfrom_mem_into(self, addr: int, memaddr: int, buf: Any, /, *, addrsize: int = 8) -> None:
        assert addrsize == 8
        data = self._dev(addr).read(memaddr, len(buf))
        assert len(data) == len(buf)
        buf[:] = data
        self.log.append(("r", addr, memaddr, bytes(data)))

    def readfrom_mem(self, addr: int, memaddr: int, n: int, /, *, addrsize: int = 8) -> bytes:
        buf = bytearray(n)
        self.readfrom_mem_into(addr, memaddr, buf, addrsize=addrsize)
        return bytes(buf)

    def writeto_mem(self, addr: int, memaddr: int, buf: Any, /, *, addrsize: int = 8) -> None:
        assert addrsize == 8
        data = bytes(buf)
        self._dev(addr).write(memaddr, data)
        self.log.append(("w", addr, memaddr, data))

    def writes(self, addr: int | None = None) -> list[tuple[int, bytes]]:
        return [(reg, d) for op, a, reg, d in self.log if op == "w" and (addr is None or a == addr)]


class _Clocked:
    """Produces samples at the configured output data rate from a signal of time."""

    def __init__(self, signal: Signal | None, clock: Callable[[], float] | None) -> None:
        self.signal = signal
        self.clock = clock or time.monotonic
        self._t0: float | None = None
        self._made = 0
        self.history: list[tuple[int, int, int]] = []  # raw samples in the order produced

    def rate_hz(self) -> float:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def push(self, x: float, y: float, z: float) -> None:
        raise NotImplementedError

    def produce(self) -> None:
        if self.signal is None:
            return
        if not self.running():
            self._t0 = None
            return
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
            self._made = 0
        due = int((now - self._t0) * self.rate_hz())
        while self._made < due:
            self._made += 1
            self.push(*self.signal(self._made / self.rate_hz()))


class ADXL345Model(_Clocked, I2CDevice):
    """ADXL345 registers 0x00-0x39 (datasheet Rev. G, Table 19)."""

    RESET: ClassVar[dict[int, int]] = {0x00: 0xE5, 0x2C: 0x0A, 0x30: 0x02}

    def __init__(
        self,
        addr: int = 0x53,
        signal: Signal | None = None,
        clock: Callable[[], float] | None = None,
        devid: int = 0xE5,
    ) -> None:
        _Clocked.__init__(self, signal, clock)
        self.addr = addr
        self.regs = bytearray(0x40)
        for reg, v in self.RESET.items():
            self.regs[reg] = v
        self.regs[0x00] = devid
        self.fifo: deque[bytes] = deque()
        self.overrun = False
        self.latest = bytes(6)

    # -- physical side ---------------------------------------------------------------------
    def rate_hz(self) -> float:
        return 3200 / 2 ** (15 - (self.regs[0x2C] & 0x0F))

    def running(self) -> bool:
        return bool(self.regs[0x2D] & 0x08)

    def raw_for(self, g: float) -> int:
        fmt = self.regs[0x31]
        rng = fmt & 0x03
        if fmt & 0x08:  # full resolution: 3.9 mg/LSB, 10 + range bits
            return _clip(round(g / 0.0039), 10 + rng)
        return _clip(round(g / (0.0039 * (1 << rng))), 10)

    def encode(self, raw: int) -> bytes:
        fmt = self.regs[0x31]
        if fmt & 0x04:  # left-justified: MSB at bit 15
            bits = 10 + (fmt & 0x03) if fmt & 0x08 else 10
            raw <<= 16 - bits
        return (raw & 0xFFFF).to_bytes(2, "little")

    def push(self, x: float, y: float, z: float) -> None:
        if not self.running():
            return
        raws = tuple(self.raw_for(g) for g in (x, y, z))
        self.history.append(raws)  # type: ignore[arg-type]
        sample = b"".join(self.encode(r) for r in raws)
        mode = self.regs[0x38] >> 6
        if mode == 0:  # bypass: the data registers hold the newest sample
            if self.fifo:
                self.overrun = True
            self.fifo.clear()
            self.fifo.append(sample)
        elif len(self.fifo) == 32:
            self.overrun = True
            if mode == 2:  # stream: the oldest goes
                self.fifo.popleft()
                self.fifo.append(sample)
        else:
            self.fifo.append(sample)

    # -- bus side ----------------------------------------------------------------------------
    def _status(self) -> None:
        n = len(self.fifo)
        self.regs[0x39] = n & 0x3F
        src = 0
        if n:
            src |= 0x80  # DATA_READY
        if self.regs[0x38] >> 6 and n > (self.regs[0x38] & 0x1F):
            src |= 0x02  # watermark
        if self.overrun:
            src |= 0x01
        self.regs[0x30] = src
        self.regs[0x32:0x38] = self.fifo[0] if self.fifo else self.latest

    def read(self, reg: int, n: int) -> bytes:
        self.produce()
        self._status()
        out = bytes(self.regs[(reg + i) & 0x3F] for i in range(n))
        if reg <= 0x37 and reg + n > 0x32 and self.fifo:  # a read of the data registers pops
            self.latest = self.fifo.popleft()
            self.overrun = False
        return out

    def write(self, reg: int, data: bytes) -> None:
        self.produce()
        for i, v in enumerate(data):
            r = reg + i
            if r in (0x00, 0x30, 0x39) or 0x01 <= r <= 0x1C or 0x32 <= r <= 0x37:
                continue  # read-only or reserved
            self.regs[r] = v
            if r == 0x38 and v >> 6 == 0:  # bypass clears the FIFO
                self.fifo.clear()
                self.overrun = False


class MPU6050Model(_Clocked, I2CDevice):
    """MPU-6050 registers (register map rev. 4.2): accelerometer, FIFO, power management."""

    def __init__(
        self,
        addr: int = 0x68,
        signal: Signal | None = None,
        clock: Callable[[], float] | None = None,
        who: int = 0x68,
    ) -> None:
        _Clocked.__init__(self, signal, clock)
        self.addr = addr
        self.who = who
        self.resets = 0
        self._reset()

    def _reset(self) -> None:
        self.regs = bytearray(0x80)
        self.regs[0x6B] = 0x40  # asleep
        self.regs[0x75] = self.who
        self.fifo: deque[int] = deque()
        self.last_fifo_byte = 0

    def rate_hz(self) -> float:
        base = 8000 if self.regs[0x1A] & 0x07 in (0, 7) else 1000
        return base / (1 + self.regs[0x19])

    def running(self) -> bool:
        return not self.regs[0x6B] & 0x40

    def push(self, x: float, y: float, z: float) -> None:
        if not self.running():
            return
        lsb_per_g = 16384 >> ((self.regs[0x1C] >> 3) & 3)
        raws = tuple(_clip(round(g * lsb_per_g), 16) for g in (x, y, z))
        self.history.append(raws)  # type: ignore[arg-type]
        data = b"".join((r & 0xFFFF).to_bytes(2, "big") for r in raws)
        self.regs[0x3B:0x41] = data
        self.regs[0x3A] |= 0x01  # DATA_RDY
        if self.regs[0x6A] & 0x40 and self.regs[0x23] & 0x08:
            for b in data:
                if len(self.fifo) == 1024:  # the oldest byte goes, whatever sample it was in
                    self.fifo.popleft()
                    self.regs[0x3A] |= 0x10  # FIFO_OFLOW
                self.fifo.append(b)

    def read(self, reg: int, n: int) -> bytes:
        self.produce()
        out = bytearray()
        for i in range(n):
            if reg == 0x74:  # FIFO_R_W does not auto-increment: each read pops a byte
                if self.fifo:
                    self.last_fifo_byte = self.fifo.popleft()
                out.append(self.last_fifo_byte)
                continue
            r = reg + i
            if r == 0x72:
                out.append(len(self.fifo) >> 8)
            elif r == 0x73:
                out.append(len(self.fifo) & 0xFF)
            else:
                out.append(self.regs[r])
        if reg <= 0x3A < reg + n:
            self.regs[0x3A] = 0  # INT_STATUS clears on read
        return bytes(out)

    def write(self, reg: int, data: bytes) -> None:
        self.produce()
        for i, v in enumerate(data):
            r = reg + i
            if r in (0x3A, 0x75) or 0x3B <= r <= 0x60 or r in (0x72, 0x73):
                continue  # read-only
            if r == 0x6B and v & 0x80:  # DEVICE_RESET: every register back to its default
                self.resets += 1
                self._reset()
                continue
            if r == 0x6A:
                if v & 0x04 and not v & 0x40:  # FIFO_RESET acts while FIFO_EN is 0
                    self.fifo.clear()
                v &= ~0x04 & 0xFF  # self-clearing
            self.regs[r] = v


class INA219Model(I2CDevice):
    """INA219 (SBOS448G): 16-bit big-endian registers behind a register pointer."""

    PGA_COUNTS = (4000, 8000, 16000, 32000)  # shunt register full scale per PG setting

    def __init__(self, addr: int = 0x40, shunt_ohm: float = 0.1) -> None:
        self.addr = addr
        self.shunt_ohm = shunt_ohm
        self.amps = 0.0
        self.bus_v = 0.0
        self.power_cycle()

    def power_cycle(self) -> None:
        """A brown-out: every register back to its power-on value (calibration 0)."""
        self.config = 0x399F
        self.cal = 0

    def registers(self) -> dict[int, int]:
        pg = (self.config >> 11) & 3
        full = self.PGA_COUNTS[pg]
        shunt = max(-full, min(full, round(self.amps * self.shunt_ohm / 10e-6)))
        bus_raw = max(0, min(0x1FFF, round(self.bus_v / 0.004)))
        current = math.trunc(shunt * self.cal / 4096)
        ovf = not -32768 <= current <= 32767
        current = _clip(current, 16)
        power = math.trunc(abs(current) * bus_raw / 5000)
        return {
            0x00: self.config,
            0x01: shunt & 0xFFFF,
            0x02: (bus_raw << 3) | 0x02 | int(ovf),  # CNVR set: a conversion is ready
            0x03: min(power, 0xFFFF),
            0x04: current & 0xFFFF,
            0x05: self.cal,
        }

    def read(self, reg: int, n: int) -> bytes:
        if n != 2 or reg > 5:
            raise OSError(errno.EIO, "EIO")
        return self.registers()[reg].to_bytes(2, "big")

    def write(self, reg: int, data: bytes) -> None:
        if len(data) != 2 or reg not in (0x00, 0x05):
            raise OSError(errno.EIO, "EIO")
        v = int.from_bytes(data, "big")
        if reg == 0x00:
            if v & 0x8000:
                self.power_cycle()
            else:
                self.config = v & 0x3FFF  # bit 14 is reserved
        else:
            self.cal = v & 0xFFFE  # bit 0 is void


def crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


class DS18B20Model:
    """One DS18B20: ROM, scratchpad, conversion timing (datasheet 19-7487 Rev 6)."""

    CONV_MS: ClassVar[dict[int, float]] = {0x1F: 93.75, 0x3F: 187.5, 0x5F: 375.0, 0x7F: 750.0}

    def __init__(
        self, serial: int = 1, temp_c: float = 21.5, clock: Callable[[], float] | None = None
    ) -> None:
        body = bytes([0x28]) + serial.to_bytes(6, "little")
        self.rom = body + bytes([crc8(body)])
        self.temp_c = temp_c
        self.clock = clock or time.monotonic
        self.scratch = bytearray([0x50, 0x05, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10, 0])  # 85 degC at power-up
        self._seal()
        self.conv_done: float | None = None
        self.corrupt = False
        self.commands: list[int] = []
        self.state = "idle"
        self.out: deque[int] = deque()
        self.collect: list[int] = []

    def _seal(self) -> None:
        self.scratch[8] = crc8(bytes(self.scratch[:8]))

    def _update(self) -> None:
        if self.conv_done is not None and self.clock() >= self.conv_done:
            self.conv_done = None
            cfg = self.scratch[4]
            res = 9 + ((cfg >> 5) & 3)
            raw = round(self.temp_c * 16)
            undefined = (1 << (12 - res)) - 1
            raw |= undefined  # the datasheet leaves them undefined: make them 1 to catch drivers
            raw &= 0xFFFF
            self.scratch[0] = raw & 0xFF
            self.scratch[1] = raw >> 8
            self._seal()

    # -- bus primitives --------------------------------------------------------------------
    def reset(self) -> bool:
        self._update()
        self.state = "rom"
        self.out.clear()
        self.collect = []
        return True

    def write_byte(self, b: int) -> None:
        self._update()
        self.commands.append(b)
        if self.state == "rom":
            if b == 0xCC:
                self.state = "function"
            elif b == 0x55:
                self.state = "match"
                self.collect = []
            elif b == 0x33:
                self.out.extend(self.rom)
                self.state = "idle"
            else:
                self.state = "idle"
        elif self.state == "match":
            self.collect.append(b)
            if len(self.collect) == 8:
                self.state = "function" if bytes(self.collect) == self.rom else "idle"
        elif self.state == "function":
            if b == 0x44:
                self.conv_done = self.clock() + self.CONV_MS[self.scratch[4]] / 1000
                self.state = "idle"
            elif b == 0xBE:
                data = bytearray(self.scratch)
                if self.corrupt:
                    data[0] ^= 0x01
                self.out.extend(data)
                self.state = "idle"
            elif b == 0x4E:
                self.state = "write"
                self.collect = []
            else:
                self.state = "idle"
        elif self.state == "write":
            self.collect.append(b)
            if len(self.collect) == 3:
                self.scratch[2] = self.collect[0]
                self.scratch[3] = self.collect[1]
                self.scratch[4] = (self.collect[2] & 0x60) | 0x1F  # only R1:R0 are writable
                self._seal()
                self.state = "idle"

    def read_byte(self) -> int:
        self._update()
        return self.out.popleft() if self.out else 0xFF  # released bus reads 1s


class FakeOneWire:
    """onewire.OneWire's primitives over modelled devices; `stuck_low` models a shorted bus."""

    def __init__(self, *devices: DS18B20Model, stuck_low: bool = False) -> None:
        self.devices = list(devices)
        self.stuck_low = stuck_low
        self.written: list[int] = []
        self.resets = 0

    def reset(self, required: bool = False) -> bool:
        self.resets += 1
        present = self.stuck_low or any([d.reset() for d in self.devices])
        if required and not present:
            raise OSError("no presence")
        return present

    def writebyte(self, value: int) -> None:
        self.written.append(value)
        for d in self.devices:
            d.write_byte(value)

    def write(self, buf: Any) -> None:
        for b in bytes(buf):
            self.writebyte(b)

    def readbyte(self) -> int:
        if self.stuck_low:
            return 0
        v = 0xFF
        for d in self.devices:
            v &= d.read_byte()  # open drain: any device pulling low wins
        return v

    def readinto(self, buf: Any) -> None:
        for i in range(len(buf)):
            buf[i] = self.readbyte()

    def scan(self) -> list[bytearray]:
        # MicroPython runs the ROM search algorithm bit by bit; its result is what matters here.
        if self.stuck_low:
            return []
        return [bytearray(d.rom) for d in sorted(self.devices, key=lambda d: d.rom)]
