"""The PLC bridge (host/plc_bridge.py): values written on an asyncua server standing in for a
PLC arrive at the real gateway as node events, in order, with their source timestamps; the
bridge survives the PLC going away; its config and value handling refuse what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Server, ua
from edgeline.firmware.edgeline_node import wire as w
from edgeline.host.gateway import Gateway, GatewayConfig
from edgeline.host.machine_state import MachineState
from edgeline.host.plc_bridge import (
    PlcBridge,
    PlcBridgeConfig,
    PlcConfigError,
    PlcPoint,
    load_config,
    next_boot_id,
    parse_config,
    to_us,
)
from edgeline.host.ports import free_tcp_port
from edgeline.host.wire import Event

NS_URI = "urn:edgeline:test:plc"
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


class FakePlc:
    """An asyncua server with a few PLC-style variables, restartable on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/plc/"
        self.server: Server | None = None
        self.vars: dict[str, Any] = {}
        self.ns = 0

    async def start(self) -> None:
        srv = Server()
        await srv.init()
        srv.set_endpoint(self.endpoint)
        srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = await srv.register_namespace(NS_URI)
        line = await srv.nodes.objects.add_object(ua.NodeId("Line1", self.ns), "Line1")
        for name, init, vtype in [
            ("Line1.Pump3.Vib", 0.5, ua.VariantType.Double),
            ("Line1.Pump3.Temp", 40, ua.VariantType.Int32),
            ("Line1.Fan1.Running", False, ua.VariantType.Boolean),
        ]:
            self.vars[name] = await line.add_variable(ua.NodeId(name, self.ns), name, init, varianttype=vtype)
        await srv.start()
        self.server = srv

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def write(self, name: str, value: Any, ts: dt.datetime, vtype: ua.VariantType) -> None:
        dv = ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=ts, ServerTimestamp=ts)
        await self.vars[name].write_value(dv)

    def nodeid(self, name: str) -> str:
        return f"ns={self.ns};s={name}"


@contextlib.asynccontextmanager
async def fake_plc() -> AsyncIterator[FakePlc]:
    p = FakePlc(free_tcp_port())
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def bridge_config(plc: FakePlc, broker: Any, state_dir: Path) -> PlcBridgeConfig:
    return PlcBridgeConfig(
        endpoint=plc.endpoint,
        site="plant-a",
        line="line-1",
        machine="pump-3",
        points=[
            PlcPoint(plc.nodeid("Line1.Pump3.Vib"), "plc-pump3", "vibration", "g"),
            PlcPoint(plc.nodeid("Line1.Pump3.Temp"), "plc-pump3", "temperature", "degC"),
            PlcPoint(plc.nodeid("Line1.Fan1.Running"), "plc-fan1", "running", "", machine="fan-1"),
        ],
        state_dir=state_dir,
        broker_host=broker.host,
        broker_port=broker.port,
        publishing_interval_ms=10,
        timeout_s=2,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
    )


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def start_gateway(broker: Any) -> tuple[Gateway, list[Event]]:
    gw = Gateway(GatewayConfig(broker_host=broker.host, broker_port=broker.port, opcua_port=free_tcp_port()))
    got: list[Event] = []

    def listener(ev: Event, _m: MachineState, _t: int) -> None:
        got.append(ev)

    gw.event_listeners.append(listener)
    await gw.start()
    return gw, got


@contextlib.asynccontextmanager
async def plc_bridged_to_gateway(
    broker: Any, tmp_path: Path
) -> AsyncIterator[tuple[FakePlc, Gateway, list[Event], PlcBridge]]:
    """A fake PLC, a gateway keeping every event it accepts (`got`), and a bridge between them
    that has delivered the PLC's current values (what it holds when the bridge subscribes:
    3 events). The bridge and the gateway are stopped on the way out."""
    async with fake_plc() as plc:
        gw, got = await start_gateway(broker)
        bridge = PlcBridge(bridge_config(plc, broker, tmp_path / "state"))
        try:
            await bridge.start()
            await wait_for(lambda: len(got) >= 3, 15, "the initial values")
            yield plc, gw, got, bridge
        finally:
            await bridge.stop()
            await gw.stop()


def series(got: list[Event], node: str, sensor: str) -> list[tuple[float, int]]:
    return [(e.features[sensor][0], e.t_wall_us) for e in got if e.node == node and sensor in e.features]


