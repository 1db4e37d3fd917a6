"""The ESP32 and RP2040 HALs under CPython, on a fake `machine` module wired to chip models.

The models produce samples in real time at the rate the driver programmed, so FIFO pacing,
overruns, ticks/timer pacing and timeouts run as they would on a board, only faster to check.
"""

from __future__ import annotations

import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import pytest
from edgeline.firmware.edgeline_node.config import ConfigError, validate
from edgeline.firmware.edgeline_node.hal import make_hal
from edgeline.firmware.edgeline_node.hal_board import HalError
from edgeline.firmware.edgeline_node.hal_esp32 import ESP32HAL
from edgeline.firmware.edgeline_node.hal_rp2040 import RP2040HAL
from fake_chips import ADXL345Model, DS18B20Model, FakeI2C, FakeOneWire, INA219Model, MPU6050Model


def hal_cfg(**hal: Any) -> dict[str, Any]:
    return validate({"node_id": "n1", "machine": "m1", "hal": hal})["hal"]


class FakeMachine:
    """The parts of MicroPython's machine module the board HALs use."""

    def __init__(self, bus: Any, adc_volts: float = 1.25) -> None:
        self.bus = bus
        self.adc_volts = adc_volts
        self.i2c_args: list[tuple[Any, ...]] = []
        self.adc_args: list[tuple[Any, ...]] = []
        self.timers: list[Any] = []
        outer = self

        class Pin:
            def __init__(self, n: int) -> None:
                self.n = n

        class I2C:
            def __new__(cls, i2c_id: int, *, scl: Any = None, sda: Any = None, freq: int = 400000) -> Any:
                outer.i2c_args.append((i2c_id, scl and scl.n, sda and sda.n, freq))
                return outer.bus

        class ADC:
            ATTN_11DB = 3

            def __init__(self, pin: Any, *, atten: int | None = None) -> None:
                outer.adc_args.append((pin.n, atten))

            def read_uv(self) -> int:
                return round(outer.adc_volts * 1e6)

            def read_u16(self) -> int:
                return round(outer.adc_volts / 3.3 * 65535)

        class Timer:
            PERIODIC = 1

            def __init__(self, timer_id: int) -> None:
                self.id = timer_id
                self.cb: Callable[[Any], None] | None = None
                self.inits: list[tuple[int, int]] = []
                self.deinits = 0
                outer.timers.append(self)

            def init(self, *, freq: int, mode: int, callback: Callable[[Any], None]) -> None:
                self.freq, self.cb, self.t0, self.fired = freq, callback, time.monotonic(), 0
                self.inits.append((freq, mode))

            def deinit(self) -> None:
                self.cb = None
                self.deinits += 1

            def run_due(self) -> None:
                if self.cb is None:
                    return
                due = int((time.monotonic() - self.t0) * self.freq)
                while self.fired < due:
                    self.fired += 1
                    self.cb(self)

        self.Pin, self.I2C, self.ADC, self.Timer = Pin, I2C, ADC, Timer

    def idle(self) -> None:
        time.sleep(0.0001)
        for t in self.timers:
            t.run_due()


class FakeOneWireModule:
    def __init__(self, bus: FakeOneWire) -> None:
        self.bus = bus
        self.pins: list[int] = []

    def OneWire(self, pin: Any) -> FakeOneWire:
        self.pins.append(pin.n)
        return self.bus


def ramp(t: float) -> tuple[float, float, float]:
    return (0.0, 1.0, (t * 2.0) % 8.0)  # z climbs 2 g/s: distinct samples for seconds, wraps at 8 g


def bufs_for(hal: Any, n: int) -> list[array[float]]:
    return [array("f", [0.0] * n) for _ in hal.sensors()]


def assert_contiguous(window: array[float], history: list[int], scale: float) -> None:
    raws = [round(v / scale) for v in window]
    for start in range(len(history) - len(raws) + 1):
        if history[start : start + len(raws)] == raws:
            return
    raise AssertionError(f"window {raws[:8]}... is no contiguous run of the chip's samples")


