# Device code. The node application: sample -> window features -> control charts (+ int8
# model) -> CBOR message -> flash queue -> MQTT QoS1. Per sensor and window: its features
# (features.Features: mean, std, rms, peak, crest, kurtosis, and FFT band energies for
# vibration; docs/features.md), an individuals chart on one feature (spc.ControlChart, score
# under the sensor's name) and an X-bar/R chart on the raw samples (spc.XbarRChart, the worst
# sensor's score under "xbar_r"); a sensor either chart finds out of control is a cause.
# One cooperative loop, no threads, so it runs the same on a microcontroller and on the unix
# port. Log lines go to stdout as JSON (the HIL rig, the demo and the tests read them);
# commands come in on stdin, one per line (`fault bearing`, `status`, `stop`).
#
# Store and forward (docs/store-and-forward.md): every message is encoded once, appended to
# the flash queue (log line `logged` once it is on flash) and replayed from there, byte for
# byte, so a replay after a reset keeps its original boot and seq. Delivery means delivered
# to the gateway: the node follows the gateway's retained state topic and sends nothing
# while the gateway is offline (or not yet known to be online), broker up or not; it keeps
# measuring and appending meanwhile. A record leaves the queue once the broker has
# acknowledged it (PUBACK) while the gateway was online.
#
# The network: ResilientMQTT (mqtt_resilient.py) over the protocol client (mqtt.py), with a
# QoS 1 in-flight window of broker.inflight records fed from the queue's take()/ack() window.
# Payloads are not copied: the layer asks on_fetch(token) for each (re)send, which reads
# the record from flash into the queue's one buffer. The layer reconnects with backoff and
# jitter (persistent session, DUP resends); while the gateway is offline its `hold` is set,
# so records handed in are not sent (nor resent after a reconnect) until it is back.
#
# Southbound (docs/southbound.md), when southbound.key names the device key: cmd/model
# pushes stream into the inactive model slot (A/B files in data_dir), are verified, loaded,
# self-tested and swapped in, or rolled back; cmd/config pushes are verified, validated as a
# whole config, applied live where safe and persisted for the next boot; cmd/time/resp
# answers set a wall clock for nodes without one. Every push is acked on cmd/ack.
#
# Log lines: boot, recovered (what the queue found at boot), connected, disconnected,
# gateway (online true/false), logged (boot, seq, prio, rseq), dropped (a record not
# stored), drops (counters changed), window, telemetry (with the heap after a collection on
# MicroPython), status, stopped; with southbound: model, config, time, ack.
import gc
import json
import os
import sys

from . import VERSION, cbor, features, identity, wire
from .compat import IS_MICROPYTHON, const, sleep_ms, ticks_add, ticks_diff, ticks_ms, ticks_us, wall_us
from .config import PUSH_LIVE, PUSH_REFUSED, ConfigError, changed, load, overlay, validate
from .flash_queue import PRIO_ANOMALY, PRIO_EVT, PRIO_TEL, PRIORITIES, FlashQueue
from .hal import make_hal
from .mqtt import MQTTClient
from .mqtt_resilient import ResilientMQTT
from .spc import ControlChart, XbarRChart

try:
    import select
except ImportError:  # pragma: no cover - every port we target has select
    select = None

try:
    from array import array
except ImportError:  # pragma: no cover
    array = None

_MAX_RECORD = const(2048)  # largest encoded message the queue takes (an evt is ~270 bytes)
_MAX_ACKS = const(4)  # command acks waiting for a free slot, at most (a push is acked once)
_TIME_RETRY_MS = const(5000)  # until the first time answer, ask again this often
_CATCH_UP_MS = const(50)  # how late a window may be taken while a backlog drains
_SLOT_FILE = "model_slot"  # which model slot is active: JSON {"slot", "version", "sha256"}
_PUSHED_FILE = "config_push.json"  # config pushes, for the next boot: {"version", "patch"}
_XR_SUBGROUP = const(5)  # X-bar/R subgroup size (spc.py: why small consecutive subgroups)
# The event's score key for the X-bar/R charts: the worst sensor's score, in sigma units like
# the per-sensor (individuals chart) scores; each sensor whose X-bar/R chart is out of control
# is among the causes (docs/wire-format.md).
XR_SCORE_KEY = "xbar_r"


