# Device code (MicroPython first; also imports under CPython, where the gateway reuses the
# key numbers and the tests check it against Python's hmac module).
# The node's side of the southbound commands (docs/southbound.md): authenticate a model or
# config push with a per-device HMAC-SHA256 tag, receive a chunked model into a flash slot
# while hashing it, and turn a time-sync answer into a wall clock.
#
#   hmac_sha256(key, msg) -> 32 bytes         RFC 2104 by hand: MicroPython has no hmac module
#   compare_digest(a, b) -> bool              constant time for equal lengths
#   command_tag(key, sha256, version, node)   the tag: HMAC(key, sha256 || u32be(version) || node)
#   ModelReceiver(...).chunk(msg) -> MORE | DONE | DUPLICATE | IGNORED
#   verify_config(msg, node, key, min_version) -> the config's CBOR bytes
#   time_request(node, boot, t1) / WallClock.sync(resp, t4) / WallClock.now_us()
#   ack(node, boot, cmd_id, version, status, reason) -> the cmd/ack map
#   SouthboundError(ValueError) with .status, the text the node acks with
#
# A push is authenticated before anything is written: every chunk carries the model's
# sha256, version and tag, so chunk 0 alone proves the gateway announced this exact file for
# this node; the bytes that follow are then hashed as they stream to flash and must match.
# The key numbers (K_* >= 50, KIND_* >= 7) are proposed for wire.py; until they move there
# they live here, and host/southbound.py imports them from this module.
import hashlib
import struct

from .compat import const, ticks_diff, ticks_us

# -- wire numbers (docs/southbound.md; defined in wire.py) ---------------------------------
from .wire import (  # noqa: E402  (the numbers live in wire.py with the rest of the contract)
    K_CMD_ID,
    K_DATA,
    K_INDEX,
    K_SHA256,
    K_SIZE,
    K_STATUS,
    K_T1,
    K_T2,
    K_T3,
    K_TAG,
    K_TOTAL,
    K_VERSION,
    KIND_CMD_ACK,
    KIND_CMD_CONFIG,
    KIND_CMD_MODEL,
    KIND_TIME_REQ,
    KIND_TIME_RESP,
    KIND_NAMES,
)

# Topic suffix of each command kind: edgeline/v1/{site}/{node}/<suffix>
CMD_TOPICS = {k: KIND_NAMES[k] for k in (KIND_CMD_MODEL, KIND_CMD_CONFIG, KIND_TIME_REQ, KIND_TIME_RESP,
                                         KIND_CMD_ACK)}

# The wire's common keys (wire.py), repeated here as literals so this module stands alone.
_K_V = const(0)
_K_KIND = const(1)
_K_NODE = const(2)
_K_BOOT = const(3)
_K_REASON = const(43)
_SCHEMA = const(1)

# Ack statuses: what a node answers a command with.
OK = "ok"
BAD_MESSAGE = "bad-message"  # not a command map of this schema, or a field has the wrong type
WRONG_NODE = "wrong-node"  # addressed to another node
BAD_TAG = "bad-tag"  # the HMAC does not verify: not from our gateway, or for another target
BAD_SHA = "bad-sha"  # the bytes received do not hash to the announced sha256
STALE_VERSION = "stale-version"  # older than what the node runs: a replay or a downgrade
TOO_LARGE = "too-large"  # bigger than the slot
BAD_CHUNK = "bad-chunk"  # a chunk missing, out of order, or inconsistent with chunk 0
SELF_TEST = "self-test"  # a model that verified but did not load or pass its self-test: rolled back
BAD_CONFIG = "bad-config"  # a config that verified but is not a valid config for this node

# Results of ModelReceiver.chunk().
MORE = const(1)  # accepted and written; more chunks to come
DONE = const(2)  # the last chunk: the whole model is written and its sha256 verified
DUPLICATE = const(3)  # a chunk already written (QoS1 redelivery): nothing done
IGNORED = const(4)  # a chunk of a push that already ended (done or refused): nothing done

_BLOCK = const(64)  # SHA-256 block size (RFC 2104's B)
_MIN_KEY = const(16)  # bytes; provisioning makes 32
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class SouthboundError(ValueError):
    """A command was refused. `.status` is the ack status, the message says why."""

    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) from hashlib.sha256 alone."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    n = len(key)
    for i in range(_BLOCK):
        k = key[i] if i < n else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    inner = hashlib.sha256(ipad)
    inner.update(msg)
    outer = hashlib.sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def compare_digest(a, b):
    """True when a == b, in time that depends only on the length (tags have a public length)."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0


def tag_message(sha256, version, node_id):
    """What the tag covers: the file's hash, its version and the target node, in that order."""
    return bytes(sha256) + struct.pack(">I", version) + node_id.encode()