def test_plc_values_arrive_at_the_gateway_in_order(broker: Any, tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_values_arrive(broker, tmp_path), 120))


async def _values_arrive(broker: Any, tmp_path: Path) -> None:
    # The current values first (3 events, waited for), then what is written.
    async with plc_bridged_to_gateway(broker, tmp_path) as (plc, gw, got, bridge):
        vib = [round(0.1 * i, 3) for i in range(1, 41)]
        temps = [41, 42, 42, 43]  # a repeated value with a new timestamp is a new sample
        for i, v in enumerate(vib):
            await plc.write(
                "Line1.Pump3.Vib", v, T0 + dt.timedelta(milliseconds=10 * i), ua.VariantType.Double
            )
            if i % 10 == 0:
                t = temps[i // 10]
                await plc.write("Line1.Pump3.Temp", t, T0 + dt.timedelta(seconds=i), ua.VariantType.Int32)
            if i == 20:
                await plc.write("Line1.Fan1.Running", True, T0, ua.VariantType.Boolean)
            await asyncio.sleep(0.002)  # a PLC's scan, and the server's loop gets to run
        await wait_for(lambda: len(got) >= 3 + 40 + 4 + 1, 15, "every written value")
        await gw.drain()

        vib_got = series(got, "plc-pump3", "vibration")
        assert [v for v, _ in vib_got] == [0.5, *vib]
        assert [t for _, t in vib_got[1:]] == [
            to_us(T0 + dt.timedelta(milliseconds=10 * i)) for i in range(40)
        ]
        assert [v for v, _ in series(got, "plc-pump3", "temperature")] == [40.0, 41.0, 42.0, 42.0, 43.0]
        assert [v for v, _ in series(got, "plc-fan1", "running")] == [0.0, 1.0]

        pump = [e for e in got if e.node == "plc-pump3"]
        assert [e.seq for e in pump] == list(range(1, len(pump) + 1))  # per node, from 1, no gap
        assert all(e.boot == 1 and e.detector == "plc" and not e.anomaly for e in got)
        assert all(e.scores == {} and e.causes == [] and len(e.trace_id) == 16 for e in got)
        assert len({e.trace_id for e in got}) == len(got)
        assert gw.stats.malformed == 0 and gw.stats.duplicates == 0

        m = gw.state.machines["plant-a/line-1/pump-3"]
        assert m.sensors == {"vibration": ("g", ["value"]), "temperature": ("degC", ["value"])}
        assert m.features == {"vibration": [vib[-1]], "temperature": [43.0]}
        assert gw.state.machines["plant-a/line-1/fan-1"].features == {"running": [1.0]}
        assert gw.state.nodes["plc-pump3"].online and gw.state.nodes["plc-pump3"].firmware.startswith(
            "plc-bridge"
        )
        assert bridge.stats.published == len(got)
    # A clean stop publishes the virtual nodes' deaths (retained).
    assert bridge.stats.bad_status == bridge.stats.not_numeric == bridge.stats.dropped == 0


def test_bridge_follows_the_plc_through_an_outage(mosquitto: Any, tmp_path: Path) -> None:
    # The outage is the PLC's, not the broker's: one broker is enough here.
    asyncio.run(asyncio.wait_for(_outage(mosquitto, tmp_path), 120))


async def _outage(broker: Any, tmp_path: Path) -> None:
    async with plc_bridged_to_gateway(broker, tmp_path) as (plc, gw, got, bridge):
        await plc.write("Line1.Pump3.Vib", 1.5, T0, ua.VariantType.Double)
        await wait_for(lambda: len(got) >= 4, 10, "a value before the outage")

        await plc.stop()  # the PLC goes away: its virtual nodes go offline at the gateway
        await wait_for(lambda: not gw.state.nodes["plc-pump3"].online, 15, "the death of plc-pump3")
        assert not bridge.plc_connected
        await asyncio.sleep(1.0)  # a few reconnect attempts against a closed port

        await plc.start()  # back, same port; a new server (its variables start at their init value)
        await wait_for(lambda: bridge.plc_connected, 15, "the bridge to reconnect")
        await wait_for(lambda: gw.state.nodes["plc-pump3"].online, 15, "plc-pump3 to come back online")
        n = len(got)
        for i, v in enumerate([2.5, 3.5, 4.5]):
            await plc.write("Line1.Pump3.Vib", v, T0 + dt.timedelta(seconds=10 + i), ua.VariantType.Double)
        await wait_for(
            lambda: len(series(got[n:], "plc-pump3", "vibration")) >= 3, 15, "values after the outage"
        )
        after = [v for v, _ in series(got[n:], "plc-pump3", "vibration")]
        assert after[-3:] == [2.5, 3.5, 4.5]
        pump = [e for e in got if e.node == "plc-pump3"]
        assert [e.seq for e in pump] == list(range(1, len(pump) + 1))  # same boot, seq goes on
        assert bridge.stats.plc_connects == 2 and bridge.stats.plc_losses == 1


# -- in-process checks of the value handling (no broker) -----------------------------------------
def offline_config(state_dir: Path, *points: PlcPoint) -> PlcBridgeConfig:
    """Machine s/l/m, on a PLC endpoint nothing listens on: the bridge is only constructed."""
    return PlcBridgeConfig(
        endpoint="opc.tcp://127.0.0.1:1/",
        site="s",
        line="l",
        machine="m",
        points=list(points),
        state_dir=state_dir,
    )


class _Dv:
    def __init__(self, ts: dt.datetime | None, status: int = 0) -> None:
        self.SourceTimestamp = ts
        self.ServerTimestamp = None
        self.StatusCode = ua.StatusCode(status)


def test_values_are_checked_and_repeats_skipped(tmp_path: Path) -> None:
    bridge = PlcBridge(offline_config(tmp_path, PlcPoint("ns=2;s=A", "plc-a", "x")))
    sent: list[tuple[str, float, int]] = []
    link = bridge.links["plc-a"]
    link.publish_event = lambda s, v, t, _m: sent.append((s, v, t)) is None  # type: ignore[method-assign]
    naive = dt.datetime(2024, 1, 1, 0, 0, 1)  # naive = UTC
    bridge.on_value(1000, 1.25, _Dv(naive))
    bridge.on_value(1000, 1.25, _Dv(naive))  # the same sample again (re-subscribe): skipped
    bridge.on_value(1000, 2, _Dv(T0))
    bridge.on_value(1000, True, _Dv(T0 + dt.timedelta(seconds=1)))
    bridge.on_value(1000, float("nan"), _Dv(T0))
    bridge.on_value(1000, "text", _Dv(T0))
    bridge.on_value(1000, None, _Dv(T0))
    bridge.on_value(1000, 3.0, _Dv(T0, ua.StatusCodes.BadSensorFailure))
    bridge.on_value(1000, 3.0, _Dv(T0, ua.StatusCodes.UncertainLastUsableValue))
    bridge.on_value(999, 3.0, _Dv(T0))  # not ours
    assert sent == [
        ("x", 1.25, 1_704_067_201_000_000),
        ("x", 2.0, to_us(T0)),
        ("x", 1.0, to_us(T0) + 1_000_000),
    ]
    s = bridge.stats
    assert (s.values, s.published, s.repeated, s.not_numeric, s.bad_status) == (10, 3, 1, 3, 2)


def test_events_and_birth_follow_the_wire_format(tmp_path: Path) -> None:
    import cbor2
    from edgeline.host import wire

    bridge = PlcBridge(
        offline_config(
            tmp_path, PlcPoint("ns=2;s=A", "plc-a", "x", "bar"), PlcPoint("ns=2;s=B", "plc-a", "y")
        )
    )
    vn = bridge.nodes["plc-a"]
    birth = wire.parse_birth(wire.decode(vn.birth()), wire.parse_topic(vn.topic(w.KIND_BIRTH)))
    assert birth.sensors == [("x", "bar", ["value"]), ("y", "", ["value"])]
    assert (birth.site, birth.line, birth.machine, birth.boot) == ("s", "l", "m", 1)
    raw = vn.event("x", 3.25, 1_700_000_000_000_000, (1 << 31) + 5)
    ev = wire.parse_event(wire.decode(raw), wire.parse_topic(vn.topic(w.KIND_EVT)))
    assert (ev.seq, ev.features, ev.scores, ev.anomaly, ev.causes, ev.detector) == (
        1,
        {"x": [3.25]},
        {},
        False,
        [],
        "plc",
    )
    assert ev.t_wall_us == 1_700_000_000_000_000 and ev.t_mono_us == 5  # wraps at 2**30
    assert cbor2.loads(vn.death()) == {0: 1, 1: w.KIND_DEATH, 2: "plc-a", 3: 1}


def test_boot_id_is_persisted_and_incremented(tmp_path: Path) -> None:
    p = tmp_path / "deep" / "plc-a.boot"
    assert [next_boot_id(p) for _ in range(3)] == [1, 2, 3]
    assert p.read_text().strip() == "3"
    cfg = offline_config(tmp_path / "deep", PlcPoint("ns=2;s=A", "plc-a", "x"))
    assert PlcBridge(cfg).nodes["plc-a"].boot == 4  # a bridge start is a boot


# -- config ----------------------------------------------------------------------------------------
GOOD_TOML = """
[mqtt]
host = "127.0.0.1"
port = 1884

[plc]
endpoint = "opc.tcp://10.0.0.5:4840"
site = "plant-a"
line = "line-1"
machine = "pump-3"
state_dir = "state"
publishing_interval_ms = 0

[[plc.map]]
nodeid = "ns=2;s=Line1.Pump3.Vib"
node = "plc-pump3"
sensor = "vibration"
unit = "g"

[[plc.map]]
nodeid = "ns=2;i=1234"
node = "plc-fan1"
sensor = "speed"
machine = "fan-1"
"""


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD_TOML)
    cfg = load_config(path)
    assert cfg.endpoint == "opc.tcp://10.0.0.5:4840" and cfg.broker_port == 1884
    assert cfg.state_dir == tmp_path / "state" and cfg.publishing_interval_ms == 0.0
    assert cfg.points == [
        PlcPoint("ns=2;s=Line1.Pump3.Vib", "plc-pump3", "vibration", "g"),
        PlcPoint("ns=2;i=1234", "plc-fan1", "speed", "", None, "fan-1"),
    ]


