"""Host code. A private Mosquitto broker for tests and HIL runs, started and stopped by PID.

Each instance writes its own configuration into a temporary folder, listens on 127.0.0.1 on
a free port (a system Mosquitto may own 1883: it is never touched) and logs to a file there.

Queue limits are set deliberately, never left at Mosquitto's defaults: the stock
`max_queued_messages 1000` silently dropped 1,375 of 20,000 QoS1 messages to a slow
subscriber while the publisher received every PUBACK (DESIGN.md, measured facts).

    with MosquittoProcess() as broker:
        connect("127.0.0.1", broker.port)
        broker.stop()    # a broker outage
        broker.start()   # back on the same port
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO

from edgeline.host.ports import free_tcp_port

_FALLBACK_BINARY = "/usr/sbin/mosquitto"  # Debian installs it outside a normal user's PATH
_BIND_ATTEMPTS = 3
# Logged (at log_type information) once every listener is open; extra_config must keep it.
_RUNNING_MARK = b" running"

# The queue limits every configuration this project generates sets on purpose.
QUEUE_LIMITS = (
    "max_queued_messages 100000",
    "max_inflight_messages 100",
    "max_queued_bytes 0",
)


class MosquittoError(RuntimeError):
    """Mosquitto is missing, did not start, or did not stop."""


def mosquitto_binary() -> str:
    """Path of the `mosquitto` executable.

    :raises MosquittoError: naming the package to install when there is none.
    """
    exe = os.environ.get("EDGELINE_MOSQUITTO") or shutil.which("mosquitto")
    if exe:
        return exe
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise MosquittoError(
        "the mosquitto broker is not installed: apt-get install mosquitto (Debian package "
        "`mosquitto`), or set EDGELINE_MOSQUITTO to a mosquitto binary"
    )


class MosquittoProcess:
    """One `mosquitto -c <own config>` process on 127.0.0.1.

    :param port: TCP port; 0 picks a free one at the first start and keeps it for restarts.
    :param extra_config: further mosquitto.conf lines (e.g. `persistence true`), appended
        after the generated ones.
    :param start_timeout: seconds to wait for the port to accept connections.
    :param stop_timeout: seconds to wait after SIGTERM before SIGKILL.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        *,
        extra_config: Iterable[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port (0 picks a free one)")
        self.port = port
        self.extra_config = [str(line) for line in extra_config]
        for line in self.extra_config:
            if "\n" in line:
                raise ValueError(f"extra mosquitto config line {line!r} has a newline: pass one line each")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- properties --------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path:
        """The temp folder with mosquitto.conf, mosquitto.log and any persistence file
        (made by the first start(), removed by cleanup()).

        :raises MosquittoError: before the first start() or after cleanup().
        """
        if self._dir is None:
            raise MosquittoError("mosquitto has no work folder: call start() first (or it was cleaned up)")
        return self._dir

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------
    def config_text(self) -> str:
        lines = [
            "# written by edgeline.hil.mosquitto: a private broker for one test or HIL run",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            f"persistence_location {self.workdir}/",
            *QUEUE_LIMITS,
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to the user `mosquitto`, which cannot write this temp
            # folder (persistence). Stay the user who started the tests.
            lines.append(f"user {getpass.getuser()}")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start mosquitto and wait until its port accepts connections.

        :raises MosquittoError: if it is missing, exits, or does not listen in time (the
            message carries the tail of its log).
        """
        if self.running:
            raise MosquittoError(f"mosquitto already running at {self.url} (pid {self.pid})")
        exe = mosquitto_binary()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="edgeline-mosquitto-"))
        if self.port == 0:
            # A free port can be taken before mosquitto binds it: pick again a few times.
            for attempt in range(_BIND_ATTEMPTS):
                self.port = free_tcp_port(self.host)
                try:
                    self._spawn(exe)
                    return
                except MosquittoError:
                    if attempt == _BIND_ATTEMPTS - 1 or "in use" not in self.log_tail(3):
                        raise
        self._spawn(exe)

    def _spawn(self, exe: str) -> None:
        self.config_path.write_text(self.config_text())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        log_start = self._log.tell()  # the log is kept across restarts: read only this run's
        self._proc = subprocess.Popen(
            [exe, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise MosquittoError(
                    f"mosquitto exited with code {code} before listening on {self.url} "
                    f"(config {self.config_path}); log tail:\n{self.log_tail()}"
                )
            # The port alone proves nothing: another process may hold it while this mosquitto
            # is about to exit with "Address already in use". Its own "running" line does.
            if self._logged_running(log_start) and self._port_open():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise MosquittoError(
                    f"mosquitto did not listen on {self.url} within {self.start_timeout} s "
                    f"(config {self.config_path}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL after `stop_timeout`. Returns the exit code.

        Safe to call when not running (returns None).
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
        code = proc.returncode
        self._reap()
        return code

    def kill(self) -> int | None:
        """SIGKILL by PID at once: a broker crash, as opposed to `stop()`."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(self.stop_timeout)
        code = proc.returncode
        self._reap()
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove the temp folder (config, log, persistence)."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, MosquittoError) as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    # -- helpers -----------------------------------------------------------------------
    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _logged_running(self, offset: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return _RUNNING_MARK in f.read()
        except OSError:
            return False

    def _reap(self) -> None:
        self._proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> MosquittoProcess:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<MosquittoProcess {self.url} {state}>"