def test_esp32_hal_all_sensors_fifo_paced() -> None:
    accel = ADXL345Model(signal=ramp)
    power = INA219Model(shunt_ohm=0.1)
    power.amps, power.bus_v = 1.5, 12.0
    temp = DS18B20Model(temp_c=41.5)
    bus = FakeI2C(accel, power)
    ow = FakeOneWireModule(FakeOneWire(temp))
    machine = FakeMachine(bus, adc_volts=1.25)
    cfg = hal_cfg(
        kind="esp32",
        rate_hz=200,
        i2c={"scl": 22, "sda": 21},
        accel={"chip": "adxl345", "range_g": 8, "axis": "z"},
        temperature={"chip": "ds18b20", "pin": 4, "resolution": 9},
        current={"chip": "ina219", "shunt_ohm": 0.1, "max_a": 3.2},
        adc={"pin": 34, "name": "pressure", "unit": "bar", "scale": 4.0, "offset": -1.0},
    )
    hal = ESP32HAL(cfg, machine=machine, onewire=ow, chip="esp32")
    assert hal.sensors() == (
        ("vibration", "g"),
        ("temperature", "degC"),
        ("current", "A"),
        ("pressure", "bar"),
    )
    assert machine.i2c_args == [(0, 22, 21, 400000)]
    assert machine.adc_args == [(34, 3)]
    assert ow.pins == [4]
    bufs = bufs_for(hal, 40)
    t0 = time.monotonic()
    hal.read_window(bufs)
    elapsed = time.monotonic() - t0
    assert elapsed >= 40 / 200 * 0.9  # paced by the chip, not faster
    assert_contiguous(bufs[0], [z for _, _, z in accel.history], 0.0039)
    assert set(bufs[1]) == {41.5}
    assert all(v == pytest.approx(1.5, abs=hal._cur.current_lsb) for v in bufs[2])
    assert all(v == pytest.approx(1.25 * 4.0 - 1.0, abs=1e-6) for v in bufs[3])
    assert hal.overruns == 0 and hal.read_errors == 0
    with pytest.raises(ValueError, match="faults are simulated only"):
        hal.set_fault("bearing")


def test_rp2040_hal_mpu6050_fifo_window_is_contiguous() -> None:
    accel = MPU6050Model(signal=ramp)
    hal = RP2040HAL(
        hal_cfg(
            kind="rp2040",
            rate_hz=100,
            i2c={"id": 1, "scl": 7, "sda": 6},
            accel={"chip": "mpu6050", "range_g": 16},
        ),
        machine=FakeMachine(FakeI2C(accel)),
    )
    bufs = bufs_for(hal, 50)
    hal.read_window(bufs)
    hal.read_window(bufs)  # the FIFO restarts per window: samples of the idle time are dropped
    assert_contiguous(bufs[0], [z for _, _, z in accel.history], 1 / 2048)
    assert hal.overruns == 0


def test_a_slow_bus_overruns_the_fifo_and_it_is_counted() -> None:
    class SlowI2C(FakeI2C):
        def readfrom_mem_into(self, addr: int, memaddr: int, buf: Any, /, *, addrsize: int = 8) -> None:
            time.sleep(0.0005)  # ~ a 400 kHz transaction plus MicroPython overhead, too slow for 3200 Hz
            super().readfrom_mem_into(addr, memaddr, buf, addrsize=addrsize)

    accel = ADXL345Model(signal=ramp)
    hal = ESP32HAL(
        hal_cfg(kind="esp32", rate_hz=3200, accel={"chip": "adxl345"}),
        machine=FakeMachine(SlowI2C(accel)),
        chip="esp32",
    )
    bufs = bufs_for(hal, 200)
    hal.read_window(bufs)
    assert hal.overruns > 0
    hist = [z for _, _, z in accel.history]
    raws = [round(v / 0.0039) for v in bufs[0]]
    positions = [hist.index(r) for r in raws[:5]]
    assert positions == sorted(positions)  # still in time order, with gaps where samples were lost


def test_ticks_paced_adc_only() -> None:
    machine = FakeMachine(FakeI2C(), adc_volts=2.0)
    hal = RP2040HAL(
        hal_cfg(kind="rp2040", rate_hz=2000, adc={"pin": 26, "name": "level", "unit": "V"}), machine=machine
    )
    assert hal.sensors() == (("level", "V"),)
    bufs = bufs_for(hal, 100)
    t0 = time.monotonic()
    hal.read_window(bufs)
    assert time.monotonic() - t0 >= 0.049
    assert all(v == pytest.approx(2.0, abs=1e-4) for v in bufs[0])
    assert machine.i2c_args == []  # no I2C sensor, no bus