def command_tag(key, sha256, version, node_id):
    """The gateway's tag for `sha256` at `version` sent to `node_id` (also what a node checks)."""
    if len(key) < _MIN_KEY:
        raise ValueError("device key of %d bytes is too short (at least %d)" % (len(key), _MIN_KEY))
    if len(sha256) != 32:
        raise ValueError("sha256 must be 32 bytes, got %d" % len(sha256))
    if not 0 <= version <= _U32:
        raise ValueError("version %r is out of range 0..2**32-1" % (version,))
    return hmac_sha256(key, tag_message(sha256, version, node_id))


def verify_tag(key, sha256, version, node_id, tag):
    return compare_digest(command_tag(key, sha256, version, node_id), tag)


def load_key(path):
    """A device key file as provisioning writes it: 64 hex digits (whitespace ignored)."""
    import binascii

    with open(path) as f:
        text = f.read().strip()
    try:
        key = binascii.unhexlify(text)
    except ValueError:
        raise ValueError("device key file %s is not hex" % path)
    if len(key) < _MIN_KEY:
        raise ValueError("device key in %s is %d bytes; at least %d" % (path, len(key), _MIN_KEY))
    return key


# -- checking a decoded command map --------------------------------------------------------
def _field(m, key, typ, what):
    v = m.get(key) if isinstance(m, dict) else None
    if v is None or not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise SouthboundError(BAD_MESSAGE, "key %d (%s) is missing or not %s" % (key, what, typ.__name__))
    return v


def _uint(m, key, what, hi=_U32):
    v = _field(m, key, int, what)
    if not 0 <= v <= hi:
        raise SouthboundError(BAD_MESSAGE, "key %d (%s) = %d is out of range 0..%d" % (key, what, v, hi))
    return v


def _header(m, kind, node_id):
    if not isinstance(m, dict) or m.get(_K_V) != _SCHEMA:
        raise SouthboundError(BAD_MESSAGE, "not a schema %d command map" % _SCHEMA)
    if m.get(_K_KIND) != kind:
        raise SouthboundError(BAD_MESSAGE, "kind %r is not %d" % (m.get(_K_KIND), kind))
    target = _field(m, _K_NODE, str, "node id")
    if target != node_id:
        raise SouthboundError(WRONG_NODE, "command for node %r, this is %r" % (target, node_id))


def _authenticate(m, node_id, key, min_version):
    """Check version, sha256 and tag of a command; return (cmd_id, version, sha256, tag)."""
    cmd_id = _uint(m, K_CMD_ID, "command id")
    version = _uint(m, K_VERSION, "version")
    sha = _field(m, K_SHA256, bytes, "sha256")
    tag = _field(m, K_TAG, bytes, "tag")
    if len(sha) != 32 or len(tag) != 32:
        raise SouthboundError(BAD_MESSAGE, "sha256 and tag must be 32 bytes each")
    # The tag first: an unauthenticated sender learns nothing about our version.
    if not verify_tag(key, sha, version, node_id, tag):
        raise SouthboundError(BAD_TAG, "tag does not verify for node %r version %d" % (node_id, version))
    if version < min_version:
        raise SouthboundError(STALE_VERSION,
                              "version %d is older than the running %d" % (version, min_version))
    return cmd_id, version, sha, tag


