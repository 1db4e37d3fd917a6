"""The node's MQTT 3.1.1 client (firmware/edgeline_node/mqtt.py).

1. Byte for byte under CPython against a fake peer: a socket server thread that plays the
   broker, records every packet and answers CONNACK/PUBACK/SUBACK/PINGRESP. Expected bytes
   are written out by hand from the MQTT 3.1.1 spec, not computed by the code under test.
2. Malformed input from the peer -> MQTTError, quickly (every wait is bounded), under
   CPython and under the MicroPython unix port.
3. End to end under MicroPython against the real brokers (Mosquitto and amqtt, through the
   `broker` fixture of tests/brokers.py), with paho-mqtt as the independent peer.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho
import pytest
from edgeline.firmware.edgeline_node.mqtt import MQTTClient, MQTTError, MQTTOversize
from paho.mqtt.enums import CallbackAPIVersion

from brokers import Broker
from micropython_runner import run_micropython

CONNACK_OK = b"\x20\x02\x00\x00"


# -- the fake peer ----------------------------------------------------------------------
def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_packet(conn: socket.socket) -> bytes | None:
    """One whole MQTT packet as raw bytes (the client is trusted to be sane here)."""
    head = _read_exact(conn, 1)
    if head is None:
        return None
    raw, n, shift = head, 0, 0
    while True:
        b = _read_exact(conn, 1)
        if b is None:
            return None
        raw += b
        n |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = _read_exact(conn, n)
    return None if body is None else raw + body


class FakePeer:
    """Plays the broker for one connection; `packets` receives every packet the client sends.

    connack: bytes to answer CONNECT with (None: stay silent); after_connack: raw bytes sent
    right after it (malformed input for the client to read).
    """

    def __init__(self, connack: bytes | None = CONNACK_OK, after_connack: bytes = b"") -> None:
        self.connack = connack
        self.after_connack = after_connack
        self.answer_publish = True
        self.answer_pings = True
        self.suback_code: int | None = None  # None: grant the requested QoS
        self.before_puback = b""  # raw bytes sent just before a PUBACK
        self.packets: queue.Queue[bytes] = queue.Queue()
        self.client_closed = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(10)
        self.port: int = self._srv.getsockname()[1]
        self._conn: socket.socket | None = None
        self._accepted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-mqtt-peer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._srv.accept()
        except OSError:
            return
        self._conn = conn
        self._accepted.set()
        try:
            while (pkt := _read_packet(conn)) is not None:
                self.packets.put(pkt)
                reply = self._reply(pkt)
                if reply:
                    conn.sendall(reply)
        except OSError:
            pass  # the test closed the connection under us
        self.client_closed.set()

    def _reply(self, pkt: bytes) -> bytes:
        kind = pkt[0] & 0xF0
        body = pkt[2:] if pkt[1] < 0x80 else pkt[3:]
        if kind == 0x10:
            return b"" if self.connack is None else self.connack + self.after_connack
        if kind == 0x30 and pkt[0] & 0x06 and self.answer_publish:
            tlen = int.from_bytes(body[:2], "big")
            return self.before_puback + b"\x40\x02" + body[2 + tlen : 4 + tlen]
        if kind == 0x80:
            code = body[-1] if self.suback_code is None else self.suback_code
            return b"\x90\x03" + body[:2] + bytes([code])
        if pkt == b"\xc0\x00" and self.answer_pings:
            return b"\xd0\x00"
        return b""

    def send(self, raw: bytes) -> None:
        assert self._accepted.wait(5), "the client never connected"
        assert self._conn is not None
        self._conn.sendall(raw)

    def hang_up(self) -> None:
        assert self._accepted.wait(5)
        assert self._conn is not None
        self._conn.shutdown(socket.SHUT_RDWR)

    def next(self, timeout: float = 5.0) -> bytes:
        return self.packets.get(timeout=timeout)

    def nothing_sent(self, within: float = 0.1) -> bool:
        try:
            self.packets.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._srv.close()
        self._thread.join(5)


@pytest.fixture
def peer() -> Iterator[FakePeer]:
    p = FakePeer()
    yield p
    p.close()


def connected(peer: FakePeer, **kw: Any) -> MQTTClient:
    c = MQTTClient("node-1", "127.0.0.1", peer.port, **kw)
    c.connect()
    peer.next()  # the CONNECT
    return c


# -- packets byte for byte ----------------------------------------------------------------
def test_connect_with_will_user_password_keepalive(peer: FakePeer) -> None:
    c = MQTTClient("node-1", "127.0.0.1", peer.port, user="node-1", password="s3cret", keepalive=30)
    c.set_last_will("edgeline/v1/s1/node-1/death", b"\xa1\x00\xf4", qos=1, retain=True)
    assert c.connect() is False
    assert peer.next() == (
        b"\x10\x44"  # CONNECT, remaining length 68
        b"\x00\x04MQTT\x04"  # protocol name and level 4 (3.1.1)
        b"\xee"  # user, password, will retain, will QoS 1, will, clean session
        b"\x00\x1e"  # keepalive 30 s
        b"\x00\x06node-1"
        b"\x00\x1bedgeline/v1/s1/node-1/death"
        b"\x00\x03\xa1\x00\xf4"
        b"\x00\x06node-1"
        b"\x00\x06s3cret"
    )
    assert c.connected
    c.close()


def test_connect_minimal_persistent_session_reports_session_present() -> None:
    p = FakePeer(connack=b"\x20\x02\x01\x00")
    try:
        c = MQTTClient("n", "127.0.0.1", p.port, keepalive=0)
        assert c.connect(clean_session=False) is True
        assert p.next() == b"\x10\x0d\x00\x04MQTT\x04\x00\x00\x00\x00\x01n"
        c.close()
    finally:
        p.close()


def test_publish_qos0_and_two_byte_remaining_length(peer: FakePeer) -> None:
    c = connected(peer)
    assert c.publish("a/b", b"hi") == 0
    assert peer.next() == b"\x30\x07\x00\x03a/bhi"
    c.publish("t", memoryview(b"x" * 200))
    assert peer.next() == b"\x30\xcb\x01\x00\x01t" + b"x" * 200  # 203 = 0xcb 0x01
    c.close()


def test_publish_qos1_waits_for_puback_and_numbers_packets(peer: FakePeer) -> None:
    c = connected(peer)
    assert c.publish("a/b", b"hi", qos=1, retain=True) == 1
    assert peer.next() == b"\x33\x09\x00\x03a/b\x00\x01hi"
    assert c.publish("a/b", bytearray(b"hi"), qos=1) == 2
    assert peer.next() == b"\x32\x09\x00\x03a/b\x00\x02hi"
    c.close()


def test_publish_qos1_handles_incoming_publish_while_waiting(peer: FakePeer) -> None:
    got: list[tuple[str, bytes, bool]] = []
    c = connected(peer)
    c.on_message = lambda t, p, r: got.append((t, p, r))
    peer.before_puback = b"\x32\x0b\x00\x05cmd/x\x00\x07ok"
    assert c.publish("a/b", b"hi", qos=1) == 1
    assert got == [("cmd/x", b"ok", False)]
    assert peer.next() == b"\x32\x09\x00\x03a/b\x00\x01hi"
    assert peer.next() == b"\x40\x02\x00\x07"  # our PUBACK for the incoming QoS 1 message
    c.close()


def test_subscribe_and_refusal(peer: FakePeer) -> None:
    c = connected(peer)
    assert c.subscribe("cmd/#", qos=1) == 1
    assert peer.next() == b"\x82\x0a\x00\x01\x00\x05cmd/#\x01"
    peer.suback_code = 0x80
    with pytest.raises(MQTTError, match=r"refused the subscription to 'acl/denied'"):
        c.subscribe("acl/denied")
    assert peer.next() == b"\x82\x0f\x00\x02\x00\x0aacl/denied\x00"
    assert c.connected  # a refused filter does not end the connection
    c.publish("a/b", b"hi")
    assert peer.next() == b"\x30\x07\x00\x03a/bhi"
    c.close()


def test_poll_dispatches_and_acks_qos1(peer: FakePeer) -> None:
    got: list[tuple[str, bytes, bool]] = []
    c = connected(peer)
    c.on_message = lambda t, p, r: got.append((t, p, r))
    assert c.poll(0) == 0
    peer.send(b"\x31\x09\x00\x05cmd/yok" + b"\x32\x0b\x00\x05cmd/x\x00\x07ok")
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        c.poll(100)
    assert got == [("cmd/y", b"ok", True), ("cmd/x", b"ok", False)]
    assert peer.next() == b"\x40\x02\x00\x07"
    c.close()


def test_pingreq_when_half_keepalive_elapsed(peer: FakePeer) -> None:
    c = connected(peer, keepalive=1)
    c.ping_if_due()
    assert peer.nothing_sent(0.1), "pinged although a packet was sent just now"
    time.sleep(0.5)
    c.ping_if_due()
    assert peer.next() == b"\xc0\x00"
    assert c.poll(1000) == 1  # the PINGRESP
    c.ping_if_due()  # answered and just sent: nothing due, no error
    c.close()


def test_unanswered_ping_means_dead_broker(peer: FakePeer) -> None:
    # Dead = nothing received for 1.5 x keepalive (the broker's own rule, 3.1.2.10) while
    # a PINGREQ is unanswered: counted from the last packet received, here the CONNACK.
    peer.answer_pings = False
    t_connack = time.monotonic()
    c = connected(peer, keepalive=1)
    time.sleep(0.5)
    c.ping_if_due()
    assert peer.next() == b"\xc0\x00"
    t0 = time.monotonic()
    with pytest.raises(MQTTError, match=r"no PINGRESP: nothing received from .* for 1500 ms"):
        while time.monotonic() - t0 < 3:
            c.poll(50)
            c.ping_if_due()
    assert 1.4 < time.monotonic() - t_connack < 1.8
    assert 0.8 < time.monotonic() - t0 < 1.3
    assert not c.connected


def test_ping_when_only_receiving_is_idle(peer: FakePeer) -> None:
    # A node that publishes QoS 0 all the time never goes quiet on send; silence on the
    # receive side alone must still trigger a PINGREQ, or a dead broker goes unnoticed.
    c = connected(peer, keepalive=1)
    t0 = time.monotonic()
    pinged_at = None
    while pinged_at is None and time.monotonic() - t0 < 1.0:
        c.publish("a/b", b"x")
        c.ping_if_due()
        while not peer.packets.empty():
            pkt = peer.next()
            if pkt == b"\xc0\x00":
                pinged_at = time.monotonic() - t0
            else:
                assert pkt == b"\x30\x06\x00\x03a/bx"
        time.sleep(0.05)
    assert pinged_at is not None and 0.45 < pinged_at < 0.7
    c.close()


def test_disconnect_then_close(peer: FakePeer) -> None:
    c = connected(peer)
    c.disconnect()
    assert peer.next() == b"\xe0\x00"
    assert peer.client_closed.wait(2)
    assert not c.connected
    c.disconnect()  # idempotent, like close()
    c.close()
    with pytest.raises(MQTTError, match="not connected"):
        c.publish("a/b", b"x")


def test_bad_arguments_are_value_errors(peer: FakePeer) -> None:
    c = connected(peer, max_packet=256)
    for topic in ("a/+/b", "a/#", ""):
        with pytest.raises(ValueError):
            c.publish(topic, b"x")
    with pytest.raises(ValueError, match="qos 2"):
        c.publish("a/b", b"x", qos=2)
    with pytest.raises(ValueError, match="does not fit max_packet 256"):
        c.publish("a/b", b"x" * 300)
    with pytest.raises(TypeError):
        c.publish("a/b", 42)
    with pytest.raises(ValueError, match="wildcard"):
        c.set_last_will("a/#", b"x")
    with pytest.raises(ValueError, match="password needs a user"):
        MQTTClient("n", "127.0.0.1", password="pw")
    assert c.connected and peer.nothing_sent(0.05)
    c.close()


def test_window_sends_before_waiting_and_tracks_pubacks(peer: FakePeer) -> None:
    peer.answer_publish = False
    acks: list[int] = []
    c = connected(peer, max_inflight=3)
    c.on_puback = acks.append
    assert [c.publish_nowait("a/b", b"%d" % i) for i in range(3)] == [1, 2, 3]
    assert [peer.next() for _ in range(3)] == [
        b"\x32\x08\x00\x03a/b\x00\x010",
        b"\x32\x08\x00\x03a/b\x00\x021",
        b"\x32\x08\x00\x03a/b\x00\x032",
    ]
    assert (c.inflight, c.window_free, c.pending(2)) == (3, 0, True)
    peer.send(b"\x40\x02\x00\x02" + b"\x40\x02\x00\x09" + b"\x40\x02\x00\x01")  # 9: never sent
    while c.poll(500) and len(acks) < 2:
        pass
    assert acks == [2, 1]
    assert (c.inflight, c.window_free, c.pending(2), c.pending(3), c.stray_acks) == (1, 2, False, True, 1)
    c.close()


def test_resend_carries_dup_flag_and_the_same_packet_id(peer: FakePeer) -> None:
    c = connected(peer)
    assert c.publish_nowait("a/b", b"hi", dup=True, pid=7) == 7
    assert peer.next() == b"\x3a\x09\x00\x03a/b\x00\x07hi"  # 0x30 | DUP 0x08 | QoS 1 0x02
    assert c.publish_nowait("a/b", b"hi", retain=True) == 1  # the counter is not disturbed
    assert peer.next() == b"\x33\x09\x00\x03a/b\x00\x01hi"
    with pytest.raises(ValueError, match="DUP flag is only for QoS 1"):
        c.publish_nowait("a/b", b"x", qos=0, dup=True)
    with pytest.raises(ValueError, match=r"packet id 1\.\.65535"):
        c.publish_nowait("a/b", b"x", pid=0x10000)
    c.close()


def test_full_window_waits_for_a_puback_then_times_out(peer: FakePeer) -> None:
    peer.answer_publish = False
    c = connected(peer, max_inflight=2, timeout_ms=300)
    c.publish_nowait("a/b", b"1")
    c.publish_nowait("a/b", b"2")
    t0 = time.monotonic()
    with pytest.raises(MQTTError, match=r"no PUBACK for packet id 1 .* within 300 ms"):
        c.publish_nowait("a/b", b"3")
    assert 0.25 < time.monotonic() - t0 < 1.0
    assert not c.connected
    assert [peer.next() for _ in range(2)] and peer.nothing_sent(0.05)  # the third never went out


def test_overdue_puback_is_a_dead_link(peer: FakePeer) -> None:
    # Traffic keeps flowing (PINGRESPs), but one PUBACK never comes: after timeout_ms the
    # connection is declared dead, so the message gets resent on a new one.
    peer.answer_publish = False
    c = connected(peer, keepalive=1, timeout_ms=400)
    c.publish_nowait("a/b", b"x")
    t0 = time.monotonic()
    with pytest.raises(MQTTError, match=r"no PUBACK for packet id 1 .* within 400 ms"):
        while time.monotonic() - t0 < 2:
            c.poll(20)
            c.ping_if_due()
    assert 0.38 < time.monotonic() - t0 < 0.6


def test_connect_in_steps_never_waits_longer_than_asked() -> None:
    p = FakePeer(connack=None)  # accepts TCP, never answers CONNECT
    try:
        c = MQTTClient("n", "127.0.0.1", p.port, timeout_ms=400)
        c.connect_start(clean_session=False)
        assert c.connecting and not c.connected
        steps, t0, longest = 0, time.monotonic(), 0.0
        with pytest.raises(MQTTError, match=r"no CONNACK from .* within 400 ms"):
            while True:
                ts = time.monotonic()
                done = c.connect_step(20)
                longest = max(longest, time.monotonic() - ts)
                assert not done
                steps += 1
        assert longest < 0.08 and steps >= 5
        assert 0.38 < time.monotonic() - t0 < 0.7
        assert not c.connecting and not c.connected
        assert p.next() == b"\x10\x0d\x00\x04MQTT\x04\x00\x00\x1e\x00\x01n"  # clean session 0
    finally:
        p.close()


def test_subscribe_nowait_reports_suback(peer: FakePeer) -> None:
    got: list[tuple[int, int]] = []
    c = connected(peer)
    c.on_suback = lambda pid, rc: got.append((pid, rc))
    pid = c.subscribe_nowait("cmd/#", 1)
    assert peer.next() == b"\x82\x0a\x00\x01\x00\x05cmd/#\x01"
    c.poll(1000)
    assert got == [(pid, 1)]
    c.close()


# -- faults: MQTTError, never a hang --------------------------------------------------------
def test_connack_refused_names_the_reason() -> None:
    p = FakePeer(connack=b"\x20\x02\x00\x05")
    try:
        c = MQTTClient("n", "127.0.0.1", p.port)
        with pytest.raises(MQTTError, match=r"refused the connection: not authorized \(CONNACK code 5\)"):
            c.connect()
        assert not c.connected
    finally:
        p.close()


@pytest.mark.parametrize(
    ("connack", "message"),
    [
        (None, "no CONNACK from .* within 300 ms"),
        (b"\xd0\x00", "expected CONNACK, got packet 0xd0"),
        (b"\x20\x03\x00\x00\x00", "expected CONNACK, got packet 0x20 of 3 bytes"),
    ],
    ids=["silent", "pingresp", "long-connack"],
)
def test_connect_without_proper_connack(connack: bytes | None, message: str) -> None:
    p = FakePeer(connack=connack)
    try:
        c = MQTTClient("n", "127.0.0.1", p.port, timeout_ms=300)
        t0 = time.monotonic()
        with pytest.raises(MQTTError, match=message):
            c.connect()
        assert time.monotonic() - t0 < 1.5
        assert not c.connected
    finally:
        p.close()


def test_connect_to_closed_port() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MQTTError, match=f"cannot connect to MQTT broker 127.0.0.1:{port}"):
        MQTTClient("n", "127.0.0.1", port, timeout_ms=500).connect()


@pytest.mark.parametrize(
    ("raw", "hang_up", "message"),
    [
        (b"\x30\xff\xff\xff\xff\x7f", False, "remaining length longer than 4 bytes"),
        (b"\x30\x10\x00\x03abc", True, "connection closed by 127.0.0.1:.* in the middle of packet"),
        (b"\x30\x10\x00\x03abc", False, "cannot read packet from 127.0.0.1:.*"),  # stalls: timeout
        (b"\x30\x05\x00\x09abc", False, "malformed PUBLISH: topic length 9 in a 5-byte packet"),
        (b"\x34\x07\x00\x03a/b\x00\x01", False, "QoS 2 PUBLISH: not supported"),
        (b"\x20\x02\x00\x00", False, r"unexpected packet 0x20"),
    ],
    ids=["rl-5-bytes", "closed-mid-packet", "stalled-mid-packet", "bad-topic-length", "qos2", "connack"],
)
def test_malformed_input_raises_and_closes(peer: FakePeer, raw: bytes, hang_up: bool, message: str) -> None:
    c = connected(peer, timeout_ms=300)
    peer.send(raw)
    if hang_up:
        peer.hang_up()
    t0 = time.monotonic()
    with pytest.raises(MQTTError, match=message):
        c.poll(2000)
    assert time.monotonic() - t0 < 1.5
    assert not c.connected


def test_no_puback_times_out(peer: FakePeer) -> None:
    peer.answer_publish = False
    c = connected(peer, timeout_ms=300)
    t0 = time.monotonic()
    with pytest.raises(MQTTError, match=r"no PUBACK for packet id 1 from .* within 300 ms"):
        c.publish("a/b", b"x", qos=1)
    assert 0.25 < time.monotonic() - t0 < 1.5
    assert not c.connected


def test_oversized_packet_is_discarded_and_stream_stays_in_step(peer: FakePeer) -> None:
    got: list[tuple[str, bytes, bool]] = []
    c = connected(peer, max_packet=256)
    c.on_message = lambda t, p, r: got.append((t, p, r))
    # 1005 = 0x3ed: remaining length 0xed 0x07; 1008 bytes in all.
    peer.send(b"\x30\xed\x07\x00\x03a/b" + b"y" * 1000 + b"\x30\x07\x00\x03a/bok")
    with pytest.raises(MQTTOversize, match=r"1008 bytes .* exceeds max_packet 256: discarded"):
        c.poll(2000)
    assert c.connected and c.oversized == 1
    assert c.poll(2000) == 1
    assert got == [("a/b", b"ok", False)]
    c.close()


# -- the same faults under MicroPython ------------------------------------------------------
MICRO_FAULT = """
import json
from edgeline_node.mqtt import MQTTClient, MQTTError, MQTTOversize
c = MQTTClient('mp-fault', '127.0.0.1', {port}, timeout_ms=300, max_packet=256)
c.connect()
out = {{}}
try:
    c.poll(2000)
    out['error'] = None
