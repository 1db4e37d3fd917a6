# Device code. The node's own MQTT 3.1.1 client: the PROTOCOL layer only.
#
# MicroPython first (ESP32, RP2040, unix port); also imports under CPython, where the unit
# tests talk to it byte for byte. What it does and does not do:
#
# - QoS 0 and 1 both ways; QoS 2 is refused. One connection, one thread, no background work:
#   the caller drives it with publish()/poll()/ping_if_due().
# - QoS 1 in-flight window: publish_nowait() sends up to max_inflight QoS 1 messages before
#   anything waits; each PUBACK frees its slot in a small preallocated table and is reported
#   through on_puback(pid) (and pending(pid) answers whether a pid still waits). publish()
#   is publish_nowait() plus a bounded wait for that one PUBACK. A resend after a reconnect
#   passes dup=True and the same pid (MQTT 3.1.1 4.4: same packet id, DUP flag set).
# - connect() blocks for at most ~2 x timeout_ms; connect_start()/connect_step(ms) do the
#   same in steps (non-blocking TCP connect, then CONNECT, then CONNACK), so a caller with a
#   time budget is never held longer than it allows -- except the TLS handshake, which runs
#   in one piece bounded by timeout_ms (it is CPU-bound on a microcontroller anyway), and
#   the one-time DNS lookup (the address is resolved once, at the first connect, and kept).
# - TLS: pass ssl_context (see tls.py: client certificate, key and CA in DER; MicroPython
#   reports a failed verification as ValueError, which connect turns into MQTTError too).
# - Dead broker: ping_if_due() sends PINGREQ when nothing was sent or nothing received for
#   keepalive/2, and raises MQTTError once nothing at all was received for keepalive * 1.5
#   while a PINGREQ is unanswered, or when an in-flight QoS 1 message waits for its PUBACK
#   longer than timeout_ms.
# - No reconnection, no retries, no queue. Those belong to the resilience layer above
#   (mqtt_resilient.py), which reacts to MQTTError. The seam is simple:
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
import errno
import select
import socket
import struct
import sys

from .compat import const, ticks_add, ticks_diff, ticks_ms

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
_MAX_INFLIGHT = const(256)  # largest in-flight window accepted (the table is scanned linearly)

# Connection states: closed/up is `_sock is None` / `_cstate == _CS_UP`; in between, the
# TCP connection is being opened, or CONNECT was sent and CONNACK is awaited.
_CS_UP = const(0)
_CS_TCP = const(1)
_CS_CONNACK = const(2)

_EPIPE = const(32)  # the same on Linux and lwIP

# A non-blocking connect() reports one of these while the handshake goes on.
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, getattr(errno, "EWOULDBLOCK", errno.EAGAIN))

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


def _no_delay(sock):
    # TCP_NODELAY: with the window, small PUBLISHes follow one another before the first is
    # acked, and Nagle's algorithm would hold each back until an ACK (which the peer may
    # delay by 40-200 ms). Set where the port names it (CPython, recent esp32); the unix port
    # does not export the names but takes Linux/macOS's numbers (IPPROTO_TCP 6, option 1).
    # Elsewhere (an lwIP port that would only print "option not implemented") leave it.
    opt = getattr(socket, "TCP_NODELAY", None)
    level = getattr(socket, "IPPROTO_TCP", 6)
    if opt is None and sys.platform in ("linux", "darwin"):
        opt = 1
    if opt is None:
        return
    try:
        sock.setsockopt(level, opt, 1)
    except (OSError, TypeError, ValueError):
        pass  # still works, only slower with several messages in flight