def test_timer_paced_polled_accelerometer() -> None:
    accel = ADXL345Model(signal=ramp)
    machine = FakeMachine(FakeI2C(accel))
    hal = RP2040HAL(
        hal_cfg(kind="rp2040", rate_hz=250, pacing="timer", accel={"chip": "adxl345"}), machine=machine
    )
    assert accel.rate_hz() == 400  # the slowest chip rate at least as fast as ours
    bufs = bufs_for(hal, 50)
    t0 = time.monotonic()
    hal.read_window(bufs)
    assert time.monotonic() - t0 >= 50 / 250 * 0.9
    (timer,) = machine.timers
    assert timer.id == -1 and timer.inits == [(250, 1)] and timer.deinits == 1
    assert bufs[0][-1] != 0.0


def test_no_sample_within_the_timeout_is_an_oserror() -> None:
    accel = ADXL345Model(signal=None)  # a chip that never produces
    hal = ESP32HAL(
        hal_cfg(kind="esp32", rate_hz=100, timeout_ms=50, accel={"chip": "adxl345"}),
        machine=FakeMachine(FakeI2C(accel)),
        chip="esp32",
    )
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"no sample for hal.timeout_ms \(50 ms\) after 0 of 10"):
        hal.read_window(bufs_for(hal, 10))
    assert time.monotonic() - t0 < 1.0


def test_ina219_brown_out_is_repaired_between_windows() -> None:
    power = INA219Model(shunt_ohm=0.1)
    power.amps = 0.75
    hal = ESP32HAL(
        hal_cfg(kind="esp32", rate_hz=1000, current={"chip": "ina219"}),
        machine=FakeMachine(FakeI2C(power)),
        chip="esp32",
    )
    bufs = bufs_for(hal, 10)
    power.power_cycle()
    hal.read_window(bufs)
    assert bufs[0][0] == pytest.approx(0.75, abs=1e-3)
    assert hal.stats()["recalibrations"] == 1


@pytest.mark.parametrize(
    ("devices", "hal", "message"),
    [
        (
            [INA219Model()],
            {"accel": {"chip": "adxl345"}},
            r"config key 'hal.accel': no adxl345 answers at I2C address 0x53 on I2C bus 0, scl 22, sda 21, "
            r"400000 Hz; devices answer at 0x40\. Check the wiring, hal.accel.addr and hal.i2c",
        ),
        (
            [],
            {"current": {"chip": "ina219", "addr": 0x41}},
            r"'hal.current': no ina219 answers at I2C address 0x41 .*no device answers at all: check power",
        ),
    ],
)
def test_missing_or_unfit_sensors_name_the_config_key(
    devices: list[Any], hal: dict[str, Any], message: str
) -> None:
    hal = {"kind": "esp32", "i2c": {"scl": 22, "sda": 21}, "rate_hz": 800, **hal}
    with pytest.raises(HalError, match=message):
        ESP32HAL(hal_cfg(**hal), machine=FakeMachine(FakeI2C(*devices)), chip="esp32")


def test_missing_ds18b20_names_the_pin_key() -> None:
    with pytest.raises(
        HalError, match=r"'hal.temperature.pin': no DS18B20 .* on pin 5; it needs a 4.7k pull-up"
    ):
        ESP32HAL(
            hal_cfg(kind="esp32", temperature={"chip": "ds18b20", "pin": 5}),
            machine=FakeMachine(FakeI2C()),
            onewire=FakeOneWireModule(FakeOneWire()),
            chip="esp32",
        )


