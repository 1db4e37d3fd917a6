# Device code. What the ESP32 and RP2040 HALs share: real sensors behind the same interface
# as the simulated machine (sensors(), read_window(bufs), set_fault()), configured from the
# node config's "hal" section (hal_config.py; wiring and choices in docs/boards.md).
#
# Sensors, in this order when configured: an accelerometer ("vibration", g: one axis), a
# DS18B20 ("temperature", degC), an INA219 ("current", A), an ADC pin (its own name/unit).
#
# What clocks the samples (hal.pacing):
#   fifo  the accelerometer's own output data rate; samples queue in its FIFO, so reads can
#         lag a little without losing any and the spacing is the chip's crystal, not ours.
#         "auto" means fifo when there is an accelerometer.
#   timer a machine.Timer ticks at rate_hz; the loop idles (machine.idle) between ticks.
#   ticks a ticks_us-paced busy loop ("auto" without an accelerometer).
# The other sensors are read once per accelerometer sample (current, ADC) or hold their last
# value (temperature: one conversion takes 750 ms, started and collected between windows).
#
# Nothing is allocated per sample except what MicroPython cannot avoid: on ports that box
# floats (ESP32, RP2040) each scaled sample is a short-lived float object until it is stored
# into the caller's float array.
from .compat import const, sleep_ms, ticks_add, ticks_diff, ticks_ms, ticks_us
from .config import ConfigError

_FIFO = const(0)
_TIMER = const(1)
_TICKS = const(2)
_AXES = "xyz"


class HalError(ConfigError):
    """A HAL that cannot start: names the config key to fix (main.py prints it as a bad config)."""


def _hex_list(addrs):
    return ", ".join("0x%02x" % a for a in addrs) or "none"


