"""Sensor chip drivers against register-level models of the chips (tests/firmware/fake_chips.py).

What is checked byte for byte: the configuration the driver writes, in the datasheet's order;
how it turns register bytes into g, degC and A (sign, byte order, scale, undefined bits);
what it does when the chip is absent, another chip, reset by a brown-out, or on a broken bus.
"""

from __future__ import annotations

import pytest
from edgeline.firmware.edgeline_node.drivers import adxl345, ds18b20, ina219, mpu6050
from fake_chips import (
    ADXL345Model,
    DS18B20Model,
    FakeI2C,
    FakeOneWire,
    I2CDevice,
    INA219Model,
    MPU6050Model,
)

# -- ADXL345 -------------------------------------------------------------------------------------


def test_adxl345_init_writes_the_datasheet_sequence() -> None:
    bus = FakeI2C(ADXL345Model())
    adxl345.ADXL345(bus, rate_hz=3200, range_g=16)
    assert bus.log == [
        ("r", 0x53, 0x00, b"\xe5"),  # DEVID
        ("w", 0x53, 0x2D, b"\x00"),  # POWER_CTL: standby while configuring
        ("w", 0x53, 0x31, b"\x0b"),  # DATA_FORMAT: FULL_RES | +-16 g
        ("w", 0x53, 0x2C, b"\x0f"),  # BW_RATE: 3200 Hz
        ("w", 0x53, 0x2D, b"\x08"),  # POWER_CTL: measure
        ("w", 0x53, 0x38, b"\x00"),  # FIFO_CTL: bypass (clears the FIFO)
        ("w", 0x53, 0x38, b"\x90"),  # FIFO_CTL: stream, watermark 16
    ]


@pytest.mark.parametrize("rate", adxl345.RATES_HZ)
@pytest.mark.parametrize("range_g", adxl345.RANGES_G)
def test_adxl345_rate_and_range_reach_the_chip(rate: int, range_g: int) -> None:
    chip = ADXL345Model()
    adxl345.ADXL345(FakeI2C(chip), rate_hz=rate, range_g=range_g)
    assert chip.rate_hz() == rate
    assert chip.regs[0x31] == 0x08 | adxl345.RANGES_G.index(range_g)


def test_adxl345_refuses_what_the_chip_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"no 1000 Hz output data rate: use one of 3200, 1600"):
        adxl345.ADXL345(FakeI2C(ADXL345Model()), rate_hz=1000)
    with pytest.raises(ValueError, match=r"no \+-3 g range"):
        adxl345.ADXL345(FakeI2C(ADXL345Model()), range_g=3)
    with pytest.raises(ValueError, match=r"no ADXL345 at I2C address 0x53: DEVID reads 0x00"):
        adxl345.ADXL345(FakeI2C(ADXL345Model(devid=0x00)))
    with pytest.raises(OSError):  # nothing at 0x1d: the bus NACKs
        adxl345.ADXL345(FakeI2C(ADXL345Model()), addr=adxl345.ADDR_ALT)


def test_adxl345_scales_little_endian_signed_samples() -> None:
    chip = ADXL345Model()
    bus = FakeI2C(chip)
    dev = adxl345.ADXL345(bus, rate_hz=800, range_g=16)
    chip.push(0.5, -1.0, 15.0)
    assert dev.available() == 1
    out = [0.0, 0.0, 0.0]
    dev.read_xyz(out)
    # 0.5 g = 128 LSB, -1 g = -256 LSB (0xff00), 15 g = 3846 LSB (0x0f06), little-endian.
    assert bus.log[-1] == ("r", 0x53, 0x32, b"\x80\x00\x00\xff\x06\x0f")
    assert out == [128 * 0.0039, -256 * 0.0039, 3846 * 0.0039]
    chip.push(0.0, 0.0, 16.5)  # beyond +-16 g: 13 bits saturate at 4095
    assert dev.read_raw(2) == 4095
    assert dev.available() == 0


def test_adxl345_full_resolution_at_2g_saturates_at_10_bits() -> None:
    chip = ADXL345Model()
    dev = adxl345.ADXL345(FakeI2C(chip), rate_hz=100, range_g=2)
    chip.push(0.0, 0.0, 3.0)
    chip.push(0.0, 0.0, -3.0)
    assert dev.read_raw(2) == 511
    assert dev.read_raw(2) == -512