# -- model push: chunks streamed to a slot ---------------------------------------------------
class ModelReceiver:
    """Receives one model push at a time for this node.

    `open_slot()` is called once a push's chunk 0 has been authenticated and must return an
    object with write(bytes) and close(): the inactive flash slot, truncated. Nothing is
    written for a push whose tag does not verify. DONE means every byte is written and hashes
    to the authenticated sha256: only then may the caller swap slots. On a refusal (raised as
    SouthboundError) the slot is closed and its contents must not be used.
    """

    def __init__(self, node_id, key, open_slot, max_size, min_version=0):
        if len(key) < _MIN_KEY:
            raise ValueError("device key of %d bytes is too short (at least %d)" % (len(key), _MIN_KEY))
        self.node_id = node_id
        self.key = key
        self.open_slot = open_slot
        self.max_size = max_size
        self.min_version = min_version  # the running model's version: older pushes are refused
        self.cmd_id = None  # the push in progress
        self.finished = None  # the last push that ended (DONE or refused): its chunks are IGNORED
        self._orphan = None  # the last push seen without its chunk 0: its chunks are IGNORED
        self.version = 0
        self.sha256 = None
        self._tag = None
        self._size = 0
        self._total = 0
        self._next = 0
        self._written = 0
        self._hash = None
        self._slot = None

    @property
    def written(self):
        return self._written

    def chunk(self, m):
        """Handle one decoded cmd/model map; see the module comment for the results.

        :raises SouthboundError: the push is refused; ack with its .status.
        """
        _header(m, KIND_CMD_MODEL, self.node_id)
        cmd_id = _uint(m, K_CMD_ID, "command id")
        index = _uint(m, K_INDEX, "chunk index")
        if cmd_id == self.finished or cmd_id == self._orphan:
            return IGNORED
        if index == 0:
            if cmd_id == self.cmd_id:
                return DUPLICATE
            # A new push: once authenticated, it supersedes one still in progress.
            self._start(m, cmd_id)
        elif cmd_id != self.cmd_id:
            # Chunk 0 of this push was missed: refuse it once, and leave a push in progress alone.
            self._orphan = cmd_id
            raise SouthboundError(BAD_CHUNK, "chunk %d of push %d, whose chunk 0 never came"
                                  % (index, cmd_id))
        elif index < self._next:
            return DUPLICATE
        elif index > self._next:
            return self._refuse(cmd_id, BAD_CHUNK,
                                "chunk %d arrived, chunk %d was expected" % (index, self._next))
        # Every chunk repeats the authenticated header; one that differs is not part of this push.
        if (
            m.get(K_VERSION) != self.version
            or m.get(K_SHA256) != self.sha256
            or m.get(K_TAG) != self._tag
            or m.get(K_SIZE) != self._size
            or m.get(K_TOTAL) != self._total
        ):
            return self._refuse(cmd_id, BAD_CHUNK, "chunk %d does not match chunk 0's header" % index)
        data = m.get(K_DATA)
        if not isinstance(data, (bytes, bytearray)):
            return self._refuse(cmd_id, BAD_MESSAGE, "key %d (data) is missing or not bytes" % K_DATA)
        if self._written + len(data) > self._size:
            return self._refuse(cmd_id, BAD_CHUNK,
                                "chunk %d runs past the announced %d bytes" % (index, self._size))
        if self._slot is None:
            self._slot = self.open_slot()
        self._slot.write(data)
        self._hash.update(data)
        self._written += len(data)
        self._next = index + 1
        if self._next < self._total:
            return MORE
        self._close()
        if self._written != self._size:
            return self._refuse(cmd_id, BAD_CHUNK, "got %d bytes, %d announced" % (self._written, self._size))
        if not compare_digest(self._hash.digest(), self.sha256):
            return self._refuse(cmd_id, BAD_SHA, "the model received does not hash to the announced sha256")
        self.cmd_id = None
        self.finished = cmd_id  # a redelivered chunk of it is ignored: the ack is already sent
        return DONE

    def abort(self):
        """End the push in progress without a verdict from here (its slot could not be
        written): the slot is closed and must not be used; later chunks of it are IGNORED.
        Returns its cmd_id, or None when none was in progress."""
        cmd_id = self.cmd_id
        self._close()
        self.cmd_id = None
        if cmd_id is not None:
            self.finished = cmd_id
        return cmd_id

    def _start(self, m, cmd_id):
        # Authenticated first: a forged chunk 0 must not abandon a genuine push in progress.
        try:
            _, version, sha, tag = _authenticate(m, self.node_id, self.key, self.min_version)
            size = _uint(m, K_SIZE, "size")
            total = _uint(m, K_TOTAL, "chunk count")
            if size > self.max_size:
                raise SouthboundError(TOO_LARGE, "model of %d bytes does not fit the %d-byte slot"
                                      % (size, self.max_size))
            if size == 0 or not 1 <= total <= size:
                raise SouthboundError(BAD_MESSAGE, "size %d in %d chunks is not a model" % (size, total))
        except SouthboundError:
            self.finished = cmd_id
            raise
        self._close()
        self.cmd_id = cmd_id
        self.version = version
        self.sha256 = sha
        self._tag = tag
        self._size = size
        self._total = total
        self._next = 0
        self._written = 0
        self._hash = hashlib.sha256()

    def _refuse(self, cmd_id, status, msg):
        self._close()
        self.cmd_id = None
        self.finished = cmd_id
        raise SouthboundError(status, msg)

    def _close(self):
        if self._slot is not None:
            slot, self._slot = self._slot, None
            slot.close()


