"""Host-side marker so the firmware ships inside the `edgeline` wheel.

Nothing here runs on a board: `edgeline node deploy` copies `boot.py`, `main.py` and the
`edgeline_node/` package, never this file. Under CPython the node package imports as
`edgeline.firmware.edgeline_node` for fast unit tests.
"""