def test_adxl345_stream_fifo_keeps_the_newest_32_and_reports_the_overrun() -> None:
    chip = ADXL345Model()
    dev = adxl345.ADXL345(FakeI2C(chip), rate_hz=3200, range_g=16)
    for k in range(40):
        chip.push(0.0, 0.0, k * 0.0039)
    assert dev.available() == 32
    assert dev.overrun()
    assert [dev.read_raw(2) for _ in range(32)] == list(range(8, 40))
    assert not dev.overrun()
    chip.push(0.0, 0.0, 1.0)
    dev.restart()
    assert dev.available() == 0


def test_adxl345_polled_mode_reads_the_data_registers() -> None:
    chip = ADXL345Model()
    bus = FakeI2C(chip)
    dev = adxl345.ADXL345(bus, rate_hz=400, range_g=4, fifo=False)
    assert bus.writes()[-1] == (0x38, b"\x00")  # stays in bypass
    assert dev.available() == 0
    chip.push(0.0, -2.0, 0.0)
    assert dev.available() == 1
    assert dev.read(1) == pytest.approx(-2.0, abs=0.0039)


# -- MPU-6050 ------------------------------------------------------------------------------------


def test_mpu6050_init_resets_wakes_and_configures() -> None:
    bus = FakeI2C(MPU6050Model())
    mpu6050.MPU6050(bus, rate_hz=1000, range_g=8)
    assert bus.log == [
        ("r", 0x68, 0x75, b"\x68"),  # WHO_AM_I
        ("w", 0x68, 0x6B, b"\x80"),  # PWR_MGMT_1: DEVICE_RESET
        ("r", 0x68, 0x6B, b"\x40"),  # reset done (bit 7 clear), asleep
        ("w", 0x68, 0x6B, b"\x01"),  # awake, PLL on the x gyro
        ("w", 0x68, 0x1A, b"\x01"),  # CONFIG: DLPF 184 Hz, 1 kHz base rate
        ("w", 0x68, 0x19, b"\x00"),  # SMPLRT_DIV: 1000 / (1 + 0)
        ("w", 0x68, 0x1C, b"\x10"),  # ACCEL_CONFIG: AFS_SEL 2 (+-8 g)
        ("w", 0x68, 0x23, b"\x08"),  # FIFO_EN: accelerometer
        ("w", 0x68, 0x6A, b"\x00"),  # USER_CTRL: FIFO off ...
        ("w", 0x68, 0x6A, b"\x04"),  # ... reset it ...
        ("w", 0x68, 0x6A, b"\x40"),  # ... and on again
        ("r", 0x68, 0x3A, b"\x00"),  # INT_STATUS read clears FIFO_OFLOW
    ]


@pytest.mark.parametrize(
    ("rate", "div", "dlpf"),
    [
        (1000, 0, 1),
        (500, 1, 1),
        (250, 3, 2),
        (200, 4, 2),
        (100, 9, 3),
        (50, 19, 4),
        (20, 49, 5),
        (10, 99, 6),
        (4, 249, 6),
    ],
)
def test_mpu6050_rate_sets_divider_and_an_anti_aliasing_filter(rate: int, div: int, dlpf: int) -> None:
    chip = MPU6050Model()
    mpu6050.MPU6050(FakeI2C(chip), rate_hz=rate)
    assert (chip.regs[0x19], chip.regs[0x1A]) == (div, dlpf)
    assert chip.rate_hz() == rate
    assert rate in mpu6050.RATES_HZ


def test_mpu6050_refuses_other_rates_and_chips() -> None:
    with pytest.raises(ValueError, match=r"1000/n Hz .* 300 Hz is not one of them"):
        mpu6050.MPU6050(FakeI2C(MPU6050Model()), rate_hz=300)
    with pytest.raises(ValueError, match=r"no MPU-6050 at I2C address 0x68: WHO_AM_I reads 0x70"):
        mpu6050.MPU6050(FakeI2C(MPU6050Model(who=0x70)))  # an MPU-6500


@pytest.mark.parametrize("fifo", [True, False])
def test_mpu6050_scales_big_endian_signed_samples(fifo: bool) -> None:
    chip = MPU6050Model()
    bus = FakeI2C(chip)
    dev = mpu6050.MPU6050(bus, rate_hz=500, range_g=16, fifo=fifo)
    chip.push(-1.0, 0.5, 16.5)  # 2048 LSB/g; 16.5 g saturates
    assert dev.available() == 1
    out = [0.0, 0.0, 0.0]
    dev.read_xyz(out)
    assert bus.log[-1] == ("r", 0x68, 0x74 if fifo else 0x3B, b"\xf8\x00\x04\x00\x7f\xff")
    assert out == [-1.0, 0.5, 32767 / 2048]
    if fifo:
        assert dev.available() == 0


