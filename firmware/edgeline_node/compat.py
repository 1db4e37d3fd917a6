# Device code. The few names that differ between MicroPython and CPython, in one place,
# so every other firmware module is written once for the microcontroller.
import sys
import time

IS_MICROPYTHON = sys.implementation.name == "micropython"

try:
    from micropython import const  # noqa: F401  (re-exported)
except ImportError:  # CPython: const() is only a compile-time hint on MicroPython

    def const(x):  # type: ignore[misc]  # the stub's const is generic
        return x


if IS_MICROPYTHON:
    ticks_us = time.ticks_us
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
else:  # pragma: no cover - exercised by the CPython unit tests
    _T0 = time.monotonic_ns()
    _PERIOD = 1 << 30  # MicroPython's ticks wrap at 2**30 on 32-bit ports

    def ticks_us():
        return ((time.monotonic_ns() - _T0) // 1000) & (_PERIOD - 1)

    def ticks_ms():
        return ((time.monotonic_ns() - _T0) // 1000000) & (_PERIOD - 1)

    def ticks_diff(a, b):
        d = (a - b) & (_PERIOD - 1)
        return d - _PERIOD if d >= _PERIOD // 2 else d

    def ticks_add(a, b):
        return (a + b) & (_PERIOD - 1)


def wall_us():
    """Wall-clock microseconds since the Unix epoch, 0 when the clock was never set.

    Boards without RTC sync report 0 so the gateway knows not to trust the value.
    """
    try:
        t = time.time_ns() // 1000
    except AttributeError:
        t = int(time.time()) * 1000000
    # A board whose RTC was never set starts in 2000 (MicroPython epoch): not trustworthy.
    return t if t > 1600000000000000 else 0


def sleep_ms(ms):
    if IS_MICROPYTHON:
        time.sleep_ms(ms)
    else:
        time.sleep(ms / 1000)
