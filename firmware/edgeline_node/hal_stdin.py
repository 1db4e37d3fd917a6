# Device code (MicroPython unix port, HIL rig). A HAL whose samples come in on stdin, one
# text line per sample instant, so a rig replays recorded or synthetic signals through the
# real node code. Line format (docs/hil-stimulus.md):
#   0.012,38.41,-3.2      a sample row: one number per sensor, in hal.stdin.sensors order
#   fault bearing         anything starting with a letter is a node command, passed on in order
#   # comment             ignored, as are blank lines
# read_window(bufs) blocks until a whole window of rows has come (or hal.timeout_ms passes:
# OSError; or stdin ends first: EOFError). Rows are read only while the row buffer has room,
# so a fast rig is held back by the pipe rather than losing rows.
#
# This HAL owns stdin: the node takes its commands from read() (same contract as its own
# stdin reader) instead of reading stdin itself. Commands keep their place in the stream: one
# is handed out once every whole window of rows sent before it has been read. At the end of
# stdin, read() says "stop" once no whole window is left, so the node stops after the last.
import json
import os
import select
import sys
from array import array

from .compat import IS_MICROPYTHON, ticks_add, ticks_diff, ticks_ms

_MAX_COMMANDS = 32
_ROW_START = "0123456789+-."


def _log_error(msg):
    sys.stdout.write(json.dumps({"ev": "error", "msg": msg}))
    sys.stdout.write("\n")


class StdinHAL:
    def __init__(self, cfg_hal, stream=None):
        st = cfg_hal["stdin"]
        self._sensors = tuple((s[0], s[1]) for s in st["sensors"])
        self.rate_hz = cfg_hal["rate_hz"]
        self.timeout_ms = cfg_hal["timeout_ms"]
        self._cap = st["buffer_rows"]
        self._ring = [array("f", [0.0] * self._cap) for _ in self._sensors]
        self._head = 0
        self._len = 0
        self._want = 1  # samples per window, known from the first read_window
        self._cmds = []  # (rows accepted before it, command line), oldest first
        self._taken = 0  # rows handed out in windows
        self.rows = 0  # sample rows accepted
        self.bad_rows = 0  # lines that were neither a row nor a command (each logged)
        self.lineno = 0
        self.eof = False
        self._stopped = False
        self._in = stream if stream is not None else sys.stdin
        # CPython's text stdin reads ahead, which poll() cannot see: read the file descriptor
        # in chunks and split lines here. MicroPython's stdin readline() reads byte by byte.
        self._raw = not IS_MICROPYTHON
        self._part = b""
        self._poll = select.poll()
        self._poll.register(self._in, select.POLLIN)

    # -- the HAL interface ----------------------------------------------------------------------
    def sensors(self):
        return self._sensors

    def set_fault(self, name):
        raise ValueError("faults come from the stimulus on the stdin HAL: send the faulty samples "
                         "(docs/hil-stimulus.md)")

    def stats(self):
        return {"rows": self.rows, "bad_rows": self.bad_rows, "buffered": self._len}

    def read_window(self, bufs):
        """Fill bufs[i] with the next len(bufs[0]) values of column i; block until they came."""
        n = len(bufs[0])
        if n > self._cap:
            raise ValueError("config key 'hal.stdin.buffer_rows' (%d) must be at least window.samples (%d)"
                             % (self._cap, n))
        self._want = n
        deadline = ticks_add(ticks_ms(), self.timeout_ms)
        while self._len < n:
            if self.eof:
                raise EOFError("stdin HAL: the stimulus ended with %d of the %d rows of a window (after %d "
                               "rows in all)" % (self._len, n, self.rows))
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                raise OSError(110, "stdin HAL: no whole window within hal.timeout_ms (%d ms): %d of %d rows "
                                   "came" % (self.timeout_ms, self._len, n))
            self._pump(left)
        cap = self._cap
        for c in range(len(bufs)):
            src = self._ring[c]
            dst = bufs[c]
            j = self._head
            for i in range(n):
                dst[i] = src[j]
                j += 1
                if j == cap:
                    j = 0
        self._head = (self._head + n) % cap
        self._len -= n
        self._taken += n

    def read(self):
        """The next command line (stripped) or None, without blocking; "stop" once after stdin
        ended with no whole window left."""
        self._pump(0)
        if self._cmds:
            if self._cmds[0][0] - self._taken < self._want:
                return self._cmds.pop(0)[1]
            return None
        if self.eof and self._len < self._want and not self._stopped:
            self._stopped = True
            return "stop"
        return None

    # -- input ----------------------------------------------------------------------------------
    def _pump(self, wait_ms):
        """Take in what stdin has, waiting up to wait_ms for something, while rows fit."""
        while self._len < self._cap:
            if self._raw and b"\n" in self._part:
                line, self._part = self._part.split(b"\n", 1)
                self._line(line.decode())
                continue
            if self.eof or not self._poll.poll(wait_ms):
                return
            wait_ms = 0
            if self._raw:
                data = os.read(self._in.fileno(), 4096)
                if not data:
                    self.eof = True
                    if self._part:  # a last line without its newline
                        self._line(self._part.decode())
                        self._part = b""
                self._part += data
            else:
                line = self._in.readline()
                if not line:
                    self.eof = True
                    return
                self._line(line)

    def _line(self, line):
        self.lineno += 1
        line = line.strip()
        if not line or line[0] == "#":
            return
        c = line[0]
        if c in _ROW_START or line[:3].lower() in ("nan", "inf"):
            self._row(line)
        elif len(self._cmds) < _MAX_COMMANDS:
            self._cmds.append((self.rows, line))
        else:
            _log_error("stdin HAL: line %d: more than %d commands waiting, dropped %r"
                       % (self.lineno, _MAX_COMMANDS, line))

    def _row(self, line):
        parts = line.split(",")
        k = len(self._sensors)
        # _pump reads only while the ring has room, so slot j is free.
        j = (self._head + self._len) % self._cap
        try:
            if len(parts) != k:
                raise ValueError
            for c in range(k):
                self._ring[c][j] = float(parts[c])
        except ValueError:
            self._bad(line, "%d comma-separated numbers" % k)
            return
        self._len += 1
        self.rows += 1

    def _bad(self, line, expected):
        self.bad_rows += 1
        _log_error("stdin HAL: line %d: expected %s (%s), got %r" % (
            self.lineno, expected, ",".join(s[0] for s in self._sensors), line[:80]))