def test_mpu6050_fifo_overflow_is_reported_and_restart_realigns() -> None:
    chip = MPU6050Model()
    dev = mpu6050.MPU6050(FakeI2C(chip), rate_hz=1000, range_g=2)
    for k in range(171):  # 1026 bytes into 1024: two bytes of the oldest sample are gone
        chip.push(0.0, 0.0, k / 16384)
    assert dev.available() == mpu6050.FIFO_DEPTH
    assert dev.overrun()
    dev.restart()
    assert dev.available() == 0
    chip.push(0.25, -0.25, 1.0)
    assert [dev.read_raw(a) for a in (0,)] == [4096]  # x of a whole, aligned sample
    chip.push(0.25, -0.25, 1.0)
    out = [0.0, 0.0, 0.0]
    assert dev.read_xyz(out) == [0.25, -0.25, 1.0]


# -- DS18B20 -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1000

    def ticks_ms(self) -> int:
        return self.ms

    def seconds(self) -> float:
        return self.ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(ds18b20, "ticks_ms", c.ticks_ms)
    return c


def test_ds18b20_init_keeps_alarms_and_sets_resolution(clock: FakeClock) -> None:
    chip = DS18B20Model(serial=7, clock=clock.seconds)
    bus = FakeOneWire(chip)
    dev = ds18b20.DS18B20(bus, resolution=10)
    rom = list(chip.rom)
    assert bus.written == [0x55, *rom, 0xBE, 0x55, *rom, 0x4E, 0x4B, 0x46, 0x3F]
    assert chip.scratch[4] == 0x3F
    assert dev.conversion_ms == 188
    assert 0xCC not in bus.written  # always MATCH ROM: safe with several sensors on the bus


def test_ds18b20_conversion_does_not_block(clock: FakeClock) -> None:
    chip = DS18B20Model(temp_c=23.4375, clock=clock.seconds)
    dev = ds18b20.DS18B20(FakeOneWire(chip), resolution=12)
    assert not dev.ready()  # nothing started
    dev.start()
    clock.ms += 749
    assert not dev.ready()
    clock.ms += 1
    assert dev.ready()
    assert dev.read() == 23.4375
    assert not dev.ready()


@pytest.mark.parametrize(
    ("temp", "res", "expect"),
    [
        (-10.125, 12, -10.125),
        (-55.0, 12, -55.0),
        (125.0, 12, 125.0),
        (25.0625, 11, 25.0),
        (25.0625, 9, 25.0),
        (-0.5, 10, -0.5),
        (-0.0625, 9, -0.5),
    ],
)
def test_ds18b20_sign_and_undefined_low_bits(clock: FakeClock, temp: float, res: int, expect: float) -> None:
    chip = DS18B20Model(temp_c=temp, clock=clock.seconds)
    dev = ds18b20.DS18B20(FakeOneWire(chip), resolution=res)
    dev.start()
    clock.ms += dev.conversion_ms
    assert dev.read() == expect


def test_ds18b20_picks_its_own_sensor_among_several(clock: FakeClock) -> None:
    a = DS18B20Model(serial=1, temp_c=20.0, clock=clock.seconds)
    b = DS18B20Model(serial=2, temp_c=30.0, clock=clock.seconds)
    bus = FakeOneWire(a, b)
    da = ds18b20.DS18B20(bus, rom=a.rom)
    db = ds18b20.DS18B20(bus, rom=b.rom)
    assert da.roms == db.roms == [a.rom, b.rom]
    da.start()
    db.start()
    clock.ms += 750
    assert (da.read(), db.read()) == (20.0, 30.0)
    with pytest.raises(ValueError, match="no DS18B20 with ROM 28ff"):
        ds18b20.DS18B20(bus, rom=b"\x28\xff\xff\xff\xff\xff\xff\x00")