def log(event, **fields):
    fields["ev"] = event
    sys.stdout.write(json.dumps(fields))
    sys.stdout.write("\n")
    try:
        sys.stdout.flush()
    except AttributeError:
        pass


def _hex(b):
    return "".join("%02x" % x for x in b)


def _queue_dir(cfg):
    d = cfg["queue"]["dir"]
    if d.startswith("/") or not cfg["data_dir"]:
        return d
    return cfg["data_dir"] + "/" + d


def _write_atomic(path, text):
    # A temporary file renamed over the old one: a power cut leaves the old or the new one.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _read_json(path):
    # The object in a small JSON state file; None when there is none. A file that cannot be
    # parsed raises ValueError (the caller says which file and falls back).
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return json.loads(text)


class StdinCommands:
    """Non-blocking line reader on stdin; gone quietly at EOF (a board has no stdin)."""

    def __init__(self):
        self._poll = None
        if select is not None and hasattr(select, "poll"):
            try:
                p = select.poll()
                p.register(sys.stdin, select.POLLIN)
                self._poll = p
            except (OSError, TypeError, ValueError):
                self._poll = None

    def read(self):
        if self._poll is None or not self._poll.poll(0):
            return None
        line = sys.stdin.readline()
        if not line:
            self._poll = None  # EOF: nobody will type again
            return None
        return line.strip()


