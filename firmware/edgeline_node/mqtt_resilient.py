# Device code. The RESILIENCE layer above the MQTT protocol layer (mqtt.py), after peterhinch
# mqtt_as's split: the protocol layer raises MQTTError on any fault; this layer reconnects
# and resends. One object, driven by the node's loop through service(budget_ms); no threads.
#
# What it does:
# - connects (persistent session: clean_session=False) with exponential backoff and equal
#   jitter: after the k-th failure in a row it waits between d/2 and d, d = min(max,
#   min * 2**k), so a fleet never reconnects in lockstep and never waits longer than max;
# - notices a dead broker from missed PINGRESPs (nothing received for 1.5 x keepalive while
#   a PINGREQ is out) or a PUBACK overdue by timeout_ms, and reconnects;
# - after every CONNACK: calls on_connect(session_present) (refresh the birth there with
#   set_birth()), re-subscribes (on the first connect of this boot, and whenever the broker
#   kept no session: a kept session still holds the subscriptions), publishes the birth
#   (retained, QoS 1), then resends every unacknowledged message with the DUP flag and its
#   original packet id, in the order they were handed in, before anything newer;
# - reports each message's fate exactly once and in hand-in order, so a queue with a single
#   delivery pointer can follow: on_ack(token) when the broker acknowledged it, on_drop(token,
#   why) in the rare case it can never be sent (its payload could not be fetched or does not
#   fit max_packet). A PUBACK that arrives out of order is held until the older ones came.
#
# Holding: while `hold` is True nothing handed in with send() is sent or resent; the birth,
# subscriptions, keepalive and incoming messages go on. The node holds while the gateway is
# offline or not yet known to be online: delivery means delivered to the gateway, and a
# message the broker acknowledged while no gateway session existed would be lost.
#
# Subscriptions made with every_connect=True are sent again after every CONNACK, even when
# the broker kept the session: a broker sends a topic's retained message only in answer to
# a SUBSCRIBE, so that is how a node learns the gateway's state again after a reconnect.
#
# What it does NOT do: own a queue across resets. The caller (the flash queue) hands in
# messages with send(topic, payload, token) while `free` > 0, keeps each one until on_ack /
# on_drop, and hands them in again after a reset. Two ways to pass the payload:
# - the bytes themselves: this layer keeps a reference (no copy) until on_ack, so the buffer
#   must not change meanwhile (a memoryview into a reused read buffer: pass bytes(view));
# - None, with on_fetch(token) set: this layer asks for the payload each time it (re)sends
#   the message, always in hand-in order from the oldest unacknowledged one, and copies it
#   into the packet at once; the returned view need only live until the next call. No
#   per-message allocation: the fit for a flash queue that reads records into one buffer.
# This layer discards nothing it was handed without saying so (on_drop). What it does
# discard -- incoming messages whose handler raised, incoming packets over max_packet -- it
# counts (saturating counters, `discarded_in`).
#
# The budget: service(budget_ms) returns within budget_ms, having waited for network events
# (or slept while the broker is down) for at most that long; service(0) waits for nothing
# but still handles what has already arrived. Exceptions, each bounded by the
# client's timeout_ms per socket operation: the one-time DNS lookup, a TLS handshake (runs in
# one piece; CPU-bound on a microcontroller), and a socket write when the socket reported
# room but less than the packet needed. It returns early once PUBACKs freed slots, so the
# caller can hand in more.
#
# Heap: the slot table is allocated in __init__ (lists of fixed length); service() and
# send() allocate nothing in the steady state beyond what the protocol layer does.
from .compat import const, sleep_ms, ticks_add, ticks_diff, ticks_ms, ticks_us
from .mqtt import MQTTOversize

TYPE_CHECKING = const(0)  # the hooks' types, for the board type check; compiled out
if TYPE_CHECKING:
    from typing import Any, Callable

try:
    from random import getrandbits
except ImportError:  # pragma: no cover - a port without `random`: the clock's low bits
    def getrandbits(n):
        return ticks_us() & ((1 << n) - 1)

_ST_QUEUED = const(0)  # handed in, not yet sent on this connection
_ST_SENT = const(1)  # sent on this connection, PUBACK awaited
_ST_ACKED = const(2)  # acknowledged; reported once every older slot is done
_ST_DROPPED = const(3)  # can never be sent; reported (on_drop) once every older slot is done
_COUNT_MAX = const(0x3FFFFFFF)  # counters saturate here: small ints, never a long int
_MAX_SUBS = const(8)


