"""A scripted MQTT 3.1.1 broker on 127.0.0.1 for resilience tests: one connection at a time,
each following its own plan (session present or not, which PUBLISHes to acknowledge, which
PINGREQs to answer, when to hang up). It records every packet the client sends, with the
connection's index and the time it arrived, and every packet it sends itself.

Expected bytes in tests are written by hand from the spec, never computed by the client.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def read_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_packet(conn: socket.socket) -> bytes | None:
    """One whole MQTT packet as raw bytes (the client is trusted to be sane here)."""
    head = read_exact(conn, 1)
    if head is None:
        return None
    raw, n, shift = head, 0, 0
    while True:
        b = read_exact(conn, 1)
        if b is None:
            return None
        raw += b
        n |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = read_exact(conn, n)
    return None if body is None else raw + body


def body_of(pkt: bytes) -> bytes:
    i = 1
    while pkt[i] & 0x80:
        i += 1
    return pkt[i + 1 :]


def publish_pid(pkt: bytes) -> int:
    b = body_of(pkt)
    tlen = int.from_bytes(b[:2], "big")
    return int.from_bytes(b[2 + tlen : 4 + tlen], "big")


def publish_payload(pkt: bytes) -> bytes:
    b = body_of(pkt)
    tlen = int.from_bytes(b[:2], "big")
    return b[2 + tlen + (2 if pkt[0] & 0x06 else 0) :]


@dataclass
class Plan:
    """How the broker behaves on one connection."""

    connack: bool = True  # False: accept TCP, never answer CONNECT
    session_present: bool = False
    ack: Callable[[int], bool] = field(default=lambda n: True)  # n: 1-based QoS 1 PUBLISH count
    answer_ping: Callable[[int], bool] = field(default=lambda n: True)  # n: 1-based PINGREQ count
    hang_up_after: int | None = None  # close after this many QoS 1 PUBLISHes


class FakeBroker:
    def __init__(self, plans: list[Plan]) -> None:
        self.plans = plans
        self.packets: queue.Queue[tuple[int, float, bytes]] = queue.Queue()
        self.sent: list[tuple[int, float, bytes]] = []
        self.connections = 0
        self._conn: socket.socket | None = None
        self._closed = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.2)
        self.port: int = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="fake-broker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index = self.connections
            self.connections += 1
            plan = self.plans[min(index, len(self.plans) - 1)]
            self._conn = conn
            with contextlib.suppress(OSError):
                self._talk(index, plan, conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _send(self, index: int, conn: socket.socket, raw: bytes) -> None:
        conn.sendall(raw)
        self.sent.append((index, time.monotonic(), raw))

    def _talk(self, index: int, plan: Plan, conn: socket.socket) -> None:
        publishes = pings = 0
        while (pkt := read_packet(conn)) is not None:
            self.packets.put((index, time.monotonic(), pkt))
            kind = pkt[0] & 0xF0
            if kind == 0x10 and plan.connack:
                self._send(index, conn, b"\x20\x02" + bytes([plan.session_present, 0]))
            elif kind == 0x30 and pkt[0] & 0x06:
                publishes += 1
                if plan.ack(publishes):
                    self._send(index, conn, b"\x40\x02" + publish_pid(pkt).to_bytes(2, "big"))
                if plan.hang_up_after is not None and publishes >= plan.hang_up_after:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
            elif kind == 0x80:
                b = body_of(pkt)
                self._send(index, conn, b"\x90\x03" + b[:2] + b[-1:])
            elif pkt == b"\xc0\x00":
                pings += 1
                if plan.answer_ping(pings):
                    self._send(index, conn, b"\xd0\x00")
            elif pkt == b"\xe0\x00":
                return

    def inject(self, raw: bytes) -> None:
        """Send raw bytes on the current connection (an incoming PUBLISH, say)."""
        assert self._conn is not None, "no client connected yet"
        self._conn.sendall(raw)

    def next(self, timeout: float = 5.0) -> tuple[int, float, bytes]:
        return self.packets.get(timeout=timeout)

    def take_until(self, pred: Callable[[int, bytes], bool], timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Every recorded (connection, packet) up to and including the first matching `pred`."""
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            i, _, pkt = self.packets.get(timeout=max(0.01, deadline - time.monotonic()))
            out.append((i, pkt))
            if pred(i, pkt):
                return out

    def close(self) -> None:
        self._closed.set()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv()
            with contextlib.suppress(OSError):
                self._conn.close()
        self._srv.close()
        self._thread.join(5)

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