class BoardHAL:
    BOARD = "board"  # the hal.kind of the subclass
    TIMER_ID = -1

    def __init__(self, cfg_hal, machine=None, onewire=None):
        if machine is None:
            try:
                import machine
            except ImportError:
                machine = None
            if not hasattr(machine, "I2C"):  # CPython has no machine module, the unix port a tiny one
                raise HalError("config key 'hal.kind' is %r, which needs a board's machine module (I2C, "
                               "Pin, ADC, Timer): use 'sim' or 'stdin' off the board" % self.BOARD)
        self._m = machine
        self._onewire = onewire
        self.cfg = cfg_hal
        self.rate_hz = cfg_hal["rate_hz"]
        self.timeout_ms = cfg_hal["timeout_ms"]
        # Counters for telemetry: samples lost to a FIFO overrun, paced samples taken late,
        # failed sensor reads, INA219 re-calibrations after a brown-out.
        self.overruns = 0
        self.late = 0
        self.read_errors = 0
        self._due = 0
        self._timer = None
        self._tick_cb = self._tick  # bound once: an IRQ handler must not allocate
        accel = cfg_hal["accel"]
        pacing = cfg_hal["pacing"]
        if pacing == "auto":
            pacing = "fifo" if accel["chip"] else "ticks"
        self._pacing = {"fifo": _FIFO, "timer": _TIMER, "ticks": _TICKS}[pacing]
        sensors = []
        self._accel = None
        self._temp = None
        self._cur = None
        self._adc = None
        self._i2c = None
        self._found = ()
        if accel["chip"] or cfg_hal["current"]["chip"]:
            self._i2c = self._make_i2c(cfg_hal["i2c"])
            try:
                self._found = tuple(self._i2c.scan())
            except OSError as e:
                raise HalError("config key 'hal.i2c': scanning the bus failed (%s): check the pins "
                               "and pull-ups (%s)" % (e, self._bus_text()))
        if accel["chip"]:
            self._accel = self._start_accel(accel)
            self._axis = _AXES.index(accel["axis"])
            sensors.append(("vibration", "g"))
        self._temp_c = 0.0
        if cfg_hal["temperature"]["chip"]:
            self._temp = self._start_ds18b20(cfg_hal["temperature"])
            sensors.append(("temperature", "degC"))
        if cfg_hal["current"]["chip"]:
            self._cur = self._start_ina219(cfg_hal["current"])
            sensors.append(("current", "A"))
        adc = cfg_hal["adc"]
        if adc["pin"] is not None:
            try:
                self._adc = self._make_adc(adc["pin"])
            except (ValueError, OSError) as e:
                raise HalError("config key 'hal.adc.pin': pin %r is no ADC input on this board (%s)"
                               % (adc["pin"], e))
            self._adc_scale = adc["scale"]
            self._adc_offset = adc["offset"]
            sensors.append((adc["name"], adc["unit"]))
        self._sensors = tuple(sensors)
        self._idx_temp = self._index("temperature")
        self._idx_cur = self._index("current")
        self._idx_adc = len(sensors) - 1 if self._adc is not None else -1

    # -- board specifics (subclasses) --------------------------------------------------------
    def _make_i2c(self, c):
        m = self._m
        if c["scl"] is None:
            return m.I2C(c["id"], freq=c["freq"])
        return m.I2C(c["id"], scl=m.Pin(c["scl"]), sda=m.Pin(c["sda"]), freq=c["freq"])

    # Abstract: ESP32HAL and RP2040HAL implement both (their ADCs differ in API and range).
    def _make_adc(self, pin):
        raise NotImplementedError("%s must implement _make_adc: BoardHAL is only the shared part"
                                  % type(self).__name__)

    def _adc_volts(self):
        raise NotImplementedError("%s must implement _adc_volts: BoardHAL is only the shared part"
                                  % type(self).__name__)

    # -- set-up -------------------------------------------------------------------------------
    def _index(self, name):
        for i in range(len(self._sensors)):
            if self._sensors[i][0] == name:
                return i
        return -1

    def _bus_text(self):
        c = self.cfg["i2c"]
        pins = "port default pins" if c["scl"] is None else "scl %d, sda %d" % (c["scl"], c["sda"])
        return "I2C bus %d, %s, %d Hz" % (c["id"], pins, c["freq"])

    def _on_bus(self, key, chip, addr):
        if addr in self._found:
            return
        if self._found:
            seen = "devices answer at %s" % _hex_list(self._found)
        else:
            seen = "no device answers at all: check power, the SDA/SCL pins and the pull-ups"
        raise HalError("config key %r: no %s answers at I2C address 0x%02x on %s; %s. Check the "
                       "wiring, %s.addr and hal.i2c" % (key, chip, addr, self._bus_text(), seen, key))

    def _start_accel(self, a):
        chip = a["chip"]
        if chip == "adxl345":
            from .drivers import adxl345
            default_addr, rates, self._depth = adxl345.ADDR, list(adxl345.RATES_HZ), adxl345.FIFO_DEPTH
        else:
            from .drivers import mpu6050
            default_addr, rates, self._depth = mpu6050.ADDR, list(mpu6050.RATES_HZ), mpu6050.FIFO_DEPTH
        addr = a["addr"] if a["addr"] is not None else default_addr
        self._on_bus("hal.accel", chip, addr)
        fifo = self._pacing == _FIFO
        rate = self.rate_hz
        if not fifo:
            # Paced by us: run the chip at the slowest rate that is at least ours.
            faster = [r for r in rates if r >= rate]
            if not faster:
                raise HalError("config key 'hal.rate_hz': %d Hz is faster than the %s's %d Hz"
                               % (rate, chip, rates[0]))
            rate = min(faster)
        self._accel_resets = chip == "mpu6050"  # its FIFO loses sample alignment on overflow
        try:
            if chip == "adxl345":
                return adxl345.ADXL345(self._i2c, addr, rate_hz=rate, range_g=a["range_g"], fifo=fifo)
            return mpu6050.MPU6050(self._i2c, addr, rate_hz=rate, range_g=a["range_g"], fifo=fifo)
        except ValueError as e:
            raise HalError("config key 'hal.accel': %s" % e)

    def _start_ds18b20(self, t):
        from .drivers.ds18b20 import DS18B20
        ow_mod = self._onewire
        if ow_mod is None:
            import onewire as ow_mod
        ow = ow_mod.OneWire(self._m.Pin(t["pin"]))
        try:
            dev = DS18B20(ow, resolution=t["resolution"])
            # The first value is waited for once, here, so no window ever carries a made-up one.
            dev.start()
            sleep_ms(dev.conversion_ms)
            self._temp_c = dev.read()
            dev.start()
        except (ValueError, OSError) as e:
            raise HalError("config key 'hal.temperature.pin': %s (1-Wire on pin %d; it needs a 4.7k "
                           "pull-up to 3V3)" % (e, t["pin"]))
        return dev

    def _start_ina219(self, c):
        from .drivers.ina219 import ADDR, INA219
        addr = c["addr"] if c["addr"] is not None else ADDR
        self._on_bus("hal.current", "ina219", addr)
        try:
            return INA219(self._i2c, addr, shunt_ohm=c["shunt_ohm"], max_a=c["max_a"])
        except ValueError as e:
            raise HalError("config key 'hal.current': %s" % e)

    # -- the HAL interface ----------------------------------------------------------------------
    def sensors(self):
        return self._sensors

    def set_fault(self, name):
        raise ValueError("faults are simulated only: hal.kind %r reads real sensors" % self.BOARD)

    def stats(self):
        """Counters for telemetry (allocates a dict: call once per telemetry message)."""
        return {"overruns": self.overruns, "late": self.late, "read_errors": self.read_errors,
                "recalibrations": self._cur.recalibrations if self._cur is not None else 0}

    def read_window(self, bufs):
        """Fill bufs[i] (one float array per sensor, all the same length) with fresh samples.

        Raises OSError when no sample could be taken for hal.timeout_ms.
        """
        self._between_windows()
        n = len(bufs[0])
        if self._pacing == _FIFO:
            self._fill_fifo(bufs, n)
        else:
            self._fill_paced(bufs, n)

    # -- sampling -------------------------------------------------------------------------------
    def _between_windows(self):
        t = self._temp
        if t is not None and t.ready():
            try:
                self._temp_c = t.read()
            except OSError:
                self.read_errors += 1  # keep the last good value
            try:
                t.start()
            except OSError:
                self.read_errors += 1
        elif t is not None and not t.busy:
            try:
                t.start()  # the last start failed: try again
            except OSError:
                self.read_errors += 1
        if self._cur is not None:
            try:
                self._cur.check_calibration()
            except OSError:
                self.read_errors += 1

    def _others(self, bufs, i):
        """Sample every sensor but the accelerometer into slot i."""
        if self._idx_temp >= 0:
            bufs[self._idx_temp][i] = self._temp_c
        if self._cur is not None:
            b = bufs[self._idx_cur]
            try:
                b[i] = self._cur.current()
            except OSError:
                self.read_errors += 1
                b[i] = b[i - 1] if i else 0.0
        if self._adc is not None:
            bufs[self._idx_adc][i] = self._adc_volts() * self._adc_scale + self._adc_offset

    def _timed_out(self, since_ms, got, n):
        if ticks_diff(ticks_ms(), since_ms) > self.timeout_ms:
            raise OSError("%s HAL: no sample for hal.timeout_ms (%d ms) after %d of %d in this window "
                          "(%d read errors)" % (self.BOARD, self.timeout_ms, got, n, self.read_errors))

    def _fill_fifo(self, bufs, n):
        acc = self._accel
        vib = bufs[0]
        axis = self._axis
        acc.restart()  # the window starts now: samples from the idle time between windows go
        # With the FIFO empty, wait about a quarter of what it holds before asking again:
        # fewer bus transactions, and time for the port's other work, at no risk of overrun.
        idle_ms = min(10, self._depth * 1000 // (4 * self.rate_hz))
        last = ticks_ms()
        i = 0
        while i < n:
            k = 0
            try:
                k = acc.available()
                if k >= self._depth and acc.overrun():
                    self.overruns += 1
                    if self._accel_resets:
                        acc.restart()
                        continue
                while k > 0 and i < n:
                    vib[i] = acc.read(axis)
                    self._others(bufs, i)
                    i += 1
                    k -= 1
                    last = ticks_ms()
            except OSError:
                self.read_errors += 1
            if k == 0 and i < n:
                self._timed_out(last, i, n)
                if idle_ms:
                    sleep_ms(idle_ms)

    def _tick(self, _timer):
        self._due += 1  # IRQ context: no allocation

    def _fill_paced(self, bufs, n):
        acc = self._accel
        axis = self._axis if acc is not None else 0
        vib = bufs[0]
        m = self._m
        last = ticks_ms()
        if self._pacing == _TIMER:
            self._due = 0
            if self._timer is None:
                self._timer = m.Timer(self.TIMER_ID)
            self._timer.init(freq=self.rate_hz, mode=m.Timer.PERIODIC, callback=self._tick_cb)
        period_us = 1000000 // self.rate_hz
        t_next = ticks_us()
        try:
            for i in range(n):
                if self._pacing == _TIMER:
                    while self._due <= i:
                        m.idle()
                        self._timed_out(last, i, n)
                    if self._due > i + 1:
                        self.late += 1
                else:
                    while ticks_diff(t_next, ticks_us()) > 0:
                        pass
                    t_next = ticks_add(t_next, period_us)
                    if ticks_diff(ticks_us(), t_next) > 0:
                        self.late += 1  # a whole period behind: start counting afresh from now
                        t_next = ticks_add(ticks_us(), period_us)
                if acc is not None:
                    try:
                        vib[i] = acc.read(axis)
                    except OSError:
                        self.read_errors += 1
                        vib[i] = vib[i - 1] if i else 0.0
                self._others(bufs, i)
                last = ticks_ms()
        finally:
            if self._timer is not None:
                self._timer.deinit()
