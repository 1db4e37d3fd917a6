# Device code. The node's own MQTT 3.1.1 client: the PROTOCOL layer only.
#
# MicroPython first (ESP32, RP2040, unix port); also imports under CPython, where the unit
# tests talk to it byte for byte. What it does and does not do:
#
# - QoS 0 and 1 both ways; QoS 2 is refused. One connection, one thread, no background work:
#   the caller drives it with publish()/poll()/ping_if_due().
# - No reconnection, no retries, no queue. Those belong to the resilience layer above (the
#   node's store-and-forward loop), which reacts to MQTTError. The seam is simple:
#     * every network or protocol fault raises MQTTError (an OSError) and leaves the client
#       CLOSED (`connected` is False): call connect() again;
#     * two refusals leave the connection open and usable: a SUBACK refusing a subscription
#       (MQTTError) and an incoming packet bigger than max_packet (MQTTOversize), which is
#       read off the wire and discarded so the stream stays in step;
#     * bad arguments from the caller (wildcard in a PUBLISH topic, QoS 2, a packet that
#       cannot fit max_packet) raise ValueError/TypeError: retrying them cannot help.
# - Heap discipline (after micropython-lib umqtt.simple, without its asserts): two buffers of
#   max_packet bytes, allocated once in __init__, every packet built in place with
#   struct.pack_into and sent with ONE write (header and payload in separate writes would
#   meet Nagle's algorithm and the peer's delayed ACK: tens of ms per message).
# - Every socket operation is bounded: the socket carries a timeout (timeout_ms) and waits
#   for readiness use select.poll with the remaining time. The remaining length is capped at
#   4 bytes as the spec says; nothing read from the network is trusted for an allocation.
import select
import socket
import struct

from .compat import const, ticks_diff, ticks_ms

# Fixed-header first bytes (type << 4 | flags), MQTT 3.1.1 section 2.2.
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_PUBREC = const(0x50)
_SUBSCRIBE = const(0x82)  # flags 0b0010 are mandatory
_SUBACK = const(0x90)
_UNSUBACK = const(0xB0)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_PROTOCOL_LEVEL = const(4)  # 3.1.1
_CONNECT_VARHDR = const(10)  # 00 04 'MQTT' level flags keepalive(2)

# CONNECT flags (3.1.2.3).
_F_CLEAN = const(0x02)
_F_WILL = const(0x04)
_F_WILL_RETAIN = const(0x20)
_F_PASSWORD = const(0x40)
_F_USER = const(0x80)

_SUBACK_FAILURE = const(0x80)
_MAX_RL_BYTES = const(4)  # remaining length: at most 4 bytes (2.2.3)
_MIN_PACKET = const(128)  # smallest max_packet accepted: CONNECT with short fields fits
_POLL_BATCH = const(64)  # packets handled per poll() call at most, so sampling never starves