def _with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    import tomllib

    raw = tomllib.loads(GOOD_TOML)
    change(raw)
    return raw


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.pop("plc"), r"no \[plc\] table"),
        (lambda r: r["plc"].pop("endpoint"), "plc.endpoint is missing"),
        (lambda r: r["plc"].update(endpoint="http://x"), "opc.tcp://"),
        (lambda r: r["plc"].update(site="a b"), "plc.site = 'a b' is not a valid name"),
        (lambda r: r["plc"].update(colour="red"), "unknown key plc.colour"),
        (lambda r: r["plc"].update(queue_size=0), "plc.queue_size must be positive"),
        (lambda r: r["plc"].update(queue_size="10"), r"plc\.queue_size must be a int"),
        (lambda r: r["plc"].update(map=[]), "plc.map is empty"),
        (lambda r: r["plc"]["map"][1].update(nodeid="nonsense"), r"plc.map\[1\].nodeid = 'nonsense'"),
        (lambda r: r["plc"]["map"][1].pop("sensor"), r"plc.map\[1\].sensor is missing"),
        (lambda r: r["plc"]["map"][1].update(node="_gateway"), r"plc.map\[1\].node"),
        (lambda r: r["plc"]["map"][1].update(unit="x" * 17), "longer than 16"),
        (lambda r: r["plc"]["map"][1].update(nodeid="ns=2;s=Line1.Pump3.Vib"), "mapped twice"),
        (lambda r: r["plc"]["map"][1].update(node="plc-pump3", sensor="vibration"), "already has a sensor"),
        (lambda r: r["plc"]["map"][1].update(node="plc-pump3"), "one node sits on one machine"),
        (lambda r: r["mqtt"].update(port=0), "mqtt.port"),
    ],
)
def test_bad_config_names_the_key(change: Callable[[dict[str, Any]], None], match: str) -> None:
    with pytest.raises(PlcConfigError, match=match):
        parse_config(_with(change))


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[plc\n")
    with pytest.raises(PlcConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(path)
    with pytest.raises(PlcConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    cfg = PlcBridgeConfig(
        endpoint="opc.tcp://127.0.0.1:1/",  # never reached: the broker comes first
        site="s",
        line="l",
        machine="m",
        points=[PlcPoint("ns=2;s=A", "plc-a", "x")],
        state_dir=tmp_path,
        broker_port=free_tcp_port(),
    )
    where = rf"127\.0\.0\.1:{cfg.broker_port}"
    with pytest.raises(ConnectionError, match=f"could not connect to MQTT broker {where}"):
        asyncio.run(PlcBridge(cfg).start(connect_timeout=1.0))
