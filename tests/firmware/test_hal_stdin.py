"""The stdin HAL (HIL stimulus, docs/hil-stimulus.md) under the MicroPython unix port and CPython.

A small driver script plays the node's loop (commands first, then a window) on stdin fed by
the test, so the line format, command ordering, end of input and the timeout are checked on
the interpreter the virtual node really runs on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from micropython_runner import FIRMWARE, micropython_binary, run_micropython

LOOP = """
import json, sys
from array import array
from edgeline_node.config import validate
from edgeline_node.hal import make_hal
cfg = validate({"node_id": "n", "machine": "m", "hal": {"kind": "stdin", "timeout_ms": %(timeout)d,
               "stdin": {"sensors": [["vibration", "g"], ["temperature", "degC"], ["current", "A"]],
                         "buffer_rows": %(buffer)d}}})
hal = make_hal(cfg["hal"])
print(json.dumps({"sensors": [list(s) for s in hal.sensors()]}))
bufs = [array("f", [0.0] * %(window)d) for _ in hal.sensors()]
while True:
    cmd = hal.read()
    while cmd is not None:
        print(json.dumps({"cmd": cmd}))
        if cmd == "stop":
            print(json.dumps({"stats": hal.stats()}))
            sys.exit(0)
        cmd = hal.read()
    try:
        hal.read_window(bufs)
    except EOFError as e:
        print(json.dumps({"eof": str(e)}))
        continue
    except OSError as e:
        print(json.dumps({"timeout": str(e.args[-1])}))
        sys.exit(3)
    print(json.dumps({"window": [list(b) for b in bufs]}))
"""


def script(window: int = 4, buffer: int = 8, timeout: int = 2000) -> str:
    return LOOP % {"window": window, "buffer": buffer, "timeout": timeout}


def interpreter_argv(interp: str, code: str) -> tuple[list[str], dict[str, str]]:
    if interp == "micropython":
        return [micropython_binary(), "-c", code], dict(os.environ, MICROPYPATH=f"{FIRMWARE}:.frozen")
    return [sys.executable, "-c", code], dict(os.environ, PYTHONPATH=str(FIRMWARE))


def run(interp: str, code: str, stdin: bytes) -> tuple[int, list[dict[str, Any]]]:
    if interp == "micropython":
        r = run_micropython(code, stdin=stdin, timeout=60)
    else:
        argv, env = interpreter_argv(interp, code)
        r = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, env=env)
    assert not r.stderr, r.stderr.decode()
    return r.returncode, [json.loads(line) for line in r.stdout.decode().splitlines()]


@pytest.fixture(params=["micropython", "cpython"])
def interp(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_rows_commands_comments_and_the_end(interp: str) -> None:
    rows = [f"{i * 0.25:g},{20 + i},{-i}" for i in range(10)]
    stim = "\n".join(
        [
            "# a recorded run",
            "status",
            *rows[:4],
            "",
            "fault bearing",
            *rows[4:8],
            "1.0,oops,2",
            "1,2",
            *rows[8:],
            "status",
        ]
    ).encode()  # no newline after the last line
    code, events = run(interp, script(), stim)
    assert code == 0
    assert events[0] == {"sensors": [["vibration", "g"], ["temperature", "degC"], ["current", "A"]]}
    flow = [e.get("cmd", "window" if "window" in e else None) for e in events if "cmd" in e or "window" in e]
    # Commands keep their place in the stream: "fault bearing" came after the first window's
    # rows, the last "status" after the second's; the first one is due at once (and handed
    # out before or after the first window, depending on when the rows arrive).
    flow.remove("status")
    assert flow == ["window", "fault bearing", "window", "status", "stop"]
    got = [e["window"] for e in events if "window" in e]
    assert got[0] == [[0.0, 0.25, 0.5, 0.75], [20, 21, 22, 23], [0, -1, -2, -3]]
    assert got[1] == [[1.0, 1.25, 1.5, 1.75], [24, 25, 26, 27], [-4, -5, -6, -7]]
    errors = [e["msg"] for e in events if e.get("ev") == "error"]
    expected = "expected 3 comma-separated numbers (vibration,temperature,current), got"
    assert errors == [
        f"stdin HAL: line 13: {expected} '1.0,oops,2'",
        f"stdin HAL: line 14: {expected} '1,2'",
    ]
    assert events[-1] == {"stats": {"rows": 10, "bad_rows": 2, "buffered": 2}}


def test_end_of_input_inside_a_window_is_an_eoferror(interp: str) -> None:
    code, events = run(interp, script(), b"1,2,3\n4,5,6\n")
    assert code == 0
    assert events[1:] == [
        {"eof": "stdin HAL: the stimulus ended with 2 of the 4 rows of a window (after 2 rows in all)"},
        {"cmd": "stop"},
        {"stats": {"rows": 2, "bad_rows": 0, "buffered": 2}},
    ]


def test_many_rows_through_a_small_buffer_lose_nothing(interp: str) -> None:
    n = 2000
    stim = "".join(f"{i},{i % 7}.5,-{i}e-3\n" for i in range(n)).encode()
    code, events = run(interp, script(window=16, buffer=20), stim)
    assert code == 0
    col0 = [v for e in events if "window" in e for v in e["window"][0]]
    assert col0 == [float(i) for i in range(n)]
    assert events[-1] == {"stats": {"rows": n, "bad_rows": 0, "buffered": 0}}


@pytest.mark.parametrize("interp_name", ["micropython", "cpython"])
def test_no_whole_window_within_the_timeout(interp_name: str) -> None:
    argv, env = interpreter_argv(interp_name, script(window=4, timeout=300))
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(b"1,2,3\n4,5,6\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["sensors"]
        t0 = time.monotonic()
        line = p.stdout.readline()
        elapsed = time.monotonic() - t0
        assert json.loads(line) == {
            "timeout": "stdin HAL: no whole window within hal.timeout_ms (300 ms): 2 of 4 rows came"
        }
        assert 0.2 < elapsed < 5
        assert p.wait(timeout=10) == 3
    finally:
        p.kill()
        p.wait()


def test_faults_come_from_the_stimulus_and_the_buffer_must_hold_a_window() -> None:
    code = script(window=16, buffer=8).replace(
        'print(json.dumps({"sensors"',
        "try:\n    hal.set_fault('bearing')\n"
        "except ValueError as e:\n    print(json.dumps({'fault': str(e)}))\n"
        'print(json.dumps({"sensors"',
    )
    r = run_micropython(code, stdin=b"1,2,3\n", timeout=30)
    lines = r.stdout.decode().splitlines()
    assert json.loads(lines[0])["fault"] == (
        "faults come from the stimulus on the stdin HAL: send the faulty samples (docs/hil-stimulus.md)"
    )
    assert r.returncode == 1
    # The unix port prints an uncaught exception's traceback on stdout.
    assert (
        lines[-1] == "ValueError: config key 'hal.stdin.buffer_rows' (8) must be at least window.samples (16)"
    )