class MQTTClient:
    # Called from poll() (and while publish/subscribe wait for their answer) for every
    # incoming PUBLISH: on_message(topic: str, payload: bytes, retained: bool). A QoS 1
    # message is acknowledged after it returns; if it raises, the message is not acked.
    # Keep it short and do not publish with QoS 1 from inside it: the nested wait could take
    # the PUBACK the outer publish() is waiting for. Queue the work and do it after poll().
    on_message = None
    # Called for every PUBACK that frees an in-flight slot: on_puback(pid). A PUBACK for a
    # pid not in flight (a late answer from an earlier connection) is counted in stray_acks.
    on_puback = None
    # Called for the SUBACK of a subscribe_nowait(): on_suback(pid, granted_qos_or_0x80).
    on_suback = None

    def __init__(self, client_id, host, port=1883, *, user=None, password=None, keepalive=30,
                 timeout_ms=5000, ssl_context=None, max_packet=4096, max_inflight=8):
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
        if not 1 <= max_inflight <= _MAX_INFLIGHT:
            raise ValueError("max_inflight %r must be 1..%d" % (max_inflight, _MAX_INFLIGHT))
        self.max_inflight = max_inflight
        # The only buffers: allocated here, once, before the heap fragments.
        self._obuf = bytearray(max_packet)
        self._omv = memoryview(self._obuf)
        self._ibuf = bytearray(max_packet)
        self._imv = memoryview(self._ibuf)
        self._cbuf = bytearray(4)  # 2- and 4-byte control packets (PUBACK, PINGREQ, ...)
        self._cmv = memoryview(self._cbuf)
        self._hbuf = bytearray(1)  # fixed-header bytes, read one at a time
        self._hmv = memoryview(self._hbuf)
        # The in-flight table: packet id (0 = free slot) and ticks_ms when it was sent. Lists
        # of small ints: updating them allocates nothing; `in`/index() scan them in C.
        self._if_pid = [0] * max_inflight
        self._if_t = [0] * max_inflight
        self._if_n = 0
        self._will = None
        self._addr = None  # (family, type, proto, sockaddr), resolved at the first connect
        self._sock = None
        self._cstate = _CS_UP
        self._cdeadline = 0
        self._clean = True
        self._poller = None
        self._wpoller = None
        self._read = None
        self._write = None
        self._pending = None
        self._pid = 0
        self._last_tx = ticks_ms()
        self._last_rx = self._last_tx
        self._ping_sent = None  # ticks_ms of an unanswered PINGREQ
        self._age_check = self._last_tx  # next time ping_if_due() looks for overdue PUBACKs
        self.session_present = False
        self.oversized = 0  # incoming packets discarded for exceeding max_packet
        self.stray_acks = 0  # PUBACKs for packet ids not in flight

    @property
    def connected(self):
        """True once CONNACK accepted the connection, until a fault or close()."""
        return self._sock is not None and self._cstate == _CS_UP

    @property
    def connecting(self):
        """True between connect_start() and the CONNACK (or the fault) that ends it."""
        return self._sock is not None and self._cstate != _CS_UP

    @property
    def inflight(self):
        """QoS 1 messages sent on this connection and not yet acknowledged."""
        return self._if_n

    @property
    def window_free(self):
        """How many more QoS 1 messages publish_nowait() can send without waiting."""
        return self.max_inflight - self._if_n

    def pending(self, pid):
        """True while QoS 1 packet id `pid` waits for its PUBACK on this connection."""
        return pid != 0 and pid in self._if_pid

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

        Raises MQTTError if the host cannot be resolved or reached, if the TLS handshake
        fails, if the broker refuses (the message names the CONNACK code's meaning) or does
        not answer in timeout_ms."""
        self.connect_start(clean_session)
        while not self.connect_step(self.timeout_ms):
            pass
        return self.session_present

    def connect_start(self, clean_session=True):
        """Begin connecting without waiting: resolve the host (once: the address is kept for
        later connects), open a non-blocking TCP connection. Drive it with connect_step().
        Closes any previous connection first; the in-flight table starts empty (messages
        that were in flight are the caller's to resend, with dup=True)."""
        self.close()
        self._clean = clean_session
        for i in range(self.max_inflight):
            self._if_pid[i] = 0
        self._if_n = 0
        if self._addr is None:
            # DNS can block for seconds: resolved once, never per packet or per reconnect.
            try:
                ais = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
            except OSError as e:
                raise MQTTError("cannot resolve MQTT broker host %r: %s" % (self.host, e))
            if not ais:
                raise MQTTError("cannot resolve MQTT broker host %r: no address" % self.host)
            ai = ais[0]
            self._addr = (ai[0], ai[1], ai[2], ai[-1])
        fam, typ, proto, addr = self._addr
        sock = socket.socket(fam, typ, proto)
        self._sock = sock  # from here on, close() releases it whatever fails
        self._cstate = _CS_TCP
        try:
            _no_delay(sock)
            sock.settimeout(0)
            try:
                sock.connect(addr)
            except OSError as e:
                if e.args[0] not in _IN_PROGRESS:
                    raise MQTTError("cannot connect to MQTT broker %s:%d: %s" % (self.host, self.port, e))
            p = select.poll()
            p.register(sock, select.POLLOUT)
            self._poller = p
            self._cdeadline = ticks_add(ticks_ms(), self.timeout_ms)
        except BaseException:
            self.close()
            raise

    def connect_step(self, ms=0):
        """Advance a connect_start() for at most `ms` (plus a TLS handshake, if one is due).
        Returns True once the broker accepted (session_present is set), False while it is
        still going on. Raises MQTTError (and closes) when it fails or takes longer than
        timeout_ms for the TCP connection or for the CONNACK."""
        if self._sock is None:
            raise MQTTError("not connecting to %s:%d: call connect_start() first" % (self.host, self.port))
        if self._cstate == _CS_UP:
            return True
        start = ticks_ms()
        try:
            if self._cstate == _CS_TCP:
                if not self._tcp_step(ms):
                    return False
                ms -= ticks_diff(ticks_ms(), start)
            return self._connack_step(ms)
        except BaseException:
            self.close()
            raise

    def _tcp_step(self, ms):
        left = ticks_diff(self._cdeadline, ticks_ms())
        ev = self._poller.poll(max(0, min(ms, left)))
        if not ev:
            if ticks_diff(self._cdeadline, ticks_ms()) <= 0:
                raise MQTTError("cannot connect to MQTT broker %s:%d: no answer within %d ms"
                                % (self.host, self.port, self.timeout_ms))
            return False
        sock = self._sock
        err = 0
        if ev[0][1] & (select.POLLERR | select.POLLHUP):
            err = -1
        if hasattr(sock, "getsockopt") and hasattr(socket, "SO_ERROR"):
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or err
            except OSError:
                pass
        if err:
            why = "connection refused or unreachable" if err < 0 else errno.errorcode.get(err, err)
            raise MQTTError("cannot connect to MQTT broker %s:%d: %s" % (self.host, self.port, why))
        sock.settimeout(self.timeout_ms / 1000)
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except ValueError as e:
                # MicroPython's mbedtls raises ValueError for a certificate it rejects.
                raise MQTTError("TLS handshake with %s:%d failed: %s" % (self.host, self.port, str(e).strip()))
            except OSError as e:
                # MicroPython says only "32": name the errno and the likely cause.
                code = e.args[0] if e.args else None
                name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
                if code == _EPIPE and not name:
                    name = "EPIPE"  # not in MicroPython's errorcode table
                raise MQTTError("TLS handshake with %s:%d failed: %s%s (the broker ended it: does it "
                                "want a client certificate, from another CA, or is it expired?)"
                                % (self.host, self.port, e, " " + name if name else ""))
            self._sock = sock
        self._attach(sock)
        self._send(self._omv, self._build_connect(self._clean), "CONNECT")
        self._cstate = _CS_CONNACK
        self._cdeadline = ticks_add(ticks_ms(), self.timeout_ms)
        return True

    def _connack_step(self, ms):
        left = ticks_diff(self._cdeadline, ticks_ms())
        if not self._readable(max(0, min(ms, left))):
            if ticks_diff(self._cdeadline, ticks_ms()) <= 0:
                raise MQTTError("no CONNACK from %s:%d within %d ms" % (self.host, self.port, self.timeout_ms))
            return False
        first, n = self._read_packet("CONNACK")
        if first != _CONNACK or n != 2:
            raise MQTTError("expected CONNACK, got packet 0x%02x of %d bytes" % (first, n))
        flags, rc = self._ibuf[0], self._ibuf[1]
        if rc:
            why = _REFUSED[rc - 1] if rc <= len(_REFUSED) else "unknown reason"
            raise MQTTError("broker %s:%d refused the connection: %s (CONNACK code %d)"
                            % (self.host, self.port, why, rc))
        self.session_present = bool(flags & 1)
        self._ping_sent = None
        self._cstate = _CS_UP
        return True

    def _attach(self, sock):
        # CPython sockets have recv_into/send; MicroPython's (and its TLS wrapper) have
        # readinto/write. Same semantics for our use: bytes moved, 0 at end of stream.
        self._read = getattr(sock, "readinto", None) or sock.recv_into
        self._write = getattr(sock, "write", None) or sock.send
        p = select.poll()
        p.register(sock, select.POLLIN)
        self._poller = p
        w = select.poll()
        w.register(sock, select.POLLOUT)
        self._wpoller = w
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
        and PUBACKs for other in-flight messages meanwhile) for at most timeout_ms.
        Returns the packet id (0 for QoS 0)."""
        pid = self.publish_nowait(topic, payload, qos, retain)
        if qos:
            self._wait_acked(pid)
        return pid

    def publish_nowait(self, topic, payload, qos=1, retain=False, dup=False, pid=None):
        """Send one message without waiting for its PUBACK; returns its packet id (0 for
        QoS 0). Only when max_inflight QoS 1 messages are already in flight does it wait
        (at most timeout_ms, handling incoming packets) for one of them to be acknowledged.

        A resend passes dup=True and the message's original pid. The payload is sent
        before this returns: the caller may reuse its buffer at once. A PUBACK arrives
        later through poll() (or any other wait) and is reported by on_puback(pid)."""
        if qos != 0 and qos != 1:
            raise ValueError("publish qos %r is not supported: use 0 or 1" % qos)
        if dup and not qos:
            raise ValueError("the DUP flag is only for QoS 1 resends (MQTT 3.1.1 3.3.1.1)")
        if pid is not None and not (qos and 0 < pid <= 0xFFFF):
            raise ValueError("pid %r: give a packet id 1..65535, and only with QoS 1" % (pid,))
        t = _topic_name(topic)
        payload = _payload(payload)
        n = len(payload)
        rl = 2 + len(t) + n + (2 if qos else 0)
        self._check_fits(rl, "PUBLISH")
        self._check_connected()
        slot = -1
        if qos:
            # Find the slot first: waiting may run on_message, which may publish (QoS 0)
            # and so reuse the output buffer.
            if pid is not None and pid in self._if_pid:
                slot = self._if_pid.index(pid)  # the same message again on this connection
            else:
                if self._if_n == self.max_inflight:
                    self._wait_slot()
                if pid is None:
                    pid = self._next_pid()
                    while pid in self._if_pid:
                        pid = self._next_pid()
                slot = self._if_pid.index(0)
        buf = self._obuf
        first = _PUBLISH | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
        off = self._put_str(_put_header(buf, first, rl), t)
        if qos:
            struct.pack_into("!H", buf, off, pid)
            off += 2
        self._omv[off:off + n] = payload
        self._send(self._omv, off + n, "PUBLISH")
        if not qos:
            return 0
        if self._if_pid[slot] == 0:
            self._if_n += 1
        self._if_pid[slot] = pid
        self._if_t[slot] = self._last_tx
        return pid

    def check_publish(self, topic, payload, qos=1):
        """Raise ValueError/TypeError now if publish(topic, payload, qos) would refuse them
        (wildcard or empty topic, wrong payload type, a packet bigger than max_packet):
        for a caller that accepts a message here and sends it later."""
        t = _topic_name(topic)
        rl = 2 + len(t) + len(_payload(payload)) + (2 if qos else 0)
        self._check_fits(rl, "PUBLISH")

    def subscribe(self, topic, qos=0):
        """Subscribe to a topic filter (wildcards allowed) and wait for SUBACK.
        Returns the granted QoS; raises MQTTError if the broker refuses (0x80)."""
        pid = self.subscribe_nowait(topic, qos)
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

    def subscribe_nowait(self, topic, qos=0):
        """Send SUBSCRIBE without waiting; returns its packet id. The SUBACK arrives through
        poll() and is reported by on_suback(pid, granted QoS or 0x80 for refused)."""
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
        while pid in self._if_pid:
            pid = self._next_pid()
        struct.pack_into("!H", buf, off, pid)
        off = self._put_str(off + 2, t)
        buf[off] = qos
        self._send(self._omv, off + 1, "SUBSCRIBE")
        return pid

    def writable(self):
        """True when the socket would take more bytes now (a PUBLISH of a few hundred bytes
        then goes out without blocking): lets a caller with a time budget hold back."""
        if self._wpoller is None or not self.connected:
            return False
        for _ in self._wpoller.poll(0):
            return True
        return False

    def ping_if_due(self):
        """Keepalive duties, to call every loop turn: send PINGREQ once keepalive/2 has
        passed since the last packet sent or received. Raises MQTTError (and closes) when
        nothing was received for keepalive * 1.5 while a PINGREQ is unanswered (a dead
        broker), or when a QoS 1 message waited longer than timeout_ms for its PUBACK."""
        self._check_connected()
        now = ticks_ms()
        if self._if_n and ticks_diff(now, self._age_check) >= 0:
            # At most every timeout_ms/4: the scan is a Python loop over the table.
            self._age_check = ticks_add(now, self.timeout_ms >> 2)
            oldest = -1
            pid = 0
            for i in range(self.max_inflight):
                if self._if_pid[i]:
                    age = ticks_diff(now, self._if_t[i])
                    if age > oldest:
                        oldest, pid = age, self._if_pid[i]
            if oldest > self.timeout_ms:
                raise self._fail("no PUBACK for packet id %d from %s:%d within %d ms"
                                 % (pid, self.host, self.port, self.timeout_ms))
        if not self.keepalive:
            return
        if self._ping_sent is not None:
            if ticks_diff(now, self._last_rx) > self.keepalive * 1500:
                raise self._fail("no PINGRESP: nothing received from %s:%d for %d ms; the broker is presumed dead"
                                 % (self.host, self.port, self.keepalive * 1500))
            return
        half = self.keepalive * 500
        if ticks_diff(now, self._last_tx) >= half or ticks_diff(now, self._last_rx) >= half:
            self._send_control(_PINGREQ, -1, "PINGREQ")
            self._ping_sent = now

    def disconnect(self):
        """Say goodbye (the broker discards the last will), then close."""
        if self._sock is None:
            return
        try:
            if self._cstate == _CS_UP:
                self._send_control(_DISCONNECT, -1, "DISCONNECT")
        finally:
            self.close()

    def close(self):
        """Close the socket without DISCONNECT: to the broker this is a lost connection,
        so the last will fires. Safe to call at any time."""
        sock = self._sock
        self._sock = None
        self._cstate = _CS_UP
        self._poller = self._wpoller = None
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
        elif first == _PUBACK:
            if n != 2:
                raise self._fail("malformed PUBACK: %d bytes, expected 2" % n)
            self._acked((self._ibuf[0] << 8) | self._ibuf[1])
        elif first == _PINGRESP:
            self._ping_sent = None
        elif first == _SUBACK:
            cb = self.on_suback
            if cb is not None and n == 3:
                cb((self._ibuf[0] << 8) | self._ibuf[1], self._ibuf[2])
        elif first == _UNSUBACK:
            pass  # we never unsubscribe; a late answer to someone else's request
        elif kind == _PUBREC:
            raise self._fail("broker sent PUBREC: QoS 2 is not supported")
        else:
            raise self._fail("unexpected packet 0x%02x (%d bytes) from broker" % (first, n))

    def _acked(self, pid):
        if pid == 0 or pid not in self._if_pid:
            self.stray_acks += 1
            return
        self._if_pid[self._if_pid.index(pid)] = 0
        self._if_n -= 1
        cb = self.on_puback
        if cb is not None:
            cb(pid)

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
        if not self.connected:
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
        if self._sock is None:
            raise MQTTError("not connected to %s:%d: call connect() first" % (self.host, self.port))
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

    def _next_in_time(self, start, what, pid):
        # Read and return the next packet, waiting at most what is left of timeout_ms since
        # `start`. An oversized packet was read off the wire and counted: skip it.
        while True:
            left = self.timeout_ms - ticks_diff(ticks_ms(), start)
            if left <= 0 or not self._readable(left):
                raise self._fail("no %s for packet id %d from %s:%d within %d ms"
                                 % (what, pid, self.host, self.port, self.timeout_ms))
            try:
                return self._read_packet(what)
            except MQTTOversize:
                pass

    def _wait_for(self, expected, pid, what):
        # Handle incoming packets until `expected` carrying `pid` arrives; return its length.
        start = ticks_ms()
        while True:
            first, n = self._next_in_time(start, what, pid)
            if first == expected and n >= 2 and ((self._ibuf[0] << 8) | self._ibuf[1]) == pid:
                return n
            self._dispatch(first, n)

    def _wait_acked(self, pid):
        # Handle incoming packets until the PUBACK for `pid` has freed its slot.
        start = ticks_ms()
        while pid in self._if_pid:
            first, n = self._next_in_time(start, "PUBACK", pid)
            self._dispatch(first, n)

    def _wait_slot(self):
        # The window is full: handle incoming packets until a PUBACK frees a slot.
        start = ticks_ms()
        while self._if_n == self.max_inflight:
            first, n = self._next_in_time(start, "PUBACK", self._if_pid[0])
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
            self._last_rx = ticks_ms()
            raise MQTTOversize("packet 0x%02x of %d bytes from %s:%d exceeds max_packet %d: discarded"
                               % (first, 1 + i + n, self.host, self.port, self.max_packet))
        if n:
            self._read_into(self._imv, n, what)
        self._last_rx = ticks_ms()
        return first, n

    def _discard(self, n, what):
        # Read n bytes off the wire in buffer-sized chunks, keeping the stream in step.
        mv, size = self._imv, self.max_packet
        while n:
            k = n if n < size else size
            self._read_into(mv, k, what)
            n -= k