# CONNACK return codes 1..5 (3.2.2.3).
_REFUSED = (
    "unacceptable protocol version",
    "client identifier rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)


class MQTTError(OSError):
    """A network or protocol fault: the message says what, the client is closed (except for
    a refused subscription). An OSError so callers catching socket errors catch it too."""


class MQTTOversize(MQTTError):
    """An incoming packet exceeded max_packet; it was discarded, the connection stays up."""


def _rl_size(n):
    # Bytes needed to encode remaining length n (n < 268,435,456).
    if n < 0x80:
        return 1
    if n < 0x4000:
        return 2
    if n < 0x200000:
        return 3
    return 4


def _put_header(buf, first, rl):
    # Fixed header at buf[0]: first byte, then the variable-length remaining length.
    buf[0] = first
    i = 1
    while rl > 0x7F:
        buf[i] = (rl & 0x7F) | 0x80
        rl >>= 7
        i += 1
    buf[i] = rl
    return i + 1


def _utf8(s, what):
    # MQTT strings: UTF-8, at most 65,535 bytes, no U+0000 (1.5.3).
    if isinstance(s, str):
        b = s.encode()
    elif isinstance(s, (bytes, bytearray)):
        b = bytes(s)
    else:
        raise TypeError("%s must be str or bytes, not %s" % (what, type(s).__name__))
    if len(b) > 65535:
        raise ValueError("%s is %d bytes long; MQTT allows 65535" % (what, len(b)))
    if b"\x00" in b:
        raise ValueError("%s %r contains a NUL character" % (what, s))
    return b


def _topic_name(topic):
    # A topic to publish to: not empty, no wildcards (3.3.2.1).
    t = _utf8(topic, "topic")
    if not t:
        raise ValueError("topic must not be empty")
    if b"+" in t or b"#" in t:
        raise ValueError("topic %r contains a wildcard (+ or #): not allowed when publishing" % topic)
    return t


def _payload(payload):
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return payload
    raise TypeError("payload must be bytes, bytearray or memoryview, not %s" % type(payload).__name__)


class MQTTClient:
    # Called from poll() (and while publish/subscribe wait for their answer) for every
    # incoming PUBLISH: on_message(topic: str, payload: bytes, retained: bool). A QoS 1
    # message is acknowledged after it returns; if it raises, the message is not acked.
    # Keep it short and do not publish with QoS 1 from inside it: the nested wait could take
    # the PUBACK the outer publish() is waiting for. Queue the work and do it after poll().
    on_message = None

    def __init__(self, client_id, host, port=1883, *, user=None, password=None, keepalive=30,
                 timeout_ms=5000, ssl_context=None, max_packet=4096):
        self.client_id = _utf8(client_id, "client id")
        self.host = host
        self.port = port
        if password is not None and user is None:
            raise ValueError("a password needs a user name in MQTT 3.1.1")
        self.user = None if user is None else _utf8(user, "user name")
        self.password = None if password is None else _utf8(password, "password")
        if not 0 <= keepalive <= 65535:
            raise ValueError("keepalive %r must be 0..65535 s (0 disables it)" % keepalive)
        self.keepalive = keepalive
        if timeout_ms <= 0:
            raise ValueError("timeout_ms %r must be > 0" % timeout_ms)
        self.timeout_ms = timeout_ms
        self.ssl_context = ssl_context
        if max_packet < _MIN_PACKET:
            raise ValueError("max_packet %d is too small (at least %d)" % (max_packet, _MIN_PACKET))
        self.max_packet = max_packet
        # The only buffers: allocated here, once, before the heap fragments.
        self._obuf = bytearray(max_packet)
        self._omv = memoryview(self._obuf)
        self._ibuf = bytearray(max_packet)
        self._imv = memoryview(self._ibuf)
        self._cbuf = bytearray(4)  # 2- and 4-byte control packets (PUBACK, PINGREQ, ...)
        self._cmv = memoryview(self._cbuf)
        self._hbuf = bytearray(1)  # fixed-header bytes, read one at a time
        self._hmv = memoryview(self._hbuf)
        self._will = None
        self._sock = None
        self._poller = None
        self._read = None
        self._write = None
        self._pending = None
        self._pid = 0
        self._last_tx = ticks_ms()
        self._ping_sent = None  # ticks_ms of an unanswered PINGREQ
        self.session_present = False
        self.oversized = 0  # incoming packets discarded for exceeding max_packet

    @property
    def connected(self):
        return self._sock is not None

    # -- setup --------------------------------------------------------------------------
    def set_last_will(self, topic, payload, qos=0, retain=False):
        """The broker publishes this when the connection is lost without DISCONNECT.
        Takes effect at the next connect()."""
        if qos not in (0, 1, 2):
            raise ValueError("will qos %r must be 0, 1 or 2" % qos)
        p = bytes(_payload(payload))
        if len(p) > 65535:
            raise ValueError("will payload is %d bytes; MQTT allows 65535" % len(p))
        self._will = (_topic_name(topic), p, qos, retain)

    def connect(self, clean_session=True):
        """Open the connection and wait for CONNACK. Returns session_present.

        Raises MQTTError if the host cannot be resolved or reached, if the broker refuses
        (the message names the CONNACK code's meaning) or does not answer in timeout_ms."""
        self.close()
        # Resolved once per connect (DNS can block for seconds: never per packet).
        try:
            ais = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except OSError as e:
            raise MQTTError("cannot resolve MQTT broker host %r: %s" % (self.host, e))
        if not ais:
            raise MQTTError("cannot resolve MQTT broker host %r: no address" % self.host)
        ai = ais[0]
        sock = socket.socket(ai[0], ai[1], ai[2])
        self._sock = sock  # from here on, close() releases it whatever fails
        try:
            sock.settimeout(self.timeout_ms / 1000)
            try:
                sock.connect(ai[-1])
            except OSError as e:
                raise MQTTError("cannot connect to MQTT broker %s:%d: %s" % (self.host, self.port, e))
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
                except OSError as e:
                    raise MQTTError("TLS handshake with %s:%d failed: %s" % (self.host, self.port, e))
                self._sock = sock
            self._attach(sock)
            self._send(self._omv, self._build_connect(clean_session), "CONNECT")
            first, n = self._wait_packet("CONNACK")
            if first != _CONNACK or n != 2:
                raise self._fail("expected CONNACK, got packet 0x%02x of %d bytes" % (first, n))
            flags, rc = self._ibuf[0], self._ibuf[1]
            if rc:
                why = _REFUSED[rc - 1] if rc <= len(_REFUSED) else "unknown reason"
                raise self._fail("broker %s:%d refused the connection: %s (CONNACK code %d)"
                                 % (self.host, self.port, why, rc))
            self.session_present = bool(flags & 1)
            self._ping_sent = None
            return self.session_present
        except BaseException:
            self.close()
            raise

    def _attach(self, sock):
        # CPython sockets have recv_into/send; MicroPython's (and its TLS wrapper) have
        # readinto/write. Same semantics for our use: bytes moved, 0 at end of stream.
        self._read = getattr(sock, "readinto", None) or sock.recv_into
        self._write = getattr(sock, "write", None) or sock.send
        p = select.poll()
        p.register(sock, select.POLLIN)
        self._poller = p
        # CPython's TLS socket can hold decrypted bytes that poll() does not see.
        self._pending = getattr(sock, "pending", None)

    def _build_connect(self, clean_session):
        cid, will, user, pw = self.client_id, self._will, self.user, self.password
        flags = _F_CLEAN if clean_session else 0
        rl = _CONNECT_VARHDR + 2 + len(cid)
        if will is not None:
            rl += 4 + len(will[0]) + len(will[1])
            flags |= _F_WILL | (will[2] << 3) | (_F_WILL_RETAIN if will[3] else 0)
        if user is not None:
            rl += 2 + len(user)
            flags |= _F_USER
        if pw is not None:
            rl += 2 + len(pw)
            flags |= _F_PASSWORD
        self._check_fits(rl, "CONNECT")
        buf = self._obuf
        off = _put_header(buf, _CONNECT, rl)
        struct.pack_into("!H4sBBH", buf, off, 4, b"MQTT", _PROTOCOL_LEVEL, flags, self.keepalive)
        off = self._put_str(off + _CONNECT_VARHDR, cid)
        if will is not None:
            off = self._put_str(off, will[0])
            off = self._put_str(off, will[1])
        if user is not None:
            off = self._put_str(off, user)
        if pw is not None:
            off = self._put_str(off, pw)
        return off

    # -- client to broker ---------------------------------------------------------------
    def publish(self, topic, payload, qos=0, retain=False):
        """Send one message. QoS 1 blocks until its PUBACK (handling other incoming packets
        meanwhile) for at most timeout_ms. Returns the packet id (0 for QoS 0)."""
        if qos != 0 and qos != 1:
            raise ValueError("publish qos %r is not supported: use 0 or 1" % qos)
        t = _topic_name(topic)
        payload = _payload(payload)
        n = len(payload)
        rl = 2 + len(t) + n + (2 if qos else 0)
        self._check_fits(rl, "PUBLISH")
        self._check_connected()
        buf = self._obuf
        off = self._put_str(_put_header(buf, _PUBLISH | (qos << 1) | (1 if retain else 0), rl), t)
        pid = 0
        if qos:
            pid = self._next_pid()
            struct.pack_into("!H", buf, off, pid)
            off += 2
        self._omv[off:off + n] = payload
        self._send(self._omv, off + n, "PUBLISH")
        if qos:
            self._wait_for(_PUBACK, pid, "PUBACK")
        return pid

    def subscribe(self, topic, qos=0):
        """Subscribe to a topic filter (wildcards allowed) and wait for SUBACK.
        Returns the granted QoS; raises MQTTError if the broker refuses (0x80)."""
        if qos != 0 and qos != 1:
            raise ValueError("subscribe qos %r is not supported: use 0 or 1" % qos)
        t = _utf8(topic, "topic filter")
        if not t:
            raise ValueError("topic filter must not be empty")
        rl = 2 + 2 + len(t) + 1
        self._check_fits(rl, "SUBSCRIBE")
        self._check_connected()
        buf = self._obuf
        off = _put_header(buf, _SUBSCRIBE, rl)
        pid = self._next_pid()
        struct.pack_into("!H", buf, off, pid)
        off = self._put_str(off + 2, t)
        buf[off] = qos
        self._send(self._omv, off + 1, "SUBSCRIBE")
        n = self._wait_for(_SUBACK, pid, "SUBACK")
        if n != 3:
            raise self._fail("malformed SUBACK: %d bytes, expected 3" % n)
        rc = self._ibuf[2]
        if rc == _SUBACK_FAILURE:
            # The connection is fine; only this filter was refused (ACL, bad filter).
            raise MQTTError("broker refused the subscription to %r (SUBACK 0x80)" % topic)
        if rc > 2:
            raise self._fail("malformed SUBACK: return code 0x%02x" % rc)
        return rc

    def ping_if_due(self):
        """Send PINGREQ once keepalive/2 has passed since the last packet sent. Raises
        MQTTError (and closes) when a PINGREQ stays unanswered for keepalive * 1.5."""
        if not self.keepalive:
            return
        self._check_connected()
        now = ticks_ms()
        if self._ping_sent is not None:
            if ticks_diff(now, self._ping_sent) > self.keepalive * 1500:
                raise self._fail("no PINGRESP within %d ms: the broker is presumed dead"
                                 % (self.keepalive * 1500))
            return
        if ticks_diff(now, self._last_tx) >= self.keepalive * 500:
            self._send_control(_PINGREQ, -1, "PINGREQ")
            self._ping_sent = now

    def disconnect(self):
        """Say goodbye (the broker discards the last will), then close."""
        if self._sock is None:
            return
        try:
            self._send_control(_DISCONNECT, -1, "DISCONNECT")
        finally:
            self.close()

    def close(self):
        """Close the socket without DISCONNECT: to the broker this is a lost connection,
        so the last will fires. Safe to call at any time."""
        sock = self._sock
        self._sock = None
        self._poller = None
        self._read = self._write = self._pending = None
        self._ping_sent = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # -- broker to client ---------------------------------------------------------------
    def poll(self, timeout_ms=0):
        """Wait up to timeout_ms for incoming packets, then handle every one that is ready
        (at most a batch). Returns the number handled (0: nothing arrived in time)."""
        self._check_connected()
        handled = 0
        wait = timeout_ms if timeout_ms > 0 else 0
        while handled < _POLL_BATCH and self._readable(wait):
            first, n = self._read_packet("packet")
            self._dispatch(first, n)
            handled += 1
            wait = 0
        return handled

    def _dispatch(self, first, n):
        kind = first & 0xF0
        if kind == _PUBLISH:
            self._on_publish(first, n)
        elif first == _PINGRESP:
            self._ping_sent = None
        elif first == _PUBACK or first == _SUBACK or first == _UNSUBACK:
            pass  # a late answer to a request that already gave up: nothing waits for it
        elif kind == _PUBREC:
            raise self._fail("broker sent PUBREC: QoS 2 is not supported")
        else:
            raise self._fail("unexpected packet 0x%02x (%d bytes) from broker" % (first, n))

    def _on_publish(self, first, n):
        qos = (first >> 1) & 3
        if qos == 3:
            raise self._fail("malformed PUBLISH: QoS 3")
        if qos == 2:
            raise self._fail("broker sent a QoS 2 PUBLISH: not supported (subscribe with 0 or 1)")
        buf = self._ibuf
        if n < 2:
            raise self._fail("malformed PUBLISH: %d bytes" % n)
        tlen = (buf[0] << 8) | buf[1]
        off = 2 + tlen
        if off + (2 if qos else 0) > n:
            raise self._fail("malformed PUBLISH: topic length %d in a %d-byte packet" % (tlen, n))
        try:
            topic = str(self._imv[2:off], "utf-8")
        except (UnicodeError, ValueError):
            raise self._fail("malformed PUBLISH: topic is not UTF-8")
        pid = 0
        if qos:
            pid = (buf[off] << 8) | buf[off + 1]
            off += 2
        cb = self.on_message
        if cb is not None:
            cb(topic, bytes(self._imv[off:n]), bool(first & 1))
        if qos:
            self._send_control(_PUBACK, pid, "PUBACK")

    # -- wire helpers -------------------------------------------------------------------
    def _check_connected(self):
        if self._sock is None:
            raise MQTTError("not connected to %s:%d: call connect() first" % (self.host, self.port))

    def _check_fits(self, rl, what):
        total = 1 + _rl_size(rl) + rl
        if total > self.max_packet:
            raise ValueError("%s of %d bytes does not fit max_packet %d" % (what, total, self.max_packet))

    def _fail(self, msg):
        # A fault that leaves the stream unusable: close, and hand back the error to raise.
        self.close()
        return MQTTError(msg)

    def _next_pid(self):
        pid = self._pid + 1
        if pid > 0xFFFF:
            pid = 1  # 0 is not a valid packet id
        self._pid = pid
        return pid

    def _put_str(self, off, b):
        n = len(b)
        self._obuf[off] = n >> 8
        self._obuf[off + 1] = n & 0xFF
        self._omv[off + 2:off + 2 + n] = b
        return off + 2 + n

    def _send_control(self, first, pid, what):
        # PUBACK (4 bytes, with a packet id) or PINGREQ/DISCONNECT (2 bytes, pid < 0).
        c = self._cbuf
        c[0] = first
        if pid < 0:
            c[1] = 0
            self._send(self._cmv, 2, what)
        else:
            c[1] = 2
            struct.pack_into("!H", c, 2, pid)
            self._send(self._cmv, 4, what)

    def _send(self, mv, n, what):
        self._check_connected()
        off = 0
        try:
            while off < n:
                k = self._write(mv[off:n])
                if not k:  # None: would block past the timeout; 0: peer gone
                    raise OSError("socket accepted no data")
                off += k
        except OSError as e:
            raise self._fail("cannot send %s to %s:%d: %s" % (what, self.host, self.port, e))
        self._last_tx = ticks_ms()

    def _readable(self, ms):
        if self._pending is not None and self._pending():
            return True
        for _ in self._poller.poll(ms):
            return True  # POLLIN, or POLLHUP/POLLERR: the read that follows reports which
        return False

    def _wait_packet(self, what):
        # The next packet, waiting at most timeout_ms for its first byte.
        if not self._readable(self.timeout_ms):
            raise self._fail("no %s from %s:%d within %d ms" % (what, self.host, self.port, self.timeout_ms))
        return self._read_packet(what)

    def _wait_for(self, expected, pid, what):
        # Handle incoming packets until `expected` carrying `pid` arrives; return its length.
        start = ticks_ms()
        while True:
            left = self.timeout_ms - ticks_diff(ticks_ms(), start)
            if left <= 0 or not self._readable(left):
                raise self._fail("no %s for packet id %d from %s:%d within %d ms"
                                 % (what, pid, self.host, self.port, self.timeout_ms))
            first, n = self._read_packet(what)
            if first == expected and n >= 2 and ((self._ibuf[0] << 8) | self._ibuf[1]) == pid:
                return n
            self._dispatch(first, n)

    def _read_into(self, mv, n, what):
        # Exactly n bytes into memoryview mv[0:n] (a bytearray slice would be a copy), each
        # read bounded by the socket timeout.
        got = 0
        try:
            while got < n:
                k = self._read(mv[got:n])
                if k is None:  # non-blocking read with nothing there: treat as timeout
                    raise OSError("timed out")
                if k == 0:
                    raise self._fail("connection closed by %s:%d in the middle of %s"
                                     % (self.host, self.port, what))
                got += k
        except MQTTError:
            raise
        except OSError as e:
            raise self._fail("cannot read %s from %s:%d: %s" % (what, self.host, self.port, e))

    def _read_packet(self, what):
        # One whole packet: returns (first byte, remaining length), body in _ibuf[0:n].
        h, hmv = self._hbuf, self._hmv
        self._read_into(hmv, 1, what)
        first = h[0]
        n = 0
        shift = 0
        i = 0
        while True:
            if i == _MAX_RL_BYTES:
                raise self._fail("malformed packet 0x%02x from %s:%d: remaining length longer than 4 bytes"
                                 % (first, self.host, self.port))
            self._read_into(hmv, 1, what)
            n |= (h[0] & 0x7F) << shift
            i += 1
            if not h[0] & 0x80:
                break
            shift += 7
        if 1 + i + n > self.max_packet:
            self._discard(n, what)
            self.oversized += 1
            raise MQTTOversize("packet 0x%02x of %d bytes from %s:%d exceeds max_packet %d: discarded"
                               % (first, 1 + i + n, self.host, self.port, self.max_packet))
        if n:
            self._read_into(self._imv, n, what)
        return first, n

    def _discard(self, n, what):
        # Read n bytes off the wire in buffer-sized chunks, keeping the stream in step.
        mv, size = self._imv, self.max_packet
        while n:
            k = n if n < size else size
            self._read_into(mv, k, what)
            n -= k