# -- config push: one message -----------------------------------------------------------
def verify_config(m, node_id, key, min_version=0):
    """Authenticate a decoded cmd/config map; return (cmd_id, version, config CBOR bytes).

    The caller decodes the bytes (cbor.loads) and validates them as a config.
    :raises SouthboundError: refused; ack with its .status.
    """
    _header(m, KIND_CMD_CONFIG, node_id)
    cmd_id, version, sha, _ = _authenticate(m, node_id, key, min_version)
    data = _field(m, K_DATA, bytes, "config bytes")
    if not compare_digest(hashlib.sha256(data).digest(), sha):
        raise SouthboundError(BAD_SHA, "the config does not hash to the announced sha256")
    return cmd_id, version, data


# -- acks ----------------------------------------------------------------------------------
def ack(node_id, boot, cmd_id, version, status, reason=None):
    """The cmd/ack map a node publishes after a push (QoS1): status OK or a refusal code."""
    m = {_K_V: _SCHEMA, _K_KIND: KIND_CMD_ACK, _K_NODE: node_id, _K_BOOT: boot, K_CMD_ID: cmd_id,
         K_VERSION: version, K_STATUS: status}
    if reason:
        m[_K_REASON] = reason[:120]
    return m


# -- time sync (NTP-style: t1, t4 on the node's ticks; t2, t3 on the gateway's wall clock) --
def time_request(node_id, boot, t1=None):
    """The cmd/time/req map (QoS0: a late answer is useless). t1 defaults to ticks_us() now."""
    return {_K_V: _SCHEMA, _K_KIND: KIND_TIME_REQ, _K_NODE: node_id, _K_BOOT: boot,
            K_T1: ticks_us() if t1 is None else t1}


class WallClock:
    """Wall-clock microseconds on a node without an RTC, from the gateway's time answers.

    sync() takes an answer and the node's ticks_us() when it arrived (t4): the round trip
    is (t4 - t1) - (t3 - t2), and the wall clock at t4 is t3 plus half of it. now_us() then
    runs on ticks_us; it must be called (or sync() run) at least every few minutes, since
    ticks wrap at 2**30 us (~18 min) and ticks_diff is only exact below half of that.
    """

    def __init__(self, max_rtt_us=500000):
        self.max_rtt_us = max_rtt_us
        self.synced = False
        self.rtt_us = -1
        self._base_wall = 0
        self._base_ticks = 0
        self._pending = {}  # t1 -> True for requests not yet answered (bounded)

    def request(self, node_id, boot):
        """A time request to send now; remembers its t1 so only its answer is accepted."""
        m = time_request(node_id, boot)
        if len(self._pending) >= 4:
            self._pending = {}
        self._pending[m[K_T1]] = True
        return m

    def sync(self, m, node_id, t4=None):
        """Apply a decoded cmd/time/resp map; returns the round trip in us.

        :raises SouthboundError: not an answer to one of our requests, or too slow to trust.
        """
        if t4 is None:
            t4 = ticks_us()
        _header(m, KIND_TIME_RESP, node_id)
        # ticks wrap at 2**30 on 32-bit ports but at 2**62 on the 64-bit unix port.
        t1 = _uint(m, K_T1, "t1", _U64)
        t2 = _uint(m, K_T2, "t2", _U64)
        t3 = _uint(m, K_T3, "t3", _U64)
        if self._pending and t1 not in self._pending:
            raise SouthboundError(BAD_MESSAGE, "time answer for t1=%d, which this node did not ask" % t1)
        self._pending.pop(t1, None)
        rtt = ticks_diff(t4, t1) - (t3 - t2)
        if rtt < 0 or t3 < t2 or rtt > self.max_rtt_us:
            raise SouthboundError(BAD_MESSAGE, "time answer with round trip %d us is not trusted" % rtt)
        self._base_wall = t3 + rtt // 2
        self._base_ticks = t4
        self.rtt_us = rtt
        self.synced = True
        return rtt

    def now_us(self, ticks=None):
        """Wall clock us since the epoch at `ticks` (default now); 0 before the first sync."""
        if not self.synced:
            return 0
        if ticks is None:
            ticks = ticks_us()
        d = ticks_diff(ticks, self._base_ticks)
        if d > 0:  # roll the base forward, so it never falls a whole ticks period behind
            self._base_wall += d
            self._base_ticks = ticks
            return self._base_wall
        return self._base_wall + d


def topic(site, node_id, kind):
    """edgeline/v1/{site}/{node}/cmd/... for one of the KIND_* above."""
    return "edgeline/v1/" + site + "/" + node_id + "/" + CMD_TOPICS[kind]
