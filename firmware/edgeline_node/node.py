# Device code. The node application: sample -> window features -> control charts -> CBOR
# message -> flash queue -> MQTT QoS1. One cooperative loop, no threads, so it runs the same
# on a microcontroller and on the unix port. Log lines go to stdout as JSON (the HIL rig, the
# demo and the tests read them); commands come in on stdin, one per line (`fault bearing`,
# `status`, `stop`).
#
# Store and forward (docs/store-and-forward.md): every message is encoded once, appended to
# the flash queue (log line `logged` once it is on flash) and replayed from there, byte for
# byte, so a replay after a reset keeps its original boot and seq. Delivery means delivered
# to the gateway: the node follows the gateway's retained state topic and sends nothing
# while the gateway is offline (or not yet known to be online), broker up or not; it keeps
# measuring and appending meanwhile. A record leaves the queue once the broker has
# acknowledged it (PUBACK) while the gateway was online.
#
# Log lines: boot, recovered (what the queue found at boot), connected, disconnected,
# gateway (online true/false), logged (boot, seq, prio, rseq), dropped (a record not
# stored), drops (counters changed), window, telemetry, status, stopped.
import gc
import json
import sys

from . import VERSION, cbor, features, identity, wire
from .compat import IS_MICROPYTHON, const, sleep_ms, ticks_add, ticks_diff, ticks_ms, ticks_us, wall_us
from .config import ConfigError, load
from .flash_queue import PRIO_ANOMALY, PRIO_EVT, PRIO_TEL, PRIORITIES, FlashQueue
from .hal import make_hal
from .mqtt import MQTTClient
from .spc import ControlChart

try:
    import select
except ImportError:  # pragma: no cover - every port we target has select
    select = None

try:
    from array import array
except ImportError:  # pragma: no cover
    array = None

