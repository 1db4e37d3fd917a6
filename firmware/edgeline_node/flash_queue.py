# Device code. The node's flash-backed store-and-forward queue: every encoded message the
# node measured is written here first and leaves only once delivered; it survives resets,
# outages and power cuts. docs/store-and-forward.md is the prose; the format is below.
#
# MicroPython first (ESP32/RP2040 on littlefs, the unix port); also imports under CPython,
# where the unit tests run it. Heap discipline: the read buffer (max_record bytes), the
# header buffer and the pointer-slot buffer are allocated once in __init__; payloads are
# handed out as memoryview slices of the read buffer; every file read is a readinto.
# Memory is bounded by the number of segments (capacity / segment size, plus one active
# segment per priority), never by the number of records.
#
# On flash, one directory:
#
#   q<p>_<segno:08d>.seg  append-only segment files, one stream of them per priority p
#                         (0 telemetry, 1 event, 2 anomaly event). segno is unique across
#                         streams and grows; a segment is at most segment_bytes long.
#   pointer               8 slots of 32 bytes, written round-robin: the delivery pointer,
#                         the drop counters and an eviction intent (below).
#
# A record (little-endian), records back to back in a segment:
#
#   0  u8   0xEB magic
#   1  u8   format version (1)
#   2  u16  payload length n (1 .. max_record)
#   4  u8   priority (must match the file's stream)
#   5  u8   kind (the wire kind: 1 evt, 2 tel), which selects the MQTT topic
#   6  u32  rseq: record sequence, unique and increasing across all streams
#   10 u32  CRC32 of bytes 1..9 and of the payload
#   14 n    payload: the message exactly as encoded at measurement time (it carries its
#           own boot and seq; it is never re-encoded)
#
# A pointer slot:
#
#   0  u8   0xEB magic, 1 u8 0x50 ('P'), 2 u8 version 1, 3 u8 0
#   4  u32  generation (the slot with the highest valid generation wins)
#   8  u32  delivered: every record with rseq <= delivered has been delivered
#   12 u32  drops of priority 0, 16 u32 priority 1, 20 u32 priority 2
#   24 u32  evict: segno of the segment this slot's drop counters already include (0: none)
#   28 u32  CRC32 of bytes 0..27
#
# Replay is in rseq order: the merge of the three streams' heads. The delivery pointer is
# committed lazily (every commit_every acks, or commit_ms after the first uncommitted ack),
# so after a crash up to that many delivered records are sent again: the gateway dedupes
# them on (node, boot, seq), which the payload carries unchanged.
#
# When a record does not fit capacity_bytes (the sum of the segment files): delivered
# segments are deleted first; then whole segments are evicted, oldest first, from the
# lowest-priority stream not above the new record's priority; if only higher priorities
# are left, the new record itself is dropped. Each eviction writes a pointer slot naming
# the segment (the "intent") with the drop counter increased by the exact number of
# undelivered records in it, then deletes the file; recovery deletes a named segment
# that still exists, so the counters stay exact across a power cut at any point.
#
# Recovery at boot reads every segment and checks every CRC. An invalid region followed
# by a valid record (found again by its magic, CRC and increasing rseq) is skipped and
# counted (corrupt_bytes); an invalid tail is truncated (torn_tails, torn_bytes): the
# valid prefix is copied to a temporary file which then replaces the segment.
import binascii
import os

from .compat import const, ticks_diff, ticks_ms
from .identity import ensure_dir

# Priorities: the order in which records are kept when the queue is full (highest last
# to go). They are the keys of the drop counters (wire key K_DROPS).
PRIO_TEL = const(0)  # telemetry summaries
PRIO_EVT = const(1)  # normal scored windows
PRIO_ANOMALY = const(2)  # anomalous windows
PRIORITIES = const(3)

HEADER = const(14)  # record header bytes
SLOT = const(32)  # pointer slot bytes
SLOTS = const(8)  # pointer slots in the ring
POINTER_FILE = "pointer"

_MAGIC = const(0xEB)
_VERSION = const(1)
_SLOT_TAG = const(0x50)
_MAX_LENGTH = const(65535)  # the length field is 16 bits
_MAX_SEGNO = const(99999999)  # 8 decimal digits in the file name
_TMP = ".tmp"

