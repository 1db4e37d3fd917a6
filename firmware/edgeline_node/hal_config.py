# Device code. The "hal" section of the node config: its defaults and its validation, kept
# apart from config.py so that the board HALs can grow without touching the rest of the
# config. Every error names the key, e.g. "config key 'hal.accel.addr' ...".
#
#   kind        sim (simulated machine) | stdin (HIL rig feeds samples) | esp32 | rp2040
#   rate_hz     samples per second per sensor
#   timeout_ms  read_window gives up (OSError) when no sample came for this long
#   pacing      auto | fifo | timer | ticks: what clocks the samples on a board (docs/boards.md)
#   i2c         bus id, scl/sda pins (null: the port's default pins), freq
#   accel       chip adxl345 | mpu6050 | null; addr (null: the chip's default); range_g; axis
#   temperature chip ds18b20 | null; pin (1-Wire data); resolution 9-12 bits
#   current     chip ina219 | null; addr; shunt_ohm; max_a (largest current to measure)
#   adc         pin | null; name, unit; value = volts * scale + offset
#   stdin       sensors: [[name, unit], ...] the rig sends, in column order; buffer_rows
from . import wire

KINDS = ("sim", "stdin", "esp32", "rp2040")
BOARD_KINDS = ("esp32", "rp2040")
PACINGS = ("auto", "fifo", "timer", "ticks")
ACCELS = ("adxl345", "mpu6050")

HAL_DEFAULTS = {
    "kind": "sim",
    "seed": 1,
    "rate_hz": 1000,
    "timeout_ms": 2000,
    "pacing": "auto",
    "i2c": {"id": 0, "scl": None, "sda": None, "freq": 400000},
    "accel": {"chip": None, "addr": None, "range_g": 16, "axis": "z"},
    "temperature": {"chip": None, "pin": None, "resolution": 12},
    "current": {"chip": None, "addr": None, "shunt_ohm": 0.1, "max_a": 3.2},
    "adc": {"pin": None, "name": "analog", "unit": "V", "scale": 1.0, "offset": 0.0},
    "stdin": {"sensors": [["vibration", "g"], ["temperature", "degC"], ["current", "A"]],
              "buffer_rows": 4096},
}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, int) or isinstance(v, float)) and not isinstance(v, bool)


class _Checker:
    def __init__(self, hal, err):
        self.hal = hal
        self.err = err

    def get(self, key):
        v = self.hal
        for part in key.split("."):
            v = v[part]
        return v

    def need(self, cond, key, what):
        if not cond:
            raise self.err("config key %r %s" % ("hal." + key, what))

    def int_in(self, key, lo, hi, optional=False):
        v = self.get(key)
        if optional and v is None:
            return None
        self.need(_is_int(v) and lo <= v <= hi, key, "must be an integer from %d to %d%s, got %r"
                  % (lo, hi, " or null" if optional else "", v))
        return v

    def one_of(self, key, choices, optional=False):
        v = self.get(key)
        if optional and v is None:
            return None
        self.need(v in choices, key, "must be one of %s%s, got %r"
                  % (", ".join(str(x) for x in choices), " or null" if optional else "", v))
        return v

    def positive(self, key):
        v = self.get(key)
        self.need(_is_num(v) and v > 0, key, "must be a positive number, got %r" % (v,))
        return v


def check_hal(hal, err):
    """Validate the merged "hal" section in place; raise err (ConfigError) naming the key."""
    c = _Checker(hal, err)
    kind = c.one_of("kind", KINDS)
    c.int_in("seed", 0, 2**30)
    c.int_in("rate_hz", 1, 100000)
    c.int_in("timeout_ms", 10, 600000)
    if kind == "stdin":
        _check_stdin(c)
    elif kind in BOARD_KINDS:
        _check_board(c, kind)


