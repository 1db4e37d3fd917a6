# Device code. The node application: sample -> window features -> control charts -> CBOR
# message -> queue -> MQTT QoS1. One cooperative loop, no threads, so it runs the same on a
# microcontroller and on the unix port. Log lines go to stdout as JSON (the HIL rig and the
# demo read them); commands come in on stdin, one per line (`fault bearing`, `stop`).
import gc
import json
import sys

from . import VERSION, cbor, features, identity, wire
from .compat import IS_MICROPYTHON, sleep_ms, ticks_add, ticks_diff, ticks_ms, ticks_us, wall_us
from .config import load
from .hal_sim import SimulatedMachine
from .mqtt import MQTTClient
from .ram_queue import RamQueue
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
        hal = cfg["hal"]
        self.hal = SimulatedMachine(seed=hal["seed"], rate_hz=hal["rate_hz"])
        self.sensors = self.hal.sensors()
        n = cfg["window"]["samples"]
        self.bufs = [array("f", [0.0] * n) for _ in self.sensors]
        self.feats = [[0.0] * len(features.FEATURE_NAMES) for _ in self.sensors]
        spc = cfg["spc"]
        self.charts = [ControlChart(spc["calibration"], spc["k_sigma"], spc["run"]) for _ in self.sensors]
        self.queue = RamQueue(cfg["queue"]["max_messages"])
        self.topics = {k: wire.topic(self.site, self.node_id, k)
                       for k in (wire.KIND_EVT, wire.KIND_TEL, wire.KIND_BIRTH, wire.KIND_DEATH)}
        self.client = None
        self._backoff_ms = 500
        self._next_connect = ticks_ms()
        self.windows = 0
        self._t0_ms = ticks_ms()
        self.running = True

    # -- messages -------------------------------------------------------------------------
    def _head(self, kind):
        return {wire.K_V: wire.SCHEMA_VERSION, wire.K_KIND: kind, wire.K_NODE: self.node_id,
                wire.K_BOOT: self.boot}

    def birth(self):
        m = self._head(wire.KIND_BIRTH)
        m[wire.K_FW] = VERSION
        m[wire.K_MODEL_SHA] = None
        m[wire.K_SENSORS] = [[name, unit, list(features.FEATURE_NAMES)] for name, unit in self.sensors]
        m[wire.K_SITE] = self.site
        m[wire.K_LINE] = self.cfg["line"]
        m[wire.K_MACHINE] = self.cfg["machine"]
        m[wire.K_DROPS] = {0: self.queue.drops}
        m[wire.K_WINDOW] = [self.cfg["hal"]["rate_hz"], self.cfg["window"]["samples"]]
        return cbor.dumps(m)

    def death(self):
        return cbor.dumps(self._head(wire.KIND_DEATH))

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
        m = self._sequenced(wire.KIND_EVT, t_wall, t_mono)
        m[wire.K_FEATURES] = feats
        m[wire.K_SCORES] = scores
        m[wire.K_ANOMALY] = bool(causes)
        m[wire.K_CAUSES] = causes
        m[wire.K_DETECTOR] = "spc"
        self.queue.append(wire.KIND_EVT, cbor.dumps(m))
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
        m[wire.K_DROPS] = {0: self.queue.drops}
        self.queue.append(wire.KIND_TEL, cbor.dumps(m))
        log("telemetry", seq=self.seq, trace=_hex(m[wire.K_TRACE]))

    # -- MQTT -----------------------------------------------------------------------------
    def _connect(self):
        b = self.cfg["broker"]
        c = MQTTClient(self.node_id, b["host"], b["port"], user=b["user"], password=b["password"],
                       keepalive=b["keepalive"])
        c.set_last_will(self.topics[wire.KIND_DEATH], self.death(), qos=1, retain=True)
        c.connect(clean_session=True)
        c.publish(self.topics[wire.KIND_BIRTH], self.birth(), qos=1, retain=True)
        self.client = c
        self._backoff_ms = 500
        log("connected", broker="%s:%d" % (b["host"], b["port"]), boot=self.boot)

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
            sent = 0
            while sent < _DRAIN_PER_WINDOW:
                item = self.queue.peek()
                if item is None:
                    break
                kind, payload = item
                self.client.publish(self.topics[kind], payload, qos=1)
                self.queue.pop()  # only once the broker has acknowledged it
                self.sent += 1
                sent += 1
            self.client.ping_if_due()
            self.client.poll(budget_ms)
        except OSError as e:
            self._drop_connection(e)

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
            log("status", seq=self.seq, sent=self.sent, queue=self.queue.depth, drops=self.queue.drops)
        else:
            log("error", msg="unknown command %r: use 'fault <none|bearing|imbalance>', 'status' or 'stop'" % line)

    # -- main loop ------------------------------------------------------------------------
    def run(self, max_windows=0):
        period = self.cfg["window"]["period_ms"]
        stdin = StdinCommands()
        log("boot", node=self.node_id, boot=self.boot, fw=VERSION, machine=self.cfg["machine"])
        next_window = ticks_ms()
        while self.running:
            cmd = stdin.read()
            while cmd is not None:
                self.command(cmd)
                cmd = stdin.read()
            if ticks_diff(ticks_ms(), next_window) >= 0:
                next_window = ticks_add(next_window, period)
                self.window()
                if max_windows and self.windows >= max_windows:
                    self.running = False
            left = ticks_diff(next_window, ticks_ms())
            self.service_network(max(0, min(left, 50)))
            if self.client is None and left > 0:
                sleep_ms(min(left, 50))
        self.shutdown()

    def shutdown(self):
        # Deliver what is queued before saying goodbye, within a bounded time.
        deadline = ticks_add(ticks_ms(), 5000)
        while self.queue.depth and self.client is not None and ticks_diff(deadline, ticks_ms()) > 0:
            self.service_network(10)
        if self.client is not None:
            try:
                # A clean stop is a death too: publish it, as the will would not fire.
                self.client.publish(self.topics[wire.KIND_DEATH], self.death(), qos=1, retain=True)
                self.client.disconnect()
            except OSError:
                pass
        log("stopped", seq=self.seq, sent=self.sent, queue=self.queue.depth, drops=self.queue.drops)


def main(config_path="config.json"):
    node = Node(load(config_path))
    try:
        node.run()
    except KeyboardInterrupt:
        node.shutdown()
