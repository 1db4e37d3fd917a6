# Device code. Small drivers for the sensor chips the board HALs support. Each takes a bus
# object (machine.I2C or onewire.OneWire, or a test's fake with the same methods), reads into
# bytearrays allocated once in __init__, and names registers with const() so they cost no RAM.
# A driver knows its chip; which pins and which chips a board has is the HAL's business.
