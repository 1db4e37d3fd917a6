# Device code: the edgeline sensor node package (MicroPython first; imports under CPython).
# Modules import each other relatively so the same files work as `edgeline_node` on a board
# and as `edgeline.firmware.edgeline_node` under CPython.
VERSION = "0.1.0"