def test_board_pin_rules() -> None:
    s3_adc = hal_cfg(kind="esp32", adc={"pin": 34})
    with pytest.raises(HalError, match=r"'hal.adc.pin' must be an ADC1 input .* \(this is an esp32s3\)"):
        ESP32HAL(s3_adc, machine=FakeMachine(FakeI2C()), chip="esp32s3")
    with pytest.raises(HalError, match=r"'hal.i2c.scl' GPIO 35 is input-only"):
        ESP32HAL(
            hal_cfg(kind="esp32", i2c={"scl": 35, "sda": 21}, current={"chip": "ina219"}),
            machine=FakeMachine(FakeI2C(INA219Model())),
            chip="esp32",
        )
    with pytest.raises(ConfigError, match=r"'hal.i2c.scl' GPIO 4 is no SCL pin of I2C0"):
        hal_cfg(kind="rp2040", i2c={"scl": 4, "sda": 0}, accel={"chip": "mpu6050"})
    with pytest.raises(ConfigError, match=r"'hal.adc.pin' must be GPIO 26, 27 or 28"):
        hal_cfg(kind="rp2040", adc={"pin": 29})


@pytest.mark.parametrize(
    ("hal", "message"),
    [
        ({"kind": "esp8266"}, r"'hal.kind' must be one of sim, stdin, esp32, rp2040"),
        ({"kind": "esp32"}, r"'hal.kind' 'esp32' needs at least one sensor"),
        (
            {"kind": "esp32", "accel": {"chip": "adxl345"}, "rate_hz": 1000},
            r"'hal.rate_hz' does not suit hal.accel.chip 'adxl345' with pacing 'auto'",
        ),
        ({"kind": "esp32", "accel": {"chip": "mpu6050"}, "rate_hz": 300}, r"'hal.rate_hz' .* 1000/n Hz"),
        (
            {"kind": "esp32", "accel": {"chip": "mpu6050"}, "rate_hz": 2000, "pacing": "ticks"},
            r"'hal.rate_hz' 2000 Hz is faster than the mpu6050's 1000 Hz",
        ),
        (
            {"kind": "esp32", "pacing": "fifo", "adc": {"pin": 32}},
            r"'hal.pacing' 'fifo' needs an accelerometer",
        ),
        (
            {"kind": "esp32", "accel": {"chip": "adxl345", "axis": "w"}},
            r"'hal.accel.axis' must be one of x, y, z",
        ),
        (
            {"kind": "esp32", "accel": {"chip": "bma280"}},
            r"'hal.accel.chip' must be one of adxl345, mpu6050 or null",
        ),
        ({"kind": "esp32", "accel": {"chip": "adxl345", "adr": 83}}, r"'hal.accel.adr' is unknown"),
        (
            {"kind": "esp32", "i2c": {"scl": 22}, "adc": {"pin": 32}},
            r"'hal.i2c.scl' and hal.i2c.sda must both",
        ),
        ({"kind": "esp32", "temperature": {"chip": "ds18b20"}}, r"'hal.temperature.pin' must be the 1-Wire"),
        (
            {"kind": "esp32", "current": {"chip": "ina219", "shunt_ohm": 1.0}},
            r"'hal.current.max_a' .* 0.32 V",
        ),
        ({"kind": "esp32", "adc": {"pin": 32, "name": "current"}}, r"'hal.adc.name' must be a sensor name"),
        ({"kind": "stdin", "stdin": {"sensors": []}}, r"'hal.stdin.sensors' must list 1-16 distinct"),
        ({"kind": "sim", "timeout_ms": 0}, r"'hal.timeout_ms' must be an integer from 10"),
    ],
)
def test_hal_config_errors_name_the_key(hal: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        hal_cfg(**hal)


def test_make_hal_off_the_board_says_which_kinds_work_here() -> None:
    with pytest.raises(HalError, match=r"'hal.kind' is 'esp32', which needs a board's machine module"):
        make_hal(hal_cfg(kind="esp32", adc={"pin": 32}))
    with pytest.raises(HalError, match=r"'hal.kind' is 'rp2040'"):
        make_hal(hal_cfg(kind="rp2040", adc={"pin": 26}))


def test_make_hal_imports_only_the_hal_it_makes() -> None:
    code = (
        "import sys\n"
        "from edgeline.firmware.edgeline_node.config import validate\n"
        "from edgeline.firmware.edgeline_node.hal import make_hal\n"
        "h = make_hal(validate({'node_id': 'n', 'machine': 'm'})['hal'])\n"
        "print(type(h).__name__, sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
        "      if m.startswith('edgeline.firmware.edgeline_node.hal')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SimulatedMachine", "['hal',", "'hal_config',", "'hal_sim']"]