class Node:
    def __init__(self, cfg, cfg_dir=""):
        """`cfg`: a validated config; `cfg_dir`: the config file's folder, against which the
        TLS files and the southbound key are found."""
        self.cfg_dir = cfg_dir
        self.node_id = cfg["node_id"]
        self.site = cfg["site"]
        self.data_dir = cfg["data_dir"]
        self.boot = identity.next_boot_id(self.data_dir)
        self._cfg_version = 0
        self.cfg = cfg = self._pushed_config(cfg)
        self.seq = 0
        self.sent = 0
        self.hal = make_hal(cfg["hal"])
        self.sensors = self.hal.sensors()
        # The window's memory first, while the heap is still in one piece: the sample arrays
        # (from raw bytes: no list of n floats on the way), each sensor's Features (the band
        # sensors share one FFT scratch, features.scratch) and output list, and the charts.
        # Nothing here grows per window.
        n = cfg["window"]["samples"]
        self.bufs = [array("f", bytes(4 * n)) for _ in self.sensors]
        self.fx = []
        for name, _unit in self.sensors:
            try:
                self.fx.append(features.Features(name, n))
            except ValueError as e:  # config.validate() catches this first; kept for other HALs
                raise ConfigError("config key 'window.samples': %s" % e)
        # Per sensor, in the order its birth names them: mean, std, rms, peak, crest, kurtosis
        # (+ band0..band3 for vibration). The first five are what the demo model binds to.
        # float32 arrays, like the samples they come from: no boxed floats kept between
        # windows, the same values on every port (a board's floats are single precision),
        # and 5-byte CBOR floats on the wire instead of 9-byte ones on a port with doubles.
        self.feats = [array("f", bytes(4 * len(fx.names))) for fx in self.fx]
        spc = cfg["spc"]
        self.charts = [ControlChart(spc["calibration"], spc["k_sigma"], spc["run"]) for _ in self.sensors]
        # X-bar/R on each sensor's raw samples, beside the individuals chart on one feature.
        self.xr_charts = [XbarRChart(spc["calibration"], _XR_SUBGROUP, spc["run"], spc["k_sigma"])
                          for _ in self.sensors]
        self._slot = None  # "a" or "b": the model slot in use; None: the model from model.path
        self._model_version = 0  # the version of the pushed model running (0: none pushed)
        self.detector = self._boot_model()
        q = cfg["queue"]
        inflight = cfg["broker"]["inflight"]
        self.queue = FlashQueue(_queue_dir(cfg), q["capacity_bytes"], q["segment_bytes"], q["commit_every"],
                                q["commit_ms"], _MAX_RECORD, inflight)
        self.topics = {k: wire.topic(self.site, self.node_id, k)
                       for k in (wire.KIND_EVT, wire.KIND_TEL, wire.KIND_BIRTH, wire.KIND_DEATH)}
        self.gateway_topic = wire.topic(self.site, wire.GATEWAY_NODE, wire.KIND_STATE)
        self.gateway_online = False  # unknown counts as offline: hold the queue
        self._gw_payload = None  # the latest gateway state, handed over by on_message
        self._drops_logged = list(self.queue.drops)
        self.windows = 0
        self._t0_ms = ticks_ms()
        self.running = True
        self._southbound(cfg["southbound"])
        self.rm = self._make_mqtt(cfg["broker"], inflight)
        self._seen_failures = 0
        self._seen_errors = 0

    # -- state kept in data_dir across boots ------------------------------------------------
    def _data(self, name):
        return self.data_dir + "/" + name if self.data_dir else name

    def _pushed_config(self, cfg):
        # Config pushes accepted in an earlier boot, on top of the config file.
        path = self._data(_PUSHED_FILE)
        try:
            st = _read_json(path)
            if st is None:
                return cfg
            merged = validate(overlay(cfg, st["patch"]))
            bad = [k for k in changed(cfg, merged) if k.split(".")[0] in PUSH_REFUSED]
            if bad:
                raise ConfigError("it changes %s, which a push may not" % ", ".join(bad))
            self._cfg_version = st["version"]
            return merged
        except (ValueError, TypeError, KeyError) as e:  # ConfigError is a ValueError
            log("error", msg="pushed config %s not applied: %s" % (path, e))
            return cfg

    def _boot_model(self):
        # A model pushed (and verified) earlier wins over model.path; if its slot cannot be
        # used, the config's model runs, and the node says so.
        path = self._data(_SLOT_FILE)
        st = None
        try:
            st = _read_json(path)
            if st is not None:
                slot = st["slot"]
                if slot not in ("a", "b"):
                    raise ValueError("slot %r is not a or b" % (slot,))
                det = self._open_model(self._slot_path(slot), st["sha256"], "model slot " + slot)
                self._slot = slot
                self._model_version = st["version"]
                return det
        except (ValueError, TypeError, KeyError, OSError) as e:  # ConfigError is a ValueError
            log("error", msg="model slot from %s not used, running model.path instead: %s" % (path, e))
        mcfg = self.cfg["model"]
        if not mcfg["path"]:
            return None
        return self._open_model(mcfg["path"], mcfg["sha256"])

    def _slot_path(self, slot):
        return self._data("model_" + slot + ".tflite")

    def _open_model(self, path, sha_hex, what="config key 'model.path'"):
        """The int8 detector in `path`, self-tested and bound to this node's features.

        A model whose sha256 differs from `sha_hex` (when given), that fails its self-test,
        or that needs a feature this node does not compute is refused (ConfigError): the
        node must not run a detector nobody commissioned.
        """
        from .detector import Detector  # only nodes with a model pay for the interpreter
        from .tflite_model import ModelError

        try:
            det = Detector.from_file(path)
            digest = _hex(det.sha256())
            if sha_hex and digest != sha_hex:
                raise ConfigError("%s: %s has sha256 %s, %s expected (config key 'model.sha256' or the push)"
                                  % (what, path, digest, sha_hex))
            det.self_test()
            det.bind([name for name, _unit in self.sensors], [fx.names for fx in self.fx])
        except OSError as e:
            raise ConfigError("%s: cannot read %s: %s" % (what, path, e))
        except ModelError as e:
            raise ConfigError("%s: %s was refused: %s" % (what, path, e))
        return det

    # -- messages -------------------------------------------------------------------------
    def _head(self, kind):
        return {wire.K_V: wire.SCHEMA_VERSION, wire.K_KIND: kind, wire.K_NODE: self.node_id,
                wire.K_BOOT: self.boot}

    def birth(self):
        m = self._head(wire.KIND_BIRTH)
        m[wire.K_FW] = VERSION
        m[wire.K_MODEL_SHA] = self.detector.sha256() if self.detector is not None else None
        m[wire.K_SENSORS] = [[name, unit, list(fx.names)] for (name, unit), fx in zip(self.sensors, self.fx)]
        m[wire.K_SITE] = self.site
        m[wire.K_LINE] = self.cfg["line"]
        m[wire.K_MACHINE] = self.cfg["machine"]
        m[wire.K_DROPS] = self._drops()
        m[wire.K_WINDOW] = [self.cfg["hal"]["rate_hz"], self.cfg["window"]["samples"]]
        return cbor.dumps(m)

    def death(self):
        return cbor.dumps(self._head(wire.KIND_DEATH))

    def _drops(self):
        d = self.queue.drops
        return {p: d[p] for p in range(PRIORITIES)}

    def _store(self, prio, kind, m):
        # Encode once, append to flash; from here on the bytes are what gets sent.
        rseq = 0
        why = None
        try:
            rseq = self.queue.append(prio, kind, cbor.dumps(m))
        except ValueError as e:  # too big for the queue: a bug upstream, not a full queue
            why = str(e)
        if rseq:
            log("logged", boot=self.boot, seq=self.seq, prio=prio, rseq=rseq)
        else:
            err = self.queue.last_error
            if why is None:
                why = "queue full of higher priorities" if err is None else "flash write failed: %s" % err
            log("dropped", boot=self.boot, seq=self.seq, prio=prio, reason=why)
            self.queue.last_error = None
        d = self.queue.drops
        if d != self._drops_logged:
            self._drops_logged = list(d)
            q = self.queue
            log("drops", drops=self._drops(), evictions=q.evictions,
                pending=[q.pending(p) for p in range(PRIORITIES)])

    def _sequenced(self, kind, t_wall, t_mono):
        self.seq += 1
        m = self._head(kind)
        m[wire.K_SEQ] = self.seq
        m[wire.K_TRACE] = identity.trace_id()
        m[wire.K_SPAN] = identity.span_id()
        m[wire.K_T_WALL] = t_wall
        m[wire.K_T_MONO] = t_mono
        return m

    # -- one window -----------------------------------------------------------------------
    def window(self):
        self.hal.read_window(self.bufs)
        t_wall = wall_us()  # the sample that completed the window was just taken
        t_mono = ticks_us()
        if not t_wall and self.clock is not None:
            t_wall = self.clock.now_us(t_mono)  # no RTC: the gateway's time (0 until synced)
        self.windows += 1
        feats = {}
        scores = {}
        causes = []
        xr_worst = 0.0
        for i, (name, _unit) in enumerate(self.sensors):
            buf = self.bufs[i]
            f = self.fx[i].compute(buf, self.feats[i])
            score, out = self.charts[i].update(f[features.chart_feature(name)])
            xr_score, xr_out = self.xr_charts[i].update_window(buf)
            feats[name] = list(f)
            scores[name] = score
            if xr_score > xr_worst:
                xr_worst = xr_score
            if out or xr_out:
                causes.append(name)
        scores[XR_SCORE_KEY] = xr_worst
        detector = "spc"
        if self.detector is not None:
            # The model sees all sensors at once: it catches what no single chart does.
            score, out = self.detector.score_sensors(self.feats)
            scores["model"] = score
            detector = "spc+model"
            if out:
                causes.append("model")
        m = self._sequenced(wire.KIND_EVT, t_wall, t_mono)
        m[wire.K_FEATURES] = feats
        m[wire.K_SCORES] = scores
        m[wire.K_ANOMALY] = bool(causes)
        m[wire.K_CAUSES] = causes
        m[wire.K_DETECTOR] = detector
        self._store(PRIO_ANOMALY if causes else PRIO_EVT, wire.KIND_EVT, m)
        log("window", seq=self.seq, trace=_hex(m[wire.K_TRACE]), anomaly=bool(causes),
            causes=causes, t_wall=t_wall, queue=self.queue.depth)
        every = self.cfg["telemetry_every"]
        if every and self.windows % every == 0:
            self.telemetry(t_wall, t_mono)

    def telemetry(self, t_wall, t_mono):
        heap_alloc = heap_free = 0
        if IS_MICROPYTHON:
            # After a collection, mem_alloc() is what is live: a leak shows as a rising line.
            gc.collect()
            heap_alloc = gc.mem_alloc()
            heap_free = gc.mem_free()
        m = self._sequenced(wire.KIND_TEL, t_wall, t_mono)
        m[wire.K_UPTIME_S] = ticks_diff(ticks_ms(), self._t0_ms) // 1000
        m[wire.K_HEAP_FREE] = heap_free
        m[wire.K_QUEUE_DEPTH] = self.queue.depth
        m[wire.K_DROPS] = self._drops()
        self._store(PRIO_TEL, wire.KIND_TEL, m)
        log("telemetry", seq=self.seq, trace=_hex(m[wire.K_TRACE]), windows=self.windows,
            heap_alloc=heap_alloc, heap_free=heap_free)

    # -- MQTT -----------------------------------------------------------------------------
    def _make_mqtt(self, b, inflight):
        ctx = None
        self._tls_error = None
        if b["tls"] is not None:
            # Built now to report a bad file early (after the boot line), and again at each
            # connect until it loads: the node measures into its queue meanwhile. Imported
            # here: a node without TLS does not keep its code in RAM.
            from . import tls

            ctx = tls.LazyContext(b["tls"], self.cfg_dir)
            try:
                ctx.load()
            except ValueError as e:  # TLSConfigError, naming the file
                self._tls_error = str(e)
        # One slot beyond the queue's window for command acks; ResilientMQTT keeps one more
        # for the birth.
        c = MQTTClient(self.node_id, b["host"], b["port"], user=b["user"], password=b["password"],
                       keepalive=b["keepalive"], ssl_context=ctx, max_inflight=inflight + 2)
        c.set_last_will(self.topics[wire.KIND_DEATH], self.death(), qos=1, retain=True)
        rm = ResilientMQTT(c)
        rm.on_connect = self._on_connect
        rm.on_disconnect = self._on_disconnect
        rm.on_ack = self._on_ack
        rm.on_drop = self._on_drop
        rm.on_fetch = self.queue.fetch
        rm.on_message = self._on_message
        rm.hold = True  # until the gateway's state says online
        rm.set_birth(self.topics[wire.KIND_BIRTH], self.birth())
        # Again after every connect: the broker sends the retained state only in answer to a
        # SUBSCRIBE, and a kept session would not get it otherwise.
        rm.subscribe(self.gateway_topic, 1, every_connect=True)
        if self.sb is not None:
            rm.subscribe(self._cmd_root + "#", 1)
        return rm

    def _on_connect(self, session_present):
        self.gateway_online = False  # until its retained state arrives after the SUBACK
        self._gw_payload = None
        self.rm.hold = True
        # A fresh birth on every connection, with the drop counters as they are now.
        self.rm.set_birth(self.topics[wire.KIND_BIRTH], self.birth())
        self._next_time = ticks_ms()
        b = self.cfg["broker"]
        log("connected", broker="%s:%d" % (b["host"], b["port"]), boot=self.boot, session=session_present,
            tls=b["tls"] is not None)

    def _on_disconnect(self, reason):
        self.gateway_online = False
        log("disconnected", reason=reason)

    def _on_ack(self, token):
        if isinstance(token, int):  # a queue record (rseq); acks of commands carry a str
            self.queue.ack(token)
            self.sent += 1

    def _on_drop(self, token, why):
        if isinstance(token, int):
            self.queue.skip(token)  # evicted or decayed while out: counted by the queue
        log("error", msg="message %r not sent: %s" % (token, why))

    def _on_message(self, topic, payload, retained):
        # Called from inside the MQTT client: note the gateway state (acted on after
        # service()); a command chunk is written to flash at once, so that no more than one
        # is ever held in RAM.
        if topic == self.gateway_topic:
            self._gw_payload = payload
        elif self.sb is not None and topic.startswith(self._cmd_root):
            self._command(topic[len(self._cmd_root):], payload)

    def _gateway_state(self):
        p = self._gw_payload
        if p is None:
            return
        self._gw_payload = None
        online = False
        try:
            m = cbor.loads(p)
            online = isinstance(m, dict) and m.get(wire.K_ONLINE) is True
        except (ValueError, TypeError, IndexError) as e:
            log("error", msg="gateway state on %s is not valid CBOR (%s): holding the queue"
                % (self.gateway_topic, e))
        if online == self.gateway_online:
            return
        self.gateway_online = online
        self.rm.hold = not online
        log("gateway", online=online, queue=self.queue.depth)
        if online:
            # A (re)started gateway gets a fresh birth, with the drop counters as they are now.
            self.rm.set_birth(self.topics[wire.KIND_BIRTH], self.birth())

    def _feed(self):
        # Hand records to the MQTT layer while the gateway is online and slots are free.
        rm = self.rm
        acks = self._acks_out
        while acks and rm.free:
            rm.send(self._ack_topic, acks.pop(0), "ack")
        if not self.gateway_online:
            return
        q = self.queue
        topics = self.topics
        while rm.free:
            it = q.take()
            if it is None:
                return
            # payload None: fetched from flash when sent (q.fetch), the stored bytes as they
            # are, so a replay keeps its original boot and seq.
            rm.send(topics[it[0]], None, it[2])

    def service_network(self, budget_ms):
        rm = self.rm
        self._gateway_state()
        self._feed()
        rm.service(budget_ms)
        self._gateway_state()
        self._feed()
        if rm.connect_failures != self._seen_failures:
            self._seen_failures = rm.connect_failures
            log("disconnected", reason=rm.last_error, connected=False)
        errors = rm.hook_errors + rm.handler_errors
        if errors != self._seen_errors:
            self._seen_errors = errors
            log("error", msg=rm.last_error)
        if self.sb is not None:
            self._southbound_turn()
        self.queue.tick()

    # -- southbound -----------------------------------------------------------------------
    def _southbound(self, scfg):
        self.sb = None
        self.clock = None
        self._acks_out = []
        self._ack_topic = None
        if scfg["key"] is None:
            return
        from . import southbound as sb
        from .tls import join

        path = join(self.cfg_dir, scfg["key"])
        try:
            key = sb.load_key(path)
        except (OSError, ValueError) as e:
            raise ConfigError("config key 'southbound.key': cannot use the device key file %s: %s" % (path, e))
        self.sb = sb
        self._key = key
        self._cmd_root = "%s/%s/%s/cmd/" % (wire.TOPIC_ROOT, self.site, self.node_id)
        self._ack_topic = sb.topic(self.site, self.node_id, sb.KIND_CMD_ACK)
        self._time_topic = sb.topic(self.site, self.node_id, sb.KIND_TIME_REQ)
        self.receiver = sb.ModelReceiver(self.node_id, key, self._open_slot, scfg["max_model_bytes"],
                                         self._model_version)
        self._model_done = None  # (cmd_id, version, sha256) of a push received, to install
        self.clock = sb.WallClock()
        self._next_time = ticks_ms()

    def _inactive_slot(self):
        return "b" if self._slot == "a" else "a"

    def _open_slot(self):
        # The ModelReceiver writes an authenticated push here, chunk by chunk.
        return open(self._slot_path(self._inactive_slot()), "wb")

    def _command(self, what, payload):
        sb = self.sb
        if what == "time/resp":
            t4 = ticks_us()  # first: the arrival time is what the round trip is measured to
            try:
                rtt = self.clock.sync(cbor.loads(payload, max_depth=4), self.node_id, t4)
                log("time", rtt_us=rtt, wall_us=self.clock.now_us())
            except ValueError as e:  # SouthboundError, CBORError
                log("error", msg="time answer on %s refused: %s" % (self._cmd_root + what, e))
            return
        if what != "model" and what != "config":
            return  # our own cmd/ack and cmd/time/req, back through cmd/#
        m = None
        try:
            m = cbor.loads(payload, max_depth=4)
            if what == "model":
                if self.receiver.chunk(m) == sb.DONE:
                    r = self.receiver
                    self._model_done = (r.finished, r.version, r.sha256)  # installed after service()
            else:
                self._config_push(m)
        except ValueError as e:  # SouthboundError (with .status), CBORError, ConfigError
            status = getattr(e, "status", sb.BAD_MESSAGE)
            self._ack(m, status, str(e))
            log(what, status=status, reason=str(e))
        except OSError as e:  # the slot or the config file could not be written
            if what == "model":
                self.receiver.abort()
            why = "flash write failed: %s" % e
            status = sb.SELF_TEST if what == "model" else sb.BAD_CONFIG
            self._ack(m, status, why)
            log(what, status=status, reason=why)

    def _ack(self, m, status, reason=None):
        # Ack the command map m (None: not even decodable) with `status`.
        sb = self.sb
        cmd_id = version = 0
        if isinstance(m, dict):
            c = m.get(wire.K_CMD_ID)
            v = m.get(wire.K_VERSION)
            cmd_id = c if isinstance(c, int) and 0 <= c <= 0xFFFFFFFF else 0
            version = v if isinstance(v, int) and 0 <= v <= 0xFFFFFFFF else 0
        if len(self._acks_out) >= _MAX_ACKS:
            log("error", msg="ack of command %d not sent: %d acks already wait" % (cmd_id, _MAX_ACKS))
            return
        self._acks_out.append(cbor.dumps(sb.ack(self.node_id, self.boot, cmd_id, version, status, reason)))
        log("ack", cmd_id=cmd_id, version=version, status=status)

    def _southbound_turn(self):
        if self._model_done is not None:
            self._install_model()
        if self.rm.connected and ticks_diff(ticks_ms(), self._next_time) >= 0:
            every = self.cfg["southbound"]["time_every_s"] * 1000
            self._next_time = ticks_add(ticks_ms(), every if self.clock.synced else min(every, _TIME_RETRY_MS))
            req = self.clock.request(self.node_id, self.boot)
            self.rm.publish_now(self._time_topic, cbor.dumps(req), 0)  # QoS 0: late is useless

    def _install_model(self):
        # A push was received whole and hashes to its authenticated sha256: load it from the
        # inactive slot, self-test it, and only then make it the running one (A/B swap).
        from .tflite_model import ModelError

        sb = self.sb
        cmd_id, version, sha = self._model_done
        self._model_done = None
        ack = {wire.K_CMD_ID: cmd_id, wire.K_VERSION: version}
        slot = self._inactive_slot()
        path = self._slot_path(slot)
        try:
            det = self._open_model(path, _hex(sha), "model slot " + slot)  # read back: checks the flash too
        except (ConfigError, ModelError, ValueError, OSError) as e:
            # Rolled back: the old model keeps running, the active-slot file is unchanged.
            self._ack(ack, sb.SELF_TEST, str(e))
            log("model", status=sb.SELF_TEST, reason=str(e), version=version)
            return
        try:
            _write_atomic(self._data(_SLOT_FILE), json.dumps({"slot": slot, "version": version,
                                                             "sha256": _hex(sha)}))
        except OSError as e:
            self._ack(ack, sb.SELF_TEST, "cannot record the active slot: %s" % e)
            log("model", status=sb.SELF_TEST, reason=str(e), version=version)
            return
        self.detector = det
        self._slot = slot
        self._model_version = version
        self.receiver.min_version = version  # an older push is refused from now on
        gc.collect()
        self.rm.set_birth(self.topics[wire.KIND_BIRTH], self.birth())
        self._ack(ack, sb.OK)
        log("model", status=sb.OK, sha256=_hex(sha), version=version, slot=slot)

    def _config_push(self, m):
        sb = self.sb
        _cmd_id, version, data = sb.verify_config(m, self.node_id, self._key, self._cfg_version)
        patch = cbor.loads(data, max_depth=8)
        try:
            merged = validate(overlay(self.cfg, patch))
        except ConfigError as e:
            raise sb.SouthboundError(sb.BAD_CONFIG, str(e))
        diff = changed(self.cfg, merged)
        bad = [k for k in diff if k.split(".")[0] in PUSH_REFUSED]
        if bad:
            raise sb.SouthboundError(sb.BAD_CONFIG, "a push may not change %s" % ", ".join(bad))
        # Persist first (accumulated over pushes): what the next boot starts with.
        path = self._data(_PUSHED_FILE)
        try:
            old = _read_json(path)
        except ValueError:
            old = None  # unreadable: this push starts it again
        old = old.get("patch") if isinstance(old, dict) else None
        acc = patch if not isinstance(old, dict) else overlay(old, patch)
        try:
            _write_atomic(path, json.dumps({"version": version, "patch": acc}))
        except (OSError, TypeError, ValueError) as e:
            raise sb.SouthboundError(sb.BAD_CONFIG, "cannot persist it to %s: %s" % (path, e))
        self._cfg_version = version
        live = [k for k in diff if k in PUSH_LIVE]
        later = [k for k in diff if k not in PUSH_LIVE]
        for k in live:
            section, _, name = k.rpartition(".")
            if section:
                self.cfg[section][name] = merged[section][name]
            else:
                self.cfg[name] = merged[name]
        spc = self.cfg["spc"]
        for chart in self.charts:
            chart.k_sigma = spc["k_sigma"]
            chart.run = spc["run"]
        for xr in self.xr_charts:
            xr.k_sigma = spc["k_sigma"]
            xr.run = spc["run"]
        reason = "live: %s; next boot: %s" % (", ".join(live) or "-", ", ".join(later) or "-")
        self._ack(m, sb.OK, reason)
        log("config", status=sb.OK, version=version, live=live, next_boot=later)

    # -- commands -------------------------------------------------------------------------
    def command(self, line):
        parts = line.split()
        if not parts:
            return
        if parts[0] == "fault" and len(parts) == 2:
            try:
                self.hal.set_fault(parts[1])
                log("fault", name=parts[1])
            except ValueError as e:
                log("error", msg=str(e))
        elif parts[0] == "stop":
            self.running = False
        elif parts[0] == "status":
            q = self.queue
            log("status", seq=self.seq, sent=self.sent, queue=q.depth, drops=self._drops(),
                gateway=self.gateway_online, connected=self.rm.connected, delivered=q.delivered,
                committed=q.committed, used=q.used_bytes, segments=q.segments(), inflight=q.inflight,
                windows=self.windows, model=_hex(self.detector.sha256()) if self.detector else None)
        else:
            log("error", msg="unknown command %r: use 'fault <none|bearing|imbalance>', 'status' or 'stop'" % line)

    # -- main loop ------------------------------------------------------------------------
    def run(self, max_windows=0):
        # The stdin HAL carries the rig's commands in its own stream, in order with the samples.
        stdin = self.hal if self.cfg["hal"]["kind"] == "stdin" else StdinCommands()
        log("boot", node=self.node_id, boot=self.boot, fw=VERSION, machine=self.cfg["machine"])
        q = self.queue
        log("recovered", records=q.recovered_records, pending=q.depth, truncated=q.torn_bytes,
            torn_tails=q.torn_tails, corrupt=q.corrupt_bytes, bad_slots=q.bad_slots, delivered=q.committed,
            drops=self._drops(), segments=q.segments(), used=q.used_bytes)
        if self._tls_error:
            log("error", msg="config key 'broker.tls': %s; retried at every connect" % self._tls_error)
        next_window = ticks_ms()
        while self.running:
            cmd = stdin.read()
            while cmd is not None:
                self.command(cmd)
                cmd = stdin.read()
            left = ticks_diff(next_window, ticks_ms())
            if self.running and left <= 0:
                if -left < _CATCH_UP_MS and self._backlog():
                    # Records wait behind a full window (the gateway just came back): let
                    # them drain first, so that new measurements do not push them out of a
                    # full queue. Sampling is late by at most _CATCH_UP_MS, then catches up.
                    left += _CATCH_UP_MS
                else:
                    # period 0: back to back, as fast as the HAL delivers (simulated time).
                    period = self.cfg["window"]["period_ms"]
                    next_window = ticks_add(next_window, period) if period else ticks_ms()
                    try:
                        self.window()
                    except OSError as e:  # a sensor or stimulus timeout: skip the window, say so
                        log("error", msg="window skipped: %s" % e)
                    if max_windows and self.windows >= max_windows:
                        self.running = False
                    left = ticks_diff(next_window, ticks_ms())
            # Waits for the network (or sleeps while the broker is away) until the next window.
            self.service_network(left if 0 < left < 50 else (50 if left > 0 else 0))
        self.shutdown()

    def _backlog(self):
        # Records waiting to be handed to a connected, sending MQTT layer.
        q = self.queue
        return self.gateway_online and self.rm.connected and q.depth > q.inflight

    def shutdown(self):
        # Deliver what is queued before saying goodbye, within a bounded time.
        # Whatever is left stays on flash for the next boot.
        rm = self.rm
        deadline = ticks_add(ticks_ms(), 5000)
        while ((self.queue.depth or self._acks_out) and rm.connected and self.gateway_online
               and ticks_diff(deadline, ticks_ms()) > 0):
            self.service_network(10)
        if rm.connected:
            # A clean stop is a death too: publish it, as the will would not fire. QoS 0 when
            # the window is full: the broker keeps a retained message either way.
            death = self.death()
            topic = self.topics[wire.KIND_DEATH]
            if not rm.publish_now(topic, death, 1, True):
                rm.publish_now(topic, death, 0, True)
        rm.disconnect()
        q = self.queue
        q.close()
        log("stopped", seq=self.seq, sent=self.sent, queue=q.depth, drops=self._drops(),
            bytes_written=q.bytes_written, payload_bytes=q.payload_bytes,
            write_amplification=q.write_amplification())


def main(config_path="config.json"):
    i = config_path.rfind("/")
    node = Node(load(config_path), config_path[:i] if i >= 0 else "")
    try:
        node.run()
    except KeyboardInterrupt:
        node.shutdown()