def _inc(n):
    return n + 1 if n < _COUNT_MAX else n


class ResilientMQTT:
    # Hooks, all optional, all called from inside service(). An exception from one is
    # counted in hook_errors and kept in last_error, never taken for a network fault.
    on_connect = None  # type: Callable[[bool], Any]  # after every CONNACK: session_present
    on_disconnect = None  # type: Callable[[str], Any]  # a live connection was lost: why
    on_ack = None  # type: Callable[[Any], Any]  # the broker has the message handed in with this token
    on_drop = None  # type: Callable[[Any, str], Any]  # (token, why): that message can never be sent
    on_fetch = None  # type: Callable[[Any], Any]  # token -> payload, for messages handed in with None
    on_message = None  # type: Callable[[str, bytes, bool], Any]  # (topic, payload, retained)

    def __init__(self, client, *, backoff_min_ms=500, backoff_max_ms=30000, clean_session=False):
        """`client`: an MQTTClient (its last will set, its ssl_context given) that this object
        now drives. One of its max_inflight slots is kept for the birth; the others are the
        slots send() fills, so the window never has to wait."""
        if client.max_inflight < 2:
            raise ValueError("the client needs max_inflight >= 2 (one slot is kept for the birth)")
        if not 0 < backoff_min_ms <= backoff_max_ms:
            raise ValueError("need 0 < backoff_min_ms (%r) <= backoff_max_ms (%r)"
                             % (backoff_min_ms, backoff_max_ms))
        self.client = client
        self.backoff_min_ms = backoff_min_ms
        self.backoff_max_ms = backoff_max_ms
        self.clean_session = clean_session
        n = client.max_inflight - 1
        self.slots = n
        # The slot table: a ring in hand-in order, head = oldest not yet reported.
        self._topic = [None] * n
        self._payload = [None] * n
        self._token = [None] * n
        self._retain = [False] * n
        self._pid = [0] * n  # 0: never sent; else its packet id, kept for resends
        self._state = [_ST_QUEUED] * n
        self._why = [None] * n  # why a dropped message was dropped
        self._head = 0
        self._count = 0  # slots in use (queued, sent, or done but not yet reported)
        self._tx = 0  # slots from head already dealt with on this connection
        self._birth = None  # (topic, payload)
        self._birth_due = False
        self._birth_pid = 0
        self._subs = []  # [topic filter, qos, every_connect], at most _MAX_SUBS
        self._sub_pids = [0] * _MAX_SUBS
        self._subscribed_once = False
        self._failures = 0
        self._next_try = ticks_ms()
        self._up = False
        self._freed = False
        self._stopped = False
        self.hold = False  # True: send()/resend nothing handed in (see the file's head)
        # Counters (saturating).
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.resent = 0  # PUBLISHes sent again with the DUP flag
        self.acked = 0
        self.dropped = 0  # messages reported to on_drop
        self.handler_errors = 0  # incoming messages whose on_message raised: acked, dropped
        self.hook_errors = 0
        self.subs_refused = 0
        self.last_error = None
        client.on_message = self._deliver
        client.on_puback = self._puback
        client.on_suback = self._suback

    # -- what the node calls --------------------------------------------------------------
    @property
    def connected(self):
        return self.client.connected

    @property
    def free(self):
        """How many more messages send() accepts now."""
        return self.slots - self._count

    @property
    def unacked(self):
        """Messages handed in and not yet acknowledged (nor dropped)."""
        n = 0
        for k in range(self._count):
            if self._state[(self._head + k) % self.slots] < _ST_ACKED:
                n += 1
        return n

    @property
    def discarded_in(self):
        """Incoming messages dropped: their handler raised, or they exceeded max_packet."""
        n = self.handler_errors + self.client.oversized
        return n if n < _COUNT_MAX else _COUNT_MAX

    def send(self, topic, payload, token, retain=False):
        """Hand in one QoS 1 message; on_ack(token) reports its PUBACK later (after a
        reconnect too: it is resent with DUP until acknowledged). `payload` None: fetched
        through on_fetch(token) whenever it is (re)sent. Returns False when all slots are
        taken: keep the message and offer it again after an on_ack.

        Raises ValueError/TypeError for a message the broker could never take (wildcard
        topic, bigger than max_packet): retrying cannot help, drop it and count it."""
        if self._count == self.slots:
            return False
        if payload is None:
            if self.on_fetch is None:
                raise ValueError("payload None needs on_fetch to supply it")
            self.client.check_publish(topic, b"", 1)
        else:
            self.client.check_publish(topic, payload, 1)
        i = (self._head + self._count) % self.slots
        self._topic[i] = topic
        self._payload[i] = payload
        self._token[i] = token
        self._retain[i] = retain
        self._pid[i] = 0
        self._state[i] = _ST_QUEUED
        self._count += 1
        return True

    def set_birth(self, topic, payload):
        """The retained QoS 1 message published first after every connect (and now, if
        connected). Call it from on_connect to refresh its content."""
        self.client.check_publish(topic, payload, 1)
        self._birth = (topic, payload)
        self._birth_due = True

    def subscribe(self, topic, qos=1, every_connect=False):
        """Subscribe now if connected, and again after every connect that needs it: each
        one without a kept session, or every one with every_connect=True (to get the topic's
        retained message again)."""
        if len(self._subs) == _MAX_SUBS:
            raise ValueError("at most %d subscriptions; use a wildcard filter" % _MAX_SUBS)
        self._subs.append([topic, qos, every_connect])
        if self.client.connected:
            try:
                self._sub_pids[len(self._subs) - 1] = self.client.subscribe_nowait(topic, qos)
            except OSError as e:
                self._lost(e)

    def service(self, budget_ms=0):
        """Do the network's work for at most budget_ms (see the file's head for the few
        bounded exceptions): connect when due, send what waits, handle what arrives, keep
        the connection alive. Never raises for network faults: they lead to a reconnect."""
        if self._stopped:
            return
        if budget_ms < 0:
            budget_ms = 0
        start = ticks_ms()
        c = self.client
        self._freed = False
        try:
            if not c.connected and not c.connecting:
                wait = ticks_diff(self._next_try, start)
                if wait > 0:
                    sleep_ms(wait if wait < budget_ms else budget_ms)
                    if wait >= budget_ms:
                        return
                c.connect_start(self.clean_session)
            if c.connecting:
                left = budget_ms - ticks_diff(ticks_ms(), start)
                if not c.connect_step(left if left > 0 else 0):
                    return
                self._connected()
            while True:
                self._transmit()
                c.ping_if_due()
                if self._freed:
                    return
                left = budget_ms - ticks_diff(ticks_ms(), start)
                # Out of time: still handle what has already arrived (poll(0) does not wait),
                # so that a caller with no time to spare (service(0)) gets its PUBACKs.
                try:
                    if not c.poll(left if left > 0 else 0) or left <= 0:
                        return
                except MQTTOversize:
                    pass  # read off the wire and counted by the client; the link is fine
        except OSError as e:  # MQTTError and any socket error
            self._lost(e)

    def publish_now(self, topic, payload, qos=0, retain=False):
        """Send one message now, outside the slot table (a time request: QoS 0, worthless
        late; a clean stop's death). Returns False when not connected, or when QoS 1 finds
        no free window slot; a network fault counts as a lost connection (reconnect)."""
        c = self.client
        if not c.connected or (qos and not c.window_free):
            return False
        try:
            c.publish_nowait(topic, payload, qos, retain)
        except OSError as e:
            self._lost(e)
            return False
        return True

    def disconnect(self):
        """Say goodbye (the broker drops the last will) and stop reconnecting."""
        self._stopped = True
        try:
            self.client.disconnect()
        except OSError:
            pass
        self._up = False

    # -- inside -----------------------------------------------------------------------------
    def _connected(self):
        c = self.client
        self._up = True
        self._failures = 0
        self.connects = _inc(self.connects)
        # Everything not acknowledged goes again, oldest first, with DUP.
        for k in range(self._count):
            i = (self._head + k) % self.slots
            if self._state[i] == _ST_SENT:
                self._state[i] = _ST_QUEUED
        self._tx = 0
        self._birth_pid = 0
        self._hook(self.on_connect, c.session_present)
        if self._birth is not None:
            self._birth_due = True
        every = not self._subscribed_once or not c.session_present
        for k in range(len(self._subs)):
            if every or self._subs[k][2]:
                self._sub_pids[k] = c.subscribe_nowait(self._subs[k][0], self._subs[k][1])
        self._subscribed_once = True

    def _transmit(self):
        c = self.client
        if self._birth_due and not self._birth_pid:
            if not c.window_free or not c.writable():
                return
            topic, payload = self._birth
            self._birth_pid = c.publish_nowait(topic, payload, 1, True)
            self._birth_due = False
        if self.hold:
            self._report()
            return
        # Ring order: a resend always goes before anything newer.
        while self._tx < self._count:
            i = (self._head + self._tx) % self.slots
            if self._state[i] == _ST_QUEUED:
                if not c.window_free or not c.writable():
                    return
                payload = self._payload[i]
                if payload is None:
                    payload = self._fetch(i)
                if payload is not None:
                    old = self._pid[i]
                    try:
                        self._pid[i] = c.publish_nowait(self._topic[i], payload, 1, self._retain[i],
                                                        old != 0, old or None)
                    except (ValueError, TypeError) as e:  # a fetched payload that cannot go
                        self._drop(i, "cannot publish: %s" % e)
                    else:
                        self._state[i] = _ST_SENT
                        if old:
                            self.resent = _inc(self.resent)
            self._tx += 1
        self._report()

    def _fetch(self, i):
        try:
            payload = self.on_fetch(self._token[i])
        except Exception as e:  # a record the queue cannot read back: it can never go
            self._drop(i, "on_fetch raised %r" % e)
            return None
        if payload is None:
            self._drop(i, "on_fetch returned no payload")
        return payload

    def _drop(self, i, why):
        self._state[i] = _ST_DROPPED
        self._why[i] = why
        self.last_error = why

    def _puback(self, pid):
        if pid == self._birth_pid:
            self._birth_pid = 0
            return
        for k in range(self._tx):
            i = (self._head + k) % self.slots
            if self._pid[i] == pid and self._state[i] == _ST_SENT:
                self._state[i] = _ST_ACKED
                self._report()
                return
        # Not ours (a late answer from an earlier connection): nothing to do.

    def _report(self):
        # Free the done slots at the head, oldest first, and tell the caller about each:
        # on_ack/on_drop come in hand-in order, whatever order the PUBACKs came in.
        while self._count:
            h = self._head
            st = self._state[h]
            if st < _ST_ACKED:
                return
            token, why = self._token[h], self._why[h]
            self._topic[h] = self._payload[h] = self._token[h] = self._why[h] = None
            self._pid[h] = 0
            self._state[h] = _ST_QUEUED
            self._head = (h + 1) % self.slots
            self._count -= 1
            self._tx -= 1
            self._freed = True
            if st == _ST_ACKED:
                self.acked = _inc(self.acked)
                self._hook(self.on_ack, token)
            else:
                self.dropped = _inc(self.dropped)
                cb = self.on_drop
                if cb is not None:
                    try:
                        cb(token, why)
                    except Exception as e:
                        self._hook_failed(cb, e)

    def _hook(self, cb, arg):
        # The caller's code must not pass for a network fault (an OSError from a flash write
        # in on_ack would otherwise cost the connection), nor end the loop: record, count.
        if cb is None:
            return
        try:
            cb(arg)
        except Exception as e:
            self._hook_failed(cb, e)

    def _hook_failed(self, cb, e):
        self.hook_errors = _inc(self.hook_errors)
        self.last_error = "hook %r raised %r" % (cb, e)

    def _suback(self, pid, rc):
        if rc == 0x80:
            for k in range(len(self._subs)):
                if self._sub_pids[k] == pid:
                    self.last_error = "broker refused the subscription to %r" % self._subs[k][0]
            self.subs_refused = _inc(self.subs_refused)

    def _deliver(self, topic, payload, retained):
        cb = self.on_message
        if cb is None:
            return
        try:
            cb(topic, payload, retained)
        except Exception as e:  # a handler bug must not cost the connection; counted
            self.handler_errors = _inc(self.handler_errors)
            self.last_error = "on_message(%r) raised %r" % (topic, e)

    def _lost(self, e):
        self.client.close()
        self.last_error = str(e)
        if self._up:
            self._up = False
            self.disconnects = _inc(self.disconnects)
            self._hook(self.on_disconnect, self.last_error)
        else:
            self.connect_failures = _inc(self.connect_failures)
        self._birth_pid = 0
        # Equal jitter: between d/2 and d, d doubling per failure in a row up to the cap.
        d = self.backoff_min_ms << (self._failures if self._failures < 16 else 16)
        if d > self.backoff_max_ms:
            d = self.backoff_max_ms
        self._failures += 1
        half = d // 2
        self._next_try = ticks_add(ticks_ms(), half + getrandbits(20) % (d - half + 1))