except MQTTOversize as e:
    out['error'] = 'MQTTOversize'
    out['message'] = str(e)
except MQTTError as e:
    out['error'] = 'MQTTError'
    out['message'] = str(e)
out['connected'] = c.connected
print(json.dumps(out))
"""


@pytest.mark.micropython
@pytest.mark.parametrize(
    ("raw", "error", "message", "still_connected"),
    [
        (b"\x30\xff\xff\xff\xff\x7f", "MQTTError", "remaining length longer than 4 bytes", False),
        (b"\x30\x10\x00\x03abc", "MQTTError", "cannot read packet", False),
        (b"\x20\x02\x00\x00", "MQTTError", "unexpected packet 0x20", False),
        (b"\x30\xed\x07" + b"z" * 1005, "MQTTOversize", "exceeds max_packet 256", True),
    ],
    ids=["rl-5-bytes", "stalled-mid-packet", "connack", "oversized"],
)
def test_malformed_input_under_micropython(
    raw: bytes, error: str, message: str, still_connected: bool
) -> None:
    p = FakePeer(after_connack=raw)
    try:
        t0 = time.monotonic()
        r = run_micropython(MICRO_FAULT.format(port=p.port), timeout=10)
        assert r.returncode == 0, r.stderr.decode()
        out = json.loads(r.stdout.decode().strip().splitlines()[-1])
        assert out["error"] == error
        assert message in out["message"]
        assert out["connected"] is still_connected
        assert time.monotonic() - t0 < 3
    finally:
        p.close()


# -- end to end: MicroPython client, real broker, paho as the independent peer ---------------
class PahoPeer:
    """A paho-mqtt 2 client in the test process: subscribes, publishes, collects."""

    def __init__(self, broker: Broker) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._acks: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = lambda *a: self._connected.set()
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.on_subscribe = lambda _c, _u, mid, *a: self._acks.setdefault(mid, threading.Event()).set()
        self.c.connect(broker.host, broker.port, keepalive=30)
        self.c.loop_start()
        assert self._connected.wait(5), f"paho could not connect to {broker.name} at {broker.url}"

    def subscribe(self, topic: str) -> None:
        rc, mid = self.c.subscribe(topic, qos=1)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None, f"paho could not subscribe to {topic}"
        assert self._acks.setdefault(mid, threading.Event()).wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def take(self, n: int, timeout: float = 10.0) -> list[paho.MQTTMessage]:
        out: list[paho.MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def paho_peer(broker: Broker) -> Iterator[PahoPeer]:
    p = PahoPeer(broker)
    yield p
    p.close()


@pytest.fixture
def topic() -> str:
    return f"edgeline/test/{uuid.uuid4().hex[:8]}"


def micropython_json(script: str, heapsize: str | None = None, **consts: Any) -> Any:
    """Run `script` under MicroPython with `consts` defined; return its last line as JSON."""
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in consts.items())
    prelude = "import json\nfrom edgeline_node.mqtt import MQTTClient\n"
    r = run_micropython(prelude + head + script, heapsize=heapsize, timeout=30)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


PUBLISH_200 = """
import gc
payloads = [str(i).encode() for i in range(200)]
ids = []
c = MQTTClient('mp-pub', HOST, PORT)
c.connect()
ids.append(c.publish(TOPIC, payloads[0], qos=1))
gc.collect()
before = gc.mem_alloc()
for i in range(1, 200):
    c.publish(TOPIC, payloads[i], qos=1)