_MAX_BACKOFF_MS = 30000
_DRAIN_PER_WINDOW = 64  # publishes per loop turn, so a backlog never starves sampling
_MAX_RECORD = const(2048)  # largest encoded message the queue takes (an evt is ~270 bytes)


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
    def __init__(self, cfg):
        self.cfg = cfg
        self.node_id = cfg["node_id"]
        self.site = cfg["site"]
        self.boot = identity.next_boot_id(cfg["data_dir"])
        self.seq = 0
        self.sent = 0
        self.hal = make_hal(cfg["hal"])
        self.sensors = self.hal.sensors()
        self.detector = self._load_model(cfg["model"])
        n = cfg["window"]["samples"]
        self.bufs = [array("f", [0.0] * n) for _ in self.sensors]
        self.feats = [[0.0] * len(features.FEATURE_NAMES) for _ in self.sensors]
        spc = cfg["spc"]
        self.charts = [ControlChart(spc["calibration"], spc["k_sigma"], spc["run"]) for _ in self.sensors]
        q = cfg["queue"]
        self.queue = FlashQueue(_queue_dir(cfg), q["capacity_bytes"], q["segment_bytes"], q["commit_every"],
                                q["commit_ms"], _MAX_RECORD)
        self.topics = {k: wire.topic(self.site, self.node_id, k)
                       for k in (wire.KIND_EVT, wire.KIND_TEL, wire.KIND_BIRTH, wire.KIND_DEATH)}
        self.gateway_topic = wire.topic(self.site, wire.GATEWAY_NODE, wire.KIND_STATE)
        self.gateway_online = False  # unknown counts as offline: hold the queue
        self._gw_payload = None  # the latest gateway state, handed over by on_message
        self._drops_logged = list(self.queue.drops)
        self.client = None
        self._backoff_ms = 500
        self._next_connect = ticks_ms()
        self.windows = 0
        self._t0_ms = ticks_ms()
        self.running = True

    def _load_model(self, mcfg):
        """The int8 detector over the window's feature vector, or None (control charts only).

        A model whose sha256 differs from the config's, that fails its self-test, or that
        needs a feature this node does not compute is refused: the node must not run a
        detector nobody commissioned.
        """
        if not mcfg["path"]:
            return None
        from .detector import Detector  # only nodes with a model pay for the interpreter
        from .tflite_model import ModelError

        path = mcfg["path"]
        try:
            det = Detector.from_file(path)
            digest = _hex(det.sha256())
            if mcfg["sha256"] and digest != mcfg["sha256"]:
                raise ConfigError("config key 'model.sha256': %s has sha256 %s, the config expects %s"
                                  % (path, digest, mcfg["sha256"]))
            det.self_test()
            det.bind([name for name, _unit in self.sensors], features.FEATURE_NAMES)
        except OSError as e:
            raise ConfigError("config key 'model.path': cannot read %s: %s" % (path, e))
        except ModelError as e:
            raise ConfigError("config key 'model.path': %s was refused: %s" % (path, e))
        return det

    # -- messages -------------------------------------------------------------------------
    def _head(self, kind):
        return {wire.K_V: wire.SCHEMA_VERSION, wire.K_KIND: kind, wire.K_NODE: self.node_id,
                wire.K_BOOT: self.boot}

    def birth(self):
        m = self._head(wire.KIND_BIRTH)
        m[wire.K_FW] = VERSION
        m[wire.K_MODEL_SHA] = self.detector.sha256() if self.detector is not None else None
        m[wire.K_SENSORS] = [[name, unit, list(features.FEATURE_NAMES)] for name, unit in self.sensors]
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
        self.windows += 1
        feats = {}
        scores = {}
        causes = []
        for i, (name, _unit) in enumerate(self.sensors):
            f = features.compute(self.bufs[i], self.feats[i])
            score, out = self.charts[i].update(f[features.chart_feature(name)])
            feats[name] = list(f)
            scores[name] = score
            if out:
                causes.append(name)
        detector = "spc"
        if self.detector is not None:
            # The model sees all sensors at once: it catches what no single chart does.
            score, out = self.detector.score_sensors(self.feats)
            # As a ratio to the model's threshold (1.0 = at it): comparable across models.
            scores["model"] = score / self.detector.threshold
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
        m = self._sequenced(wire.KIND_TEL, t_wall, t_mono)
        m[wire.K_UPTIME_S] = ticks_diff(ticks_ms(), self._t0_ms) // 1000
        m[wire.K_HEAP_FREE] = gc.mem_free() if IS_MICROPYTHON else 0
        m[wire.K_QUEUE_DEPTH] = self.queue.depth
        m[wire.K_DROPS] = self._drops()
        self._store(PRIO_TEL, wire.KIND_TEL, m)
        log("telemetry", seq=self.seq, trace=_hex(m[wire.K_TRACE]))

    # -- MQTT -----------------------------------------------------------------------------
    def _connect(self):
        b = self.cfg["broker"]
        c = MQTTClient(self.node_id, b["host"], b["port"], user=b["user"], password=b["password"],
                       keepalive=b["keepalive"])
        c.set_last_will(self.topics[wire.KIND_DEATH], self.death(), qos=1, retain=True)
        c.on_message = self._on_message
        self.gateway_online = False
        self._gw_payload = None
        c.connect(clean_session=True)
        self.client = c  # from here on, a fault closes it through _drop_connection
        # The gateway's retained state arrives right after the SUBACK.
        c.subscribe(self.gateway_topic, qos=1)
        c.publish(self.topics[wire.KIND_BIRTH], self.birth(), qos=1, retain=True)
        self._backoff_ms = 500
        log("connected", broker="%s:%d" % (b["host"], b["port"]), boot=self.boot)

    def _on_message(self, topic, payload, retained):
        # Called from inside the MQTT client: only note it; _gateway_state() acts on it.
        if topic == self.gateway_topic:
            self._gw_payload = payload

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
        log("gateway", online=online, queue=self.queue.depth)
        if online:
            # A (re)started gateway gets a fresh birth, with the drop counters as they are now.
            self.client.publish(self.topics[wire.KIND_BIRTH], self.birth(), qos=1, retain=True)

    def _drop_connection(self, why):
        log("disconnected", reason=str(why))
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
        self.client = None
        # Exponential backoff with jitter, so a fleet does not reconnect in lockstep.
        jitter = ticks_us() % (self._backoff_ms // 2 + 1)
        self._next_connect = ticks_add(ticks_ms(), self._backoff_ms + jitter)
        self._backoff_ms = min(self._backoff_ms * 2, _MAX_BACKOFF_MS)

    def service_network(self, budget_ms):
        if self.client is None:
            if ticks_diff(ticks_ms(), self._next_connect) < 0:
                return
            try:
                self._connect()
            except OSError as e:
                self._drop_connection(e)
                return
        try:
            self._gateway_state()
            sent = 0
            while self.gateway_online and sent < _DRAIN_PER_WINDOW:
                item = self.queue.peek()
                if item is None:
                    break
                kind, payload = item
                # The stored bytes as they are: a replay keeps its original boot and seq.
                self.client.publish(self.topics[kind], payload, qos=1)
                self.queue.pop()  # only once the broker has acknowledged it
                self.sent += 1
                sent += 1
            self.client.ping_if_due()
            self.client.poll(budget_ms)
            self._gateway_state()
        except OSError as e:
            self._drop_connection(e)
        self.queue.tick()

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
                gateway=self.gateway_online, connected=self.client is not None, delivered=q.delivered,
                committed=q.committed, used=q.used_bytes, segments=q.segments())
        else:
            log("error", msg="unknown command %r: use 'fault <none|bearing|imbalance>', 'status' or 'stop'" % line)

    # -- main loop ------------------------------------------------------------------------
    def run(self, max_windows=0):
        period = self.cfg["window"]["period_ms"]
        # The stdin HAL carries the rig's commands in its own stream, in order with the samples.
        stdin = self.hal if self.cfg["hal"]["kind"] == "stdin" else StdinCommands()
        log("boot", node=self.node_id, boot=self.boot, fw=VERSION, machine=self.cfg["machine"])
        q = self.queue
        log("recovered", records=q.recovered_records, pending=q.depth, truncated=q.torn_bytes,
            torn_tails=q.torn_tails, corrupt=q.corrupt_bytes, bad_slots=q.bad_slots, delivered=q.committed,
            drops=self._drops(), segments=q.segments(), used=q.used_bytes)
        next_window = ticks_ms()
        while self.running:
            cmd = stdin.read()
            while cmd is not None:
                self.command(cmd)
                cmd = stdin.read()
            if self.running and ticks_diff(ticks_ms(), next_window) >= 0:
                next_window = ticks_add(next_window, period)
                try:
                    self.window()
                except OSError as e:  # a sensor or stimulus timeout: skip the window, say so
                    log("error", msg="window skipped: %s" % e)
                if max_windows and self.windows >= max_windows:
                    self.running = False
            left = ticks_diff(next_window, ticks_ms())
            self.service_network(max(0, min(left, 50)))
            if self.client is None and left > 0:
                sleep_ms(min(left, 50))
        self.shutdown()

    def shutdown(self):
        # Deliver what is queued before saying goodbye, within a bounded time.
        # Whatever is left stays on flash for the next boot.
        deadline = ticks_add(ticks_ms(), 5000)
        while (self.queue.depth and self.client is not None and self.gateway_online
               and ticks_diff(deadline, ticks_ms()) > 0):
            self.service_network(10)
        if self.client is not None:
            try:
                # A clean stop is a death too: publish it, as the will would not fire.
                self.client.publish(self.topics[wire.KIND_DEATH], self.death(), qos=1, retain=True)
                self.client.disconnect()
            except OSError:
                pass
        q = self.queue
        q.close()
        log("stopped", seq=self.seq, sent=self.sent, queue=q.depth, drops=self._drops(),
            bytes_written=q.bytes_written, payload_bytes=q.payload_bytes,
            write_amplification=q.write_amplification())


def main(config_path="config.json"):
    node = Node(load(config_path))
    try:
        node.run()
    except KeyboardInterrupt:
        node.shutdown()
