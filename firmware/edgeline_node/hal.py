# Device code. make_hal(cfg["hal"]) picks the HAL named by hal.kind and imports only that
# one, so a board never loads another board's code (or the `machine` module under CPython).
#   sim     simulated rotating machine (hal_sim.py): no hardware, faults on command
#   stdin   samples fed line by line on stdin by the HIL rig (hal_stdin.py, docs/hil-stimulus.md)
#   esp32   ESP32 / ESP32-S3 with real sensors (hal_esp32.py, docs/boards.md)
#   rp2040  Raspberry Pi Pico / Pico W with real sensors (hal_rp2040.py, docs/boards.md)
# Every HAL has sensors() -> ((name, unit), ...), read_window(bufs) and set_fault(name).


def make_hal(cfg_hal):
    kind = cfg_hal["kind"]
    if kind == "sim":
        from .hal_sim import SimulatedMachine
        return SimulatedMachine(seed=cfg_hal["seed"], rate_hz=cfg_hal["rate_hz"])
    if kind == "stdin":
        from .hal_stdin import StdinHAL
        return StdinHAL(cfg_hal)
    if kind == "esp32":
        from .hal_esp32 import ESP32HAL
        return ESP32HAL(cfg_hal)
    if kind == "rp2040":
        from .hal_rp2040 import RP2040HAL
        return RP2040HAL(cfg_hal)
    raise ValueError("config key 'hal.kind' must be one of sim, stdin, esp32, rp2040, got %r" % (kind,))