def test_ds18b20_bus_faults_are_errors_not_temperatures(clock: FakeClock) -> None:
    chip = DS18B20Model(clock=clock.seconds)
    bus = FakeOneWire(chip)
    dev = ds18b20.DS18B20(bus)
    chip.corrupt = True
    with pytest.raises(OSError, match="CRC"):
        dev.read()
    chip.corrupt = False
    bus.stuck_low = True  # all zeros: the CRC checks, the fixed bits do not
    with pytest.raises(OSError, match="bad scratchpad 000000000000000000"):
        dev.read()
    bus.stuck_low = False
    bus.devices = []
    with pytest.raises(OSError, match="no presence pulse"):
        dev.start()
    with pytest.raises(ValueError, match=r"no DS18B20 \(family 0x28\)"):
        ds18b20.DS18B20(FakeOneWire())
    with pytest.raises(ValueError, match="resolution"):
        ds18b20.DS18B20(FakeOneWire(chip), resolution=8)


def test_ds18b20_crc8_matches_the_maxim_example() -> None:
    # Maxim application note 27's example ROM: 02 1C B8 01 00 00 00 | CRC A2.
    rom = bytes([0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00, 0xA2])
    assert ds18b20.crc8(rom, 7) == 0xA2
    assert ds18b20.crc8(rom, 8) == 0


# -- INA219 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shunt", "max_a", "config", "cal"),
    [
        (0.1, 3.2, b"\x39\x9f", b"\x10\x62"),
        (0.1, 0.4, b"\x21\x9f", b"\x83\x12"),
        (0.01, 10.0, b"\x31\x9f", b"\x34\x6c"),
    ],
)
def test_ina219_init_resets_then_programs_config_and_calibration(
    shunt: float, max_a: float, config: bytes, cal: bytes
) -> None:
    chip = INA219Model(shunt_ohm=shunt)
    bus = FakeI2C(chip)
    ina219.INA219(bus, shunt_ohm=shunt, max_a=max_a)
    assert bus.log == [
        ("w", 0x40, 0x00, b"\x80\x00"),  # RST
        ("r", 0x40, 0x00, b"\x39\x9f"),  # the power-on CONFIG proves it is an INA219
        ("w", 0x40, 0x00, config),  # 32 V bus, smallest PGA range that holds max_a, 12-bit, continuous
        ("w", 0x40, 0x05, cal),  # trunc(0.04096 / (max_a / 32768 * shunt)), even
    ]


def test_ina219_reads_current_voltage_and_power_with_sign() -> None:
    chip = INA219Model(shunt_ohm=0.1)
    bus = FakeI2C(chip)
    dev = ina219.INA219(bus, shunt_ohm=0.1, max_a=3.2)
    chip.amps, chip.bus_v = 1.234, 12.0
    assert dev.current() == pytest.approx(1.234, abs=dev.current_lsb)
    assert dev.shunt_voltage() == pytest.approx(0.1234, abs=1e-9)
    assert dev.bus_voltage() == pytest.approx(12.0)
    assert dev.power() == pytest.approx(1.234 * 12.0, rel=0.01)
    chip.amps = -0.5
    dev.shunt_voltage()
    assert bus.log[-1] == ("r", 0x40, 0x01, b"\xec\x78")  # -5000 x 10 uV, big-endian
    assert dev.current() == pytest.approx(-0.5, abs=dev.current_lsb)


def test_ina219_restores_calibration_after_a_brown_out() -> None:
    chip = INA219Model(shunt_ohm=0.1)
    dev = ina219.INA219(FakeI2C(chip), shunt_ohm=0.1, max_a=0.4)
    chip.amps = 0.2
    assert dev.check_calibration()
    chip.power_cycle()
    assert dev.current() == 0.0  # calibration register back to 0: the chip computes nothing
    assert not dev.check_calibration()
    assert dev.current() == pytest.approx(0.2, abs=dev.current_lsb)
    assert dev.recalibrations == 1


def test_ina219_refuses_other_chips_and_impossible_shunts() -> None:
    class Zeros(I2CDevice):
        addr = 0x40

        def read(self, reg: int, n: int) -> bytes:
            return bytes(n)

        def write(self, reg: int, data: bytes) -> None:
            pass

    with pytest.raises(ValueError, match=r"no INA219 at I2C address 0x40: CONFIG reads 0x0000 after reset"):
        ina219.INA219(FakeI2C(Zeros()))
    with pytest.raises(ValueError, match=r"over the 0.32 V it measures"):
        ina219.calibration(1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        ina219.calibration(0.1, 0)
