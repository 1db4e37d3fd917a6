"""A stand-in for a board at the end of mpremote's serial line: the MicroPython unix port
running in a folder that plays the board's filesystem.

mpremote drives a board through its raw REPL: it sends Python source, the board runs it and
answers with its output, 0x04, the error text, 0x04. FakeBoardTransport speaks the same to a
unix-port process that execs each piece of source in one persistent namespace, so mpremote's
own filesystem code (cp -r, hashing, mkdir, exec) runs unchanged on real MicroPython. Only the
serial framing is not a board's.
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path
from typing import Any

from mpremote.transport import Transport, TransportError, TransportExecError

from micropython_runner import micropython_binary

# Runs on the unix port: read "<length>\n<source>", exec it, answer like a raw REPL.
SERVER = """
import sys
g = {'__name__': '__main__'}
inp = sys.stdin.buffer
out = sys.stdout.buffer
while True:
    n = inp.readline()
    if not n:
        break
    src = inp.read(int(n))
    err = None
    try:
        exec(src, g)
    except BaseException as e:
        err = e
    out.write(b'\\x04')
    if err is not None:
        sys.print_exception(err, sys.stdout)
    out.write(b'\\x04')
    try:
        out.flush()
    except AttributeError:
        pass
"""


class FakeBoardTransport(Transport):
    def __init__(self, board_dir: Path) -> None:
        self.board_dir = board_dir
        self.in_raw_repl = False
        self.mounted = False
        self.sources: list[str] = []  # every piece of source mpremote sent, in order
        self.proc = subprocess.Popen(
            [micropython_binary(), "-c", SERVER],
            cwd=board_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, MICROPYPATH=str(board_dir)),
        )

    def enter_raw_repl(self, soft_reset: bool = True, timeout_overall: float = 10) -> None:
        self.in_raw_repl = True

    def exit_raw_repl(self) -> None:
        self.in_raw_repl = False

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def exec_raw_no_follow(self, command: Any) -> None:
        data = command.encode() if isinstance(command, str) else bytes(command)
        self.sources.append(data.decode())
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"%d\n" % len(data) + data)
        self.proc.stdin.flush()

    def _until_eot(self) -> bytes:
        assert self.proc.stdout is not None
        buf = bytearray()
        while True:
            b = self.proc.stdout.read(1)
            if not b:
                raise TransportError("the board went away")
            if b == b"\x04":
                return bytes(buf)
            buf += b

    def follow(self, timeout: float | None, data_consumer: Any = None) -> tuple[bytes, bytes]:
        out = self._until_eot()
        if data_consumer is not None and out:
            data_consumer(out)
        return out, self._until_eot()

    def exec_raw(self, command: Any, timeout: float = 10, data_consumer: Any = None) -> tuple[bytes, bytes]:
        self.exec_raw_no_follow(command)
        return self.follow(timeout, data_consumer)

    def exec(self, command: Any, data_consumer: Any = None) -> bytes:
        ret, err = self.exec_raw(command, data_consumer=data_consumer)
        if err:
            raise TransportExecError(ret, err.decode())
        return ret

    def eval(self, expression: str, parse: bool = True) -> Any:
        if parse:
            return ast.literal_eval(self.exec(f"print(repr({expression}))").strip().decode())
        return self.exec(f"print({expression})").strip()