gc.collect()
grown = gc.mem_alloc() - before
c.disconnect()
print(json.dumps({'first_id': ids[0], 'last_id': c._pid, 'heap_growth': grown}))
"""


@pytest.mark.micropython
def test_e2e_publish_200_qos1_in_order(broker: Broker, paho_peer: PahoPeer, topic: str) -> None:
    paho_peer.subscribe(topic)
    # 128 KB: enough to compile the client from source; a board imports it as .mpy.
    out = micropython_json(PUBLISH_200, "128k", HOST=broker.host, PORT=broker.port, TOPIC=topic)
    assert (out["first_id"], out["last_id"]) == (1, 200)
    # Packets are built in the client's own buffers: 199 publishes leave nothing behind.
    assert out["heap_growth"] <= 256, out
    got = paho_peer.take(200)
    assert [m.payload for m in got] == [str(i).encode() for i in range(200)], broker.name
    assert {m.topic for m in got} == {topic}
    assert {m.qos for m in got} == {1}


SUBSCRIBE_RECEIVE = """
import time
got = []
c = MQTTClient('mp-sub', HOST, PORT)
c.on_message = lambda t, p, r: got.append([t, p.decode(), r])
c.connect()
granted = c.subscribe(TOPIC + '/cmd/#', 1)
c.publish(TOPIC + '/ready', b'1', qos=1)
t0 = time.ticks_ms()
while len(got) < 2 and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    c.poll(100)
c.disconnect()
print(json.dumps({'granted': granted, 'got': got}))
"""


@pytest.mark.micropython
def test_e2e_subscribe_receives_retained_and_live(broker: Broker, paho_peer: PahoPeer, topic: str) -> None:
    paho_peer.publish(f"{topic}/cmd/config", b"v1", retain=True)
    paho_peer.subscribe(f"{topic}/ready")
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            micropython_json, SUBSCRIBE_RECEIVE, HOST=broker.host, PORT=broker.port, TOPIC=topic
        )
        ready = paho_peer.take(1, timeout=10)
        assert ready and ready[0].topic == f"{topic}/ready", "the MicroPython client never got ready"
        paho_peer.publish(f"{topic}/cmd/fault", b"bearing")
        out = run.result(timeout=20)
    assert out["granted"] == 1
    assert out["got"] == [[f"{topic}/cmd/config", "v1", True], [f"{topic}/cmd/fault", "bearing", False]]


LAST_WILL = """
import time
wills = []
w = MQTTClient('mp-watch', HOST, PORT)
w.on_message = lambda t, p, r: wills.append([t, p.decode()])
w.connect()
w.subscribe(TOPIC + '/death', 1)
# A clean goodbye: the broker must discard this will.
a = MQTTClient('mp-a', HOST, PORT)
a.set_last_will(TOPIC + '/death', b'a gone', qos=1)
a.connect()
a.publish(TOPIC + '/birth', b'a', qos=1)
a.disconnect()
# A lost connection: the socket closes without DISCONNECT, the process lives on.
b = MQTTClient('mp-b', HOST, PORT)
b.set_last_will(TOPIC + '/death', b'b gone', qos=1)
b.connect()
b.publish(TOPIC + '/birth', b'b', qos=1)
b.close()
t0 = time.ticks_ms()
while not wills and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    w.poll(100)
w.poll(300)
w.disconnect()
print(json.dumps(wills))
"""


@pytest.mark.micropython
def test_e2e_last_will_on_close_not_on_disconnect(broker: Broker, paho_peer: PahoPeer, topic: str) -> None:
    paho_peer.subscribe(f"{topic}/death")
    wills = micropython_json(LAST_WILL, HOST=broker.host, PORT=broker.port, TOPIC=topic)
    assert wills == [[f"{topic}/death", "b gone"]]  # seen by the MicroPython process itself
    got = paho_peer.take(1, timeout=5)
    assert [(m.topic, m.payload) for m in got] == [(f"{topic}/death", b"b gone")]
    assert paho_peer.take(1, timeout=0.3) == []


def test_reconnect_after_broker_restart(broker: Broker, topic: str) -> None:
    # CPython client: the protocol layer reports the outage and connects again afterwards.
    c = MQTTClient("cp-restart", broker.host, broker.port, timeout_ms=2000)
    c.connect()
    c.publish(topic, b"before", qos=1)
    broker.server.stop()
    with pytest.raises(MQTTError):
        c.publish(topic, b"during", qos=1)
        c.poll(1000)  # a write can still succeed into the kernel buffer; the read cannot
    assert not c.connected
    with pytest.raises(MQTTError, match="cannot connect"):
        c.connect()
    broker.server.start()
    assert broker.server.port == broker.port
    c.connect()
    assert c.publish(topic, b"after", qos=1) > 0
    c.disconnect()