# A segment in memory: [segno, size, last rseq, undelivered records, sealed, priority]
_NO = const(0)
_SIZE = const(1)
_LAST = const(2)
_PENDING = const(3)
_SEALED = const(4)
_PRIO = const(5)


def _u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)


def _put_u32(b, o, v):
    b[o] = v & 0xFF
    b[o + 1] = (v >> 8) & 0xFF
    b[o + 2] = (v >> 16) & 0xFF
    b[o + 3] = (v >> 24) & 0xFF


def segment_name(prio, segno):
    return "q%d_%08d.seg" % (prio, segno)


def _parse_name(name):
    # "q<p>_<8 digits>.seg" -> (prio, segno), anything else -> None (left alone).
    if len(name) != 15 or name[0] != "q" or name[2] != "_" or not name.endswith(".seg"):
        return None
    p = name[1]
    digits = name[3:11]
    if p not in "012" or not digits.isdigit():
        return None
    return int(p), int(digits)


def _size(path):
    return os.stat(path)[6]


class FlashQueue:
    """A bounded, prioritised, crash-safe queue of encoded messages in directory `path`.

    append(prio, kind, payload) -> rseq (0: the record itself was dropped);
    take() -> (kind, memoryview, token) of the next record to send, up to max_inflight out;
    fetch(token) reads it again for a (re)send; ack(token) when its PUBACK came; skip(token)
    when it can never go (fetch() returned None);
    peek() -> (kind, memoryview) of the oldest undelivered record, or None (a window of one);
    pop() acknowledges what peek() returned; tick() commits the pointer when due;
    commit() forces it; close() commits and closes the files.

    :raises ValueError: for parameters that cannot work (the message names the parameter).
    :raises OSError: when the directory cannot be created or read.
    """

    def __init__(self, path, capacity_bytes=262144, segment_bytes=16384, commit_every=32,
                 commit_ms=5000, max_record=2048, max_inflight=8):
        if not 1 <= max_record <= _MAX_LENGTH:
            raise ValueError("max_record %r must be 1..%d bytes" % (max_record, _MAX_LENGTH))
        if segment_bytes < HEADER + max_record:
            raise ValueError("segment_bytes %r must hold one record of max_record %d bytes plus its "
                             "%d-byte header" % (segment_bytes, max_record, HEADER))
        if capacity_bytes < 2 * segment_bytes:
            raise ValueError("capacity_bytes %r must be at least 2 * segment_bytes (%d)"
                             % (capacity_bytes, 2 * segment_bytes))
        if commit_every < 1:
            raise ValueError("commit_every %r must be >= 1" % commit_every)
        if commit_ms < 0:
            raise ValueError("commit_ms %r must be >= 0 (0: commit by count only)" % commit_ms)
        if not 1 <= max_inflight <= 255:
            raise ValueError("max_inflight %r must be 1..255" % max_inflight)
        self.path = path
        self.capacity = capacity_bytes
        self.segment_bytes = segment_bytes
        self.commit_every = commit_every
        self.commit_ms = commit_ms
        self.max_record = max_record
        self.max_inflight = max_inflight
        # The only buffers, allocated before the heap fragments.
        self._buf = bytearray(max_record)
        self._mv = memoryview(self._buf)
        self._buf_rseq = 0  # the record whose payload the read buffer holds (0: none)
        self._hbuf = bytearray(HEADER)
        self._hmv = memoryview(self._hbuf)
        self._sbuf = bytearray(SLOT)
        self._smv = memoryview(self._sbuf)
        # Persistent state (pointer slot).
        self._gen = 0
        self._delivered = 0  # acked in RAM
        self._committed = 0  # acked and written to a slot
        self.drops = [0] * PRIORITIES
        self._evict_no = 0
        # Segments, per priority, oldest first.
        self._streams = [[] for _ in range(PRIORITIES)]
        self._pending = [0] * PRIORITIES
        self._depth = 0
        self._total = 0
        self._next_no = 1
        self._next_rseq = 1
        # Read cursor per stream: segment, offset, and the header cached there (rseq 0: none).
        self._hseg = [None] * PRIORITIES  # type: list  # a segment list, or None: start of stream
        self._hoff = [0] * PRIORITIES
        self._hrseq = [0] * PRIORITIES
        self._hlen = [0] * PRIORITIES
        self._hkind = [0] * PRIORITIES
        # Records handed out by take() and not yet acknowledged, oldest first: a ring of
        # fixed size. Where each lives (to read it again), and its state.
        m = max_inflight
        self._f_rseq = [0] * m
        self._f_seg = [None] * m  # type: list
        self._f_off = [0] * m
        self._f_len = [0] * m
        self._f_kind = [0] * m
        self._f_prio = [0] * m
        self._f_acked = [False] * m
        self._f_orphan = [0] * m  # its segment was evicted: 1 counted as dropped, 2 not
        self._fh = 0
        self._fn = 0
        # Open files: one reader, one appender.
        self._rf = None
        self._rf_no = 0
        self._rf_size = 0
        self._af = None
        self._af_no = 0
        self._acks = 0
        self._last_commit = ticks_ms()
        self._crseq = 0  # rseq and kind of the record _check() accepted last
        self._ckind = 0
        # Counters (what the recovery found, what was written).
        self.recovered_records = 0
        self.torn_tails = 0
        self.torn_bytes = 0
        self.corrupt_bytes = 0
        self.corrupt_lost = 0  # records found unreadable after boot (flash decay)
        self.bad_slots = 0
        self.evictions = 0
        self.write_errors = 0
        self.last_error = None
        self.bytes_written = 0  # everything written to flash: frames, slots, truncation copies
        self.payload_bytes = 0  # payload bytes appended
        self.commits = 0
        self._recover()

    # -- public ---------------------------------------------------------------------------
    @property
    def depth(self):
        """Records waiting for delivery."""
        return self._depth

    @property
    def delivered(self):
        return self._delivered

    @property
    def committed(self):
        return self._committed

    @property
    def used_bytes(self):
        return self._total

    def pending(self, prio):
        """Records of priority prio waiting for delivery."""
        return self._pending[prio]

    def segments(self):
        return sum(len(s) for s in self._streams)

    def write_amplification(self):
        """Bytes written to flash per payload byte appended (0.0 before the first append)."""
        return self.bytes_written / self.payload_bytes if self.payload_bytes else 0.0

    def append(self, prio, kind, payload):
        """Store one encoded message durably. Returns its rseq, or 0 when it was dropped
        (queue full of higher priorities, or a flash write failed: see last_error). Older,
        lower-priority records may be evicted to make room; self.drops counts both.

        :raises ValueError: bad priority or kind, or a payload over max_record bytes.
        """
        if not 0 <= prio < PRIORITIES:
            raise ValueError("priority %r must be 0..%d" % (prio, PRIORITIES - 1))
        if not 0 < kind < 256:
            raise ValueError("kind %r must be 1..255" % kind)
        n = len(payload)
        if not 0 < n <= self.max_record:
            raise ValueError("record of %d bytes: must be 1..%d (max_record)" % (n, self.max_record))
        need = HEADER + n
        if not self._make_room(prio, need):
            self.drops[prio] += 1
            self._write_slot()
            return 0
        stream = self._streams[prio]
        seg = stream[-1] if stream else None
        if seg is None or seg[_SEALED] or seg[_SIZE] + need > self.segment_bytes:
            if seg is not None:
                seg[_SEALED] = True
            seg = self._new_segment(prio)
        rseq = self._next_rseq
        h = self._hbuf
        h[0] = _MAGIC
        h[1] = _VERSION
        h[2] = n & 0xFF
        h[3] = n >> 8
        h[4] = prio
        h[5] = kind
        _put_u32(h, 6, rseq)
        _put_u32(h, 10, binascii.crc32(payload, binascii.crc32(self._hmv[1:10])) & 0xFFFFFFFF)
        try:
            f = self._appender(seg)
            # Header and payload in two writes (no copy into a bigger buffer); a power cut
            # between them leaves a torn tail that recovery truncates.
            f.write(self._hmv)
            f.write(payload)
            f.flush()
        except OSError as e:
            return self._write_failed(prio, seg, e)
        self._next_rseq = rseq + 1
        seg[_SIZE] += need
        seg[_LAST] = rseq
        seg[_PENDING] += 1
        self._pending[prio] += 1
        self._depth += 1
        self._total += need
        self.bytes_written += need
        self.payload_bytes += n
        return rseq

    @property
    def inflight(self):
        """Records handed out by take() and not yet acknowledged (or popped)."""
        return self._fn

    def take(self):
        """Hand out the next record to send: (kind, payload memoryview, token), or None
        when there is none or max_inflight are out. The view is valid until the next call
        on this queue: copy it (bytes(view)) to keep it. Report its PUBACK with ack(token);
        records are handed out in order, and delivered only up to the oldest one not
        acknowledged."""
        if self._fn == self.max_inflight:
            return None
        while True:
            best = -1
            best_rseq = 0
            for p in range(PRIORITIES):
                r = self._head(p)
                if r and (best < 0 or r < best_rseq):
                    best = p
                    best_rseq = r
            if best < 0:
                return None
            seg = self._hseg[best]
            off = self._hoff[best]
            n = self._hlen[best]
            if not self._read_at(seg, off, n):
                self._skip_bad_head(best)  # valid at boot, unreadable now (flash decay)
                continue
            self._buf_rseq = best_rseq
            i = (self._fh + self._fn) % self.max_inflight
            self._f_rseq[i] = best_rseq
            self._f_seg[i] = seg
            self._f_off[i] = off
            self._f_len[i] = n
            self._f_kind[i] = self._hkind[best]
            self._f_prio[i] = best
            self._f_acked[i] = False
            self._f_orphan[i] = 0
            self._fn += 1
            self._hoff[best] = off + HEADER + n
            self._hrseq[best] = 0
            return self._f_kind[i], self._mv[:n], best_rseq

    def ack(self, token):
        """The broker acknowledged the record take() handed out with `token`. Returns False
        for a token that is not out (acknowledged twice, or never handed out)."""
        i = self._out(token)
        if i < 0:
            return False
        self._f_acked[i] = True
        if self._f_orphan[i] == 1:
            # Counted as dropped when its segment was evicted; delivered after all.
            self.drops[self._f_prio[i]] -= 1
            self._f_orphan[i] = 2
        self._advance()
        return True

    def fetch(self, token):
        """The payload of the record take() handed out with `token`, read again from flash
        (a memoryview valid until the next call on this queue), for a layer that sends from
        the queue without keeping a copy: at its first send and at every resend. None when
        it cannot be sent any more: its segment was evicted meanwhile (counted as dropped),
        or it no longer passes its CRC. Report such a record with skip(token)."""
        i = self._out(token)
        if i < 0 or self._f_orphan[i]:
            return None
        n = self._f_len[i]
        if self._buf_rseq == token:
            return self._mv[:n]  # still in the read buffer since take() or the last fetch
        if not self._read_at(self._f_seg[i], self._f_off[i], n):
            return None
        self._buf_rseq = token
        return self._mv[:n]

    def skip(self, token):
        """The record handed out with `token` can never be sent (fetch() returned None): it
        leaves the queue as lost, counted as dropped (evicted) or in corrupt_lost (its CRC
        failed since boot). Returns False for a token that is not out."""
        i = self._out(token)
        if i < 0:
            return False
        self._f_acked[i] = True
        if self._f_orphan[i] == 0:
            seg = self._f_seg[i]
            seg[_PENDING] -= 1
            self._pending[self._f_prio[i]] -= 1
            self._depth -= 1
            self.corrupt_lost += 1
        self._f_orphan[i] = 2  # accounted for: _advance() must not count it again
        self._advance()
        return True

    def _out(self, token):
        # The in-flight ring index of the unacknowledged record `token`, or -1.
        m = self.max_inflight
        for k in range(self._fn):
            i = (self._fh + k) % m
            if self._f_rseq[i] == token and not self._f_acked[i]:
                return i
        return -1

    def _advance(self):
        # Delivery moves up to the oldest record out that is not acknowledged yet.
        while self._fn and self._f_acked[self._fh]:
            i = self._fh
            if not self._f_orphan[i]:
                p = self._f_prio[i]
                self._f_seg[i][_PENDING] -= 1
                self._pending[p] -= 1
                self._depth -= 1
            self._delivered = self._f_rseq[i]
            self._acks += 1
            self._pop_inflight()
        if self._acks >= self.commit_every:
            self.commit()

    def peek(self):
        """A window of one, for a caller that publishes and waits: (kind, payload
        memoryview) of the oldest record not acknowledged yet (the same one again until
        pop()), or None. The view is valid until the next call on this queue."""
        while self._fn:
            i = self._fh
            if self._f_orphan[i] == 1:
                self._pop_inflight()  # evicted (and counted) while it was out: it is gone
                continue
            n = self._f_len[i]
            if self._read_at(self._f_seg[i], self._f_off[i], n):
                return self._f_kind[i], self._mv[:n]
            seg = self._f_seg[i]  # decayed since it was taken
            seg[_PENDING] -= 1
            self._pending[self._f_prio[i]] -= 1
            self._depth -= 1
            self.corrupt_lost += 1
            self._pop_inflight()
        it = self.take()
        return None if it is None else (it[0], it[1])

    def pop(self):
        """Acknowledge the record peek() returned: it was delivered."""
        if self._fn:
            self.ack(self._f_rseq[self._fh])

    def tick(self):
        """Commit the pointer if acks have waited commit_ms. Call once per loop turn."""
        if self._acks and self.commit_ms and ticks_diff(ticks_ms(), self._last_commit) >= self.commit_ms:
            self.commit()

    def commit(self):
        """Persist the delivery pointer now, then delete fully delivered sealed segments."""
        if self._acks:
            self._write_slot()
        self._collect(False)

    def close(self):
        self.commit()
        self._close_reader()
        self._close_appender()

    # -- recovery -------------------------------------------------------------------------
    def _recover(self):
        ensure_dir(self.path)
        self._read_pointer()
        found = []
        for name in os.listdir(self.path):
            if name.endswith(_TMP):
                os.remove(self._join(name))  # an interrupted truncation: the original is intact
                continue
            parsed = _parse_name(name)
            if parsed is not None:
                found.append((parsed[1], parsed[0]))
        found.sort()
        top = self._evict_no
        for segno, prio in found:
            if segno > top:
                top = segno
        self._next_no = top + 1
        last = self._delivered
        for segno, prio in found:
            path = self._join(segment_name(prio, segno))
            if segno == self._evict_no:
                os.remove(path)  # evicted and counted, then the power went: finish the job
                continue
            r = self._scan(prio, segno, path)
            if r > last:
                last = r
        self._next_rseq = last + 1
        if self._next_rseq > 0xFFFFFFFF:
            raise OSError("queue %s: record sequence exhausted (2**32 records)" % self.path)

    def _scan(self, prio, segno, path):
        # Read one segment, check every record, truncate an invalid tail, register it.
        size = _size(path)
        stream = self._streams[prio]
        prev = stream[-1][_LAST] if stream else 0
        first_prev = prev
        pending = 0
        off = 0
        f = open(path, "rb")
        try:
            while off < size:
                n = self._check(f, off, size, prio, prev)
                if n >= 0:
                    prev = self._crseq
                    off += HEADER + n
                    self.recovered_records += 1
                    if prev > self._delivered:
                        pending += 1
                    continue
                nxt = self._resync(f, off + 1, size, prio, prev)
                if nxt < 0:
                    break
                self.corrupt_bytes += nxt - off
                off = nxt
        finally:
            f.close()
        if off < size:
            self.torn_tails += 1
            self.torn_bytes += size - off
            if prev != first_prev:
                self._truncate(path, off)
            size = off
        if prev == first_prev:
            os.remove(path)  # nothing valid in it
            return 0
        if stream:
            stream[-1][_SEALED] = True
        stream.append([segno, size, prev, pending, False, prio])
        self._pending[prio] += pending
        self._depth += pending
        self._total += size
        return prev

    def _check(self, f, off, end, prio, prev):
        # The payload length of a valid record at `off` (its rseq in self._crseq, kind in
        # self._ckind, payload in the read buffer), or -1.
        h = self._hbuf
        f.seek(off)
        if off + HEADER > end or f.readinto(self._hmv) != HEADER:
            return -1
        n = h[2] | (h[3] << 8)
        rseq = _u32(h, 6)
        if (h[0] != _MAGIC or h[1] != _VERSION or h[4] != prio or h[5] == 0 or not 0 < n <= self.max_record
                or off + HEADER + n > end or rseq <= prev):
            return -1
        self._buf_rseq = 0
        mv = self._mv[:n]
        if f.readinto(mv) != n:
            return -1
        if binascii.crc32(mv, binascii.crc32(self._hmv[1:10])) & 0xFFFFFFFF != _u32(h, 10):
            return -1
        self._crseq = rseq
        self._ckind = h[5]
        return n

    def _resync(self, f, start, end, prio, prev):
        # The offset of the next valid record in [start, end), or -1: look for the magic
        # and version bytes, then check the whole record there.
        buf = self._buf
        self._buf_rseq = 0
        chunk = len(buf)
        pos = start
        while pos < end:
            f.seek(pos)
            k = f.readinto(self._mv[:min(chunk, end - pos)])
            if not k:
                return -1
            i = buf.find(b"\xeb\x01", 0, k)
            if i < 0:
                pos += k - 1 if k > 1 else 1  # a magic split across chunks is seen next time
                continue
            cand = pos + i
            if self._check(f, cand, end, prio, prev) >= 0:
                return cand
            pos = cand + 1
        return -1

    def _truncate(self, path, size):
        # No truncate() on MicroPython: copy the valid prefix, then rename over the segment
        # (atomic on littlefs and POSIX; a power cut leaves the old file and a .tmp).
        tmp = path + _TMP
        self._buf_rseq = 0
        src = open(path, "rb")
        try:
            dst = open(tmp, "wb")
            try:
                left = size
                while left:
                    k = src.readinto(self._mv[:min(left, len(self._buf))])
                    if not k:
                        raise OSError("queue segment %s shrank while being truncated" % path)
                    dst.write(self._mv[:k])
                    left -= k
                dst.flush()
            finally:
                dst.close()
        finally:
            src.close()
        os.rename(tmp, path)
        self.bytes_written += size

    # -- pointer slots --------------------------------------------------------------------
    def _read_pointer(self):
        path = self._join(POINTER_FILE)
        try:
            size = _size(path)
        except OSError:
            size = -1
        best = -1
        s = self._sbuf
        if size > 0:
            f = open(path, "rb")
            try:
                for _ in range(SLOTS):
                    if f.readinto(self._smv) != SLOT:
                        break
                    if (s[0] == _MAGIC and s[1] == _SLOT_TAG and s[2] == _VERSION
                            and binascii.crc32(self._smv[:28]) & 0xFFFFFFFF == _u32(s, 28)):
                        gen = _u32(s, 4)
                        if gen > best:
                            best = gen
                            self._delivered = _u32(s, 8)
                            for p in range(PRIORITIES):
                                self.drops[p] = _u32(s, 12 + 4 * p)
                            self._evict_no = _u32(s, 24)
                    elif any(s):
                        self.bad_slots += 1  # torn or decayed: an older slot stands in
            finally:
                f.close()
        self._committed = self._delivered
        self._gen = best if best > 0 else 0
        if size != SLOT * SLOTS:
            # Missing or the wrong size: lay out a clean ring, then write the state found.
            tmp = path + _TMP
            f = open(tmp, "wb")
            try:
                f.write(bytes(SLOT * SLOTS))
                f.flush()
            finally:
                f.close()
            os.rename(tmp, path)
            self.bytes_written += SLOT * SLOTS
            if best >= 0:
                self._write_slot()

    def _write_slot(self):
        gen = self._gen + 1
        s = self._sbuf
        s[0] = _MAGIC
        s[1] = _SLOT_TAG
        s[2] = _VERSION
        s[3] = 0
        _put_u32(s, 4, gen)
        _put_u32(s, 8, self._delivered)
        for p in range(PRIORITIES):
            _put_u32(s, 12 + 4 * p, self.drops[p])
        _put_u32(s, 24, self._evict_no)
        _put_u32(s, 28, binascii.crc32(self._smv[:28]) & 0xFFFFFFFF)
        f = open(self._join(POINTER_FILE), "r+b")
        try:
            f.seek((gen % SLOTS) * SLOT)
            f.write(self._smv)
            f.flush()
        finally:
            f.close()
        self._gen = gen
        self._committed = self._delivered
        self._acks = 0
        self._last_commit = ticks_ms()
        self.bytes_written += SLOT
        self.commits += 1

    # -- space ----------------------------------------------------------------------------
    def _make_room(self, prio, need):
        if self._total + need <= self.capacity:
            return True
        if self._acks:
            self._write_slot()
        self._collect(True)
        while self._total + need > self.capacity:
            victim = -1
            for p in range(prio + 1):
                if self._streams[p]:
                    victim = p
                    break
            if victim < 0:
                return False
            self._evict(victim)
        return True

    def _evict(self, p):
        # Drop the oldest segment of stream p; count exactly its undelivered records, and
        # persist that count (with the segment's name) before the file goes.
        seg = self._streams[p][0]
        pending = seg[_PENDING]
        lost = pending
        # Records of it that are out (take()n): acknowledged ones were delivered; the others
        # are counted now and un-counted if their PUBACK still comes (ack()).
        m = self.max_inflight
        for k in range(self._fn):
            i = (self._fh + k) % m
            if self._f_seg[i] is seg:
                if self._f_acked[i]:
                    lost -= 1
                    self._f_orphan[i] = 2
                else:
                    self._f_orphan[i] = 1
                self._f_seg[i] = None
        self.drops[p] += lost
        self._evict_no = seg[_NO]
        self._write_slot()
        self._pending[p] -= pending
        self._depth -= pending
        self.evictions += 1
        self._delete(p, 0)

    def _collect(self, force):
        # Delete segments whose every record is delivered and committed: sealed ones, and
        # when space is needed (force) the active ones too.
        for p in range(PRIORITIES):
            stream = self._streams[p]
            i = 0
            while i < len(stream):
                seg = stream[i]
                done = seg[_PENDING] == 0 and seg[_LAST] <= self._committed
                if done and (force or seg[_SEALED] or i < len(stream) - 1):
                    self._delete(p, i)
                else:
                    i += 1

    def _delete(self, p, i):
        stream = self._streams[p]
        seg = stream[i]
        no = seg[_NO]
        if self._rf_no == no:
            self._close_reader()
        if self._af_no == no:
            self._close_appender()
        try:
            os.remove(self._join(segment_name(p, no)))
        except OSError:
            pass  # already gone (the eviction intent finished it): nothing else to do
        self._total -= seg[_SIZE]
        stream.pop(i)
        if self._hseg[p] is seg:
            self._hseg[p] = None  # the cursor restarts at the stream's oldest segment
            self._hoff[p] = 0
            self._hrseq[p] = 0

    def _new_segment(self, prio):
        no = self._next_no
        if no > _MAX_SEGNO:
            raise OSError("queue %s: segment numbers exhausted" % self.path)
        self._next_no = no + 1
        seg = [no, 0, 0, 0, False, prio]
        self._streams[prio].append(seg)
        return seg

    def _write_failed(self, prio, seg, e):
        # The flash refused the write (full, worn, removed). Part of the frame may be there:
        # seal the segment at its real size (the reader skips the partial frame) and count
        # the record as dropped.
        self._close_appender()
        try:
            real = _size(self._join(segment_name(prio, seg[_NO])))
        except OSError:
            real = seg[_SIZE]
        self._total += real - seg[_SIZE]
        seg[_SIZE] = real
        seg[_SEALED] = True
        self.write_errors += 1
        self.last_error = e
        self.drops[prio] += 1
        try:
            self._write_slot()
        except OSError:
            pass  # the same fault; the in-RAM counter still goes out in the next birth
        return 0

    # -- reading --------------------------------------------------------------------------
    def _head(self, p):
        # rseq of stream p's oldest undelivered record (header cached), or 0.
        if self._hrseq[p]:
            return self._hrseq[p]
        stream = self._streams[p]
        while True:
            seg = self._hseg[p]
            if seg is None:
                if not stream:
                    return 0
                seg = self._hseg[p] = stream[0]
                self._hoff[p] = 0
            off = self._hoff[p]
            if off >= seg[_SIZE]:
                if seg[_PENDING] > self._out_in(seg):  # counted at boot, not readable any more
                    self._forget(p, seg)
                i = self._index(p, seg) + 1
                if i >= len(stream):
                    return 0  # at the end: new appends to this segment are read from here
                self._hseg[p] = stream[i]
                self._hoff[p] = 0
                continue
            f = self._reader(seg, off + HEADER)
            h = self._hbuf
            f.seek(off)
            n = h[2] | (h[3] << 8) if f.readinto(self._hmv) == HEADER else 0
            rseq = _u32(h, 6)
            if (h[0] != _MAGIC or h[1] != _VERSION or h[4] != p or not 0 < n <= self.max_record
                    or off + HEADER + n > seg[_SIZE]):
                self._resync_head(p, seg, off)
                continue
            if rseq <= self._delivered:
                self._hoff[p] = off + HEADER + n  # delivered before the last reset
                continue
            self._hlen[p] = n
            self._hkind[p] = h[5]
            self._hrseq[p] = rseq
            return rseq

    def _read_at(self, seg, off, n):
        # The record at seg/off (payload length n) into the read buffer; False if its CRC
        # (or anything else) is wrong.
        self._buf_rseq = 0
        f = self._reader(seg, off + HEADER + n)
        f.seek(off)
        mv = self._mv[:n]
        if f.readinto(self._hmv) != HEADER or f.readinto(mv) != n:
            return False
        return binascii.crc32(mv, binascii.crc32(self._hmv[1:10])) & 0xFFFFFFFF == _u32(self._hbuf, 10)

    def _skip_bad_head(self, p):
        seg = self._hseg[p]
        self._hrseq[p] = 0
        self.corrupt_bytes += HEADER + self._hlen[p]
        self._resync_head(p, seg, self._hoff[p])

    def _resync_head(self, p, seg, off):
        # An invalid region: one the boot scan skipped already, or decay since. Move to
        # the next valid record. Records lost in it are settled by _forget() at the end of
        # the segment, where every record counted as pending must have been read.
        f = self._reader(seg, seg[_SIZE])
        nxt = self._resync(f, off + 1, seg[_SIZE], p, self._delivered)
        self._hoff[p] = seg[_SIZE] if nxt < 0 else nxt

    def _out_in(self, seg):
        # Records of seg handed out by take() and not popped yet.
        k = 0
        m = self.max_inflight
        for j in range(self._fn):
            if self._f_seg[(self._fh + j) % m] is seg:
                k += 1
        return k

    def _pop_inflight(self):
        self._f_seg[self._fh] = None
        self._fh = (self._fh + 1) % self.max_inflight
        self._fn -= 1

    def _forget(self, p, seg):
        # The cursor passed the end of seg with records still counted that were never
        # handed out: they were unreadable.
        k = seg[_PENDING] - self._out_in(seg)
        seg[_PENDING] = 0
        self._pending[p] -= k
        self._depth -= k
        self.corrupt_lost += k

    def _index(self, p, seg):
        stream = self._streams[p]
        for i in range(len(stream)):
            if stream[i] is seg:
                return i
        return -1

    def _reader(self, seg, end):
        # The reader file on seg, reopened when it must see bytes appended since it opened
        # (not every filesystem shows another handle's appends).
        no = seg[_NO]
        if self._rf is None or self._rf_no != no or self._rf_size < end:
            self._close_reader()
            self._rf = open(self._join(segment_name(seg[_PRIO], no)), "rb")
            self._rf_no = no
            self._rf_size = seg[_SIZE]
        return self._rf

    def _appender(self, seg):
        no = seg[_NO]
        if self._af is None or self._af_no != no:
            self._close_appender()
            if self._rf_no == no:
                self._close_reader()
            self._af = open(self._join(segment_name(seg[_PRIO], no)), "ab")
            self._af_no = no
        return self._af

    def _close_reader(self):
        f = self._rf
        self._rf = None
        self._rf_no = 0
        if f is not None:
            f.close()

    def _close_appender(self):
        f = self._af
        self._af = None
        self._af_no = 0
        if f is not None:
            f.close()

    def _join(self, name):
        return self.path + "/" + name if self.path else name