def _check_stdin(c):
    sensors = c.get("stdin.sensors")
    ok = isinstance(sensors, list) and 1 <= len(sensors) <= 16
    names = []
    for s in sensors if ok else ():
        if not (isinstance(s, list) and len(s) == 2 and wire.valid_name(s[0]) and isinstance(s[1], str)
                and 0 < len(s[1]) <= 16 and s[0] not in names):
            ok = False
            break
        names.append(s[0])
    c.need(ok, "stdin.sensors", "must list 1-16 distinct [name, unit] pairs (names as for node_id, "
           "units 1-16 characters), got %r" % (sensors,))
    c.int_in("stdin.buffer_rows", 1, 100000)


def _check_board(c, kind):
    rate = c.get("rate_hz")
    pacing = c.one_of("pacing", PACINGS)
    c.int_in("i2c.id", 0, 1)
    scl = c.int_in("i2c.scl", 0, 48, optional=True)
    sda = c.int_in("i2c.sda", 0, 48, optional=True)
    c.need((scl is None) == (sda is None), "i2c.scl", "and hal.i2c.sda must both be pins or both null "
           "(the port's default pins)")
    c.int_in("i2c.freq", 10000, 1000000)

    accel = c.one_of("accel.chip", ACCELS, optional=True)
    if accel is not None:
        c.int_in("accel.addr", 0x08, 0x77, optional=True)
        c.one_of("accel.range_g", (2, 4, 8, 16))
        c.one_of("accel.axis", ("x", "y", "z"))
        fifo = pacing in ("auto", "fifo")
        # The chip's own clock paces FIFO samples: the rate must be one it has.
        try:
            if accel == "adxl345":
                from .drivers import adxl345
                fastest = adxl345.RATES_HZ[0]
                if fifo:
                    adxl345.rate_code(rate)
            else:
                from .drivers import mpu6050
                fastest = mpu6050.RATES_HZ[0]
                if fifo:
                    mpu6050.sample_divider(rate)
        except ValueError as e:
            c.need(False, "rate_hz", "does not suit hal.accel.chip %r with pacing %r: %s "
                   "(or set hal.pacing to 'timer' or 'ticks')" % (accel, pacing, e))
        c.need(rate <= fastest, "rate_hz", "%d Hz is faster than the %s's %d Hz" % (rate, accel, fastest))
    else:
        c.need(pacing != "fifo", "pacing", "'fifo' needs an accelerometer (hal.accel.chip): use "
               "'auto', 'timer' or 'ticks'")

    if c.one_of("temperature.chip", ("ds18b20",), optional=True) is not None:
        c.need(c.int_in("temperature.pin", 0, 48, optional=True) is not None, "temperature.pin",
               "must be the 1-Wire data pin (an integer)")
        c.int_in("temperature.resolution", 9, 12)

    if c.one_of("current.chip", ("ina219",), optional=True) is not None:
        c.int_in("current.addr", 0x40, 0x4F, optional=True)
        shunt = c.positive("current.shunt_ohm")
        max_a = c.positive("current.max_a")
        from .drivers.ina219 import calibration
        try:
            calibration(shunt, max_a)
        except ValueError as e:
            c.need(False, "current.max_a", "with hal.current.shunt_ohm does not fit the INA219: %s" % e)

    pin = c.int_in("adc.pin", 0, 48, optional=True)
    if pin is not None:
        name = c.get("adc.name")
        c.need(wire.valid_name(name) and name not in ("vibration", "temperature", "current"), "adc.name",
               "must be a sensor name (as for node_id) other than vibration, temperature, current; "
               "got %r" % (name,))
        unit = c.get("adc.unit")
        c.need(isinstance(unit, str) and 0 < len(unit) <= 16, "adc.unit", "must be 1-16 characters")
        for key in ("adc.scale", "adc.offset"):
            c.need(_is_num(c.get(key)), key, "must be a number, got %r" % (c.get(key),))

    c.need(accel is not None or c.get("temperature.chip") is not None or c.get("current.chip") is not None
           or pin is not None, "kind", "%r needs at least one sensor: set hal.accel.chip, "
           "hal.temperature.chip, hal.current.chip or hal.adc.pin" % kind)
    if kind == "rp2040":
        from .hal_rp2040 import pin_problem
    else:
        from .hal_esp32 import pin_problem
    problem = pin_problem(c.hal)
    if problem is not None:
        c.need(False, problem[0], problem[1])
