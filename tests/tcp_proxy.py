"""A TCP proxy on 127.0.0.1 for network faults in tests: added latency, and cuts.

    with TcpProxy(broker_port, delay_ms=2) as proxy:   # clients connect to proxy.port
        ...
        proxy.cut()   # every open connection dies at once (both sides see it closed)

Latency is added per direction and keeps byte order: each chunk read is forwarded
`delay_ms` after it arrived, as a link with that one-way delay would (bandwidth unlimited).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from types import TracebackType

_CHUNK = 65536


class TcpProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", delay_ms: float = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay_ms / 1000
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.2)
        self.port: int = self._srv.getsockname()[1]
        self.connections = 0  # accepted so far
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                down.close()  # the broker is down: so is the proxied connection
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            with self._lock:
                self.connections += 1
                self._socks += [down, up]
            self._pipe(down, up)
            self._pipe(up, down)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            try:
                while data := src.recv(_CHUNK):
                    q.put((time.monotonic() + self.delay, data))
            except OSError:
                pass
            q.put((0.0, b""))

        def write() -> None:
            try:
                while True:
                    due, data = q.get()
                    if not data:
                        break
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                pass
            self._kill(src, dst)

        for fn in (read, write):
            t = threading.Thread(target=fn, name="tcp-proxy-pipe", daemon=True)
            t.start()
            self._threads.append(t)

    def _kill(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        """Close every proxied connection now, both sides; new ones are still accepted."""
        with self._lock:
            socks, self._socks = self._socks, []
        self._kill(*socks)

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._srv.close()
        self._accept.join(2)
        for t in self._threads:
            t.join(2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
