"""The address space: types and instances, stable NodeIds, honest value status, coalesced writes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from edgeline.host.machine_state import MachineState
from edgeline.host.opcua_server import MACHINE_VARS, OpcuaServer
from edgeline.host.opcua_watch import connect
from edgeline.host.ports import free_tcp_port
from edgeline.host.wire import Event

from opcua_pki import birth, gateway, send, window
from wire_messages import death

pytestmark = pytest.mark.timeout(60)
NS = "urn:edgeline:gateway"


async def _dv(c: Client, idx: int, path: str) -> ua.DataValue:
    return await c.get_node(ua.NodeId(path, idx)).read_data_value(raise_on_bad_status=False)


def test_types_instances_and_node_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with gateway(None) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await send(gw, "n2", "birth", birth("n2", "m2", sensors=("current",)))
            await gw.opcua.flush()
            c = await connect(gw.opcua.endpoint)
            try:
                idx = await c.get_namespace_index(NS)
                nid = lambda p: ua.NodeId(p, idx)  # noqa: E731
                mt = c.get_node(nid("MachineType"))
                st = c.get_node(nid("SensorType"))
                assert await mt.read_node_class() == ua.NodeClass.ObjectType
                members = {(await n.read_browse_name()).Name for n in await mt.get_children()}
                assert members == set(MACHINE_VARS)
                assert {(await n.read_browse_name()).Name for n in await st.get_children()} == {
                    "Unit",
                    "Score",
                }

                site, line = c.get_node(nid("s1")), c.get_node(nid("s1/l1"))
                folder = ua.NodeId(ua.ObjectIds.FolderType)
                assert (await site.read_type_definition()) == folder == (await line.read_type_definition())
                m1 = c.get_node(nid("s1/l1/m1"))
                assert await m1.read_type_definition() == mt.nodeid
                assert await c.get_node(nid("s1/l1/m1/vibration")).read_type_definition() == st.nodeid
                children = {(await n.read_browse_name()).Name: n.nodeid for n in await m1.get_children()}
                assert children == {
                    **{v: nid(f"s1/l1/m1/{v}") for v in MACHINE_VARS},
                    "AnomalyAlarm": nid("s1/l1/m1/AnomalyAlarm"),
                    "vibration": nid("s1/l1/m1/vibration"),
                    "current": nid("s1/l1/m1/current"),
                }
                sens = {
                    (await n.read_browse_name()).Name: n.nodeid
                    for n in await c.get_node(nid("s1/l1/m2/current")).get_children()
                }
                assert sens == {k: nid(f"s1/l1/m2/current/{k}") for k in ("Unit", "Score", "mean", "rms")}
                assert await c.get_node(nid("s1/l1/m2/current/Unit")).read_value() == "A"
                # The condition: typed, with its methods referenced from the type.
                alarm = c.get_node(nid("s1/l1/m1/AnomalyAlarm"))
                assert await alarm.read_type_definition() == nid("AnomalyAlarmType")
                methods = await alarm.get_methods()
                assert ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge) in {
                    m.nodeid for m in methods
                }
                assert await c.get_node(nid("s1/l1/m1/AnomalyAlarm/InputNode")).read_value() == nid(
                    "s1/l1/m1/Score"
                )
                notifiers = await c.nodes.server.get_referenced_nodes(ua.ObjectIds.HasNotifier)
                assert {n.nodeid for n in notifiers} >= {nid("s1/l1/m1"), nid("s1/l1/m2")}
            finally:
                await c.disconnect()

    asyncio.run(scenario())


class _Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        dv = data.monitored_item.Value
        self.seen.append((node.nodeid.Identifier, val, dv.StatusCode.value))


def test_offline_values_are_uncertain_then_good_after_rebirth(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with gateway(None) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await gw.opcua.flush()
            c = await connect(gw.opcua.endpoint)
            try:
                idx = await c.get_namespace_index(NS)
                watched = ["s1/l1/m1/vibration/rms", "s1/l1/m1/Score", "s1/l1/m1/Online"]
                h = _Changes()
                sub = await c.create_subscription(0, h)
                await sub.subscribe_data_change([c.get_node(ua.NodeId(p, idx)) for p in watched])

                dv = await _dv(c, idx, "s1/l1/m1/vibration/rms")
                assert dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData, (
                    "no value yet: not a 0.0"
                )
                t_sample = time.time_ns() // 1000
                await send(gw, "n1", "evt", window("n1", 1, 1.5))
                await gw.opcua.flush()
                dv = await _dv(c, idx, "s1/l1/m1/vibration/rms")
                assert dv.StatusCode.is_good() and dv.Value.Value == 1.5
                assert (
                    dv.SourceTimestamp is not None
                    and abs(dv.SourceTimestamp.timestamp() * 1e6 - t_sample) < 2e6
                )
                src = dv.SourceTimestamp

                await send(gw, "n1", "death", death("n1"))
                await gw.opcua.flush()
                for p in ("s1/l1/m1/vibration/rms", "s1/l1/m1/Score", "s1/l1/m1/current/Score"):
                    dv = await _dv(c, idx, p)
                    assert dv.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue, p
                dv = await _dv(c, idx, "s1/l1/m1/vibration/rms")
                assert dv.Value.Value == 1.5 and dv.SourceTimestamp == src, "last usable value, its own time"
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is False
                assert (await _dv(c, idx, "s1/l1/m1/Health")).Value.Value == "Offline"

                # Reborn: online again; each value is Good with its next reading.
                await send(gw, "n1", "birth", birth("n1", "m1", boot=2))
                await gw.opcua.flush()
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is True
                stale = await _dv(c, idx, "s1/l1/m1/vibration/rms")
                assert stale.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue, "no new reading yet"
                await send(gw, "n1", "evt", window("n1", 1, 2.5, boot=2))
                await gw.opcua.flush()
                dv = await _dv(c, idx, "s1/l1/m1/vibration/rms")
                assert dv.StatusCode.is_good() and dv.Value.Value == 2.5
                assert (await _dv(c, idx, "s1/l1/m1/Health")).Value.Value == "Normal"

                # A subscribed client saw the same story.
                await asyncio.sleep(0.3)
                rms = [(v, st) for p, v, st in h.seen if p == "s1/l1/m1/vibration/rms"]
                good, uncertain = ua.StatusCodes.Good, ua.StatusCodes.UncertainLastUsableValue
                assert [x for x in rms if x[0] is not None][-3:] == [
                    (1.5, good),
                    (1.5, uncertain),
                    (2.5, good),
                ]
            finally:
                await c.disconnect()

    asyncio.run(scenario())


def test_one_node_of_two_goes_offline(tmp_path: Path) -> None:
    """With the node named, only the sensors it feeds go stale; the machine stays online."""

    async def scenario() -> None:
        async with gateway(None) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1", sensors=("vibration",)))
            await send(gw, "n2", "birth", birth("n2", "m1", sensors=("current",)))
            op = gw.opcua
            await op.set_online("s1/l1/m1", True, node="n1", sensors=["vibration"])
            await op.set_online("s1/l1/m1", True, node="n2", sensors=["current"])
            await send(gw, "n1", "evt", window("n1", 1, 1.0, sensors=("vibration",)))
            await send(gw, "n2", "evt", window("n2", 1, 1.0, sensors=("current",)))
            await op.set_online("s1/l1/m1", False, node="n2")
            await op.flush()
            c = await connect(op.endpoint)
            try:
                idx = await c.get_namespace_index(NS)
                assert (
                    await _dv(c, idx, "s1/l1/m1/current/rms")
                ).StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
                assert (await _dv(c, idx, "s1/l1/m1/vibration/rms")).StatusCode.is_good()
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is True
                await op.set_online("s1/l1/m1", False, node="n1")
                await op.flush()
                assert (
                    await _dv(c, idx, "s1/l1/m1/vibration/rms")
                ).StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is False
                # An event is proof of life, birth or not; the other node's values stay stale.
                await send(gw, "n1", "evt", window("n1", 2, 1.0, sensors=("vibration",)))
                await op.flush()
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is True
                assert (await _dv(c, idx, "s1/l1/m1/vibration/rms")).StatusCode.is_good()
                stale = await _dv(c, idx, "s1/l1/m1/current/rms")
                assert stale.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
            finally:
                await c.disconnect()

    asyncio.run(scenario())


def _event(seq: int, value: float) -> Event:
    return Event(
        kind=1,
        node="n1",
        boot=1,
        seq=seq,
        trace_id=seq.to_bytes(16, "big"),
        span_id=b"\x01" * 8,
        t_wall_us=time.time_ns() // 1000,
        t_mono_us=seq,
        features={f"s{i}": [value] * 8 for i in range(25)},
        scores={f"s{i}": 0.5 for i in range(25)},
    )


def test_writes_are_coalesced_and_the_loop_is_not_starved() -> None:
    async def scenario() -> None:
        # 25 sensors x (8 features + score) + machine members: ~240 variables per event.
        op = OpcuaServer("127.0.0.1", free_tcp_port(), flush_interval=0.5, flush_chunk=50)
        await op.start()
        try:
            sensors = {f"s{i}": ("u", [f"f{j}" for j in range(8)]) for i in range(25)}
            m = MachineState("s1", "l1", "m1", sensors=sensors)
            await op.ensure_machine(m)
            await op.set_online(m.key, True)
            await op.flush()
            before = op.writes
            for seq in range(1, 201):
                await op.update(m, _event(seq, float(seq)))
            n_vars = len(op._dirty)
            assert 225 <= n_vars <= 260
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            t = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            await op.flush()
            stop.set()
            await t
            assert op.writes - before == n_vars, "200 events, each variable written once: latest wins"
            assert ticks >= n_vars // 50 - 1, "the flush yields every flush_chunk writes"
            c = await connect(op.endpoint)
            try:
                idx = await c.get_namespace_index(NS)
                assert (await _dv(c, idx, "s1/l1/m1/s7/f3")).Value.Value == 200.0
            finally:
                await c.disconnect()
        finally:
            await op.stop()

    asyncio.run(scenario())


def test_machine_known_from_a_previous_run_comes_online_with_its_first_event() -> None:
    """The gateway restores known machines at start (no birth yet): Online is unknown, not
    true, until a birth or an event."""

    async def scenario() -> None:
        async with gateway(None) as gw:
            m = MachineState("s1", "l1", "m1", sensors={"vibration": ("g", ["mean", "rms"])})
            await gw.opcua.ensure_machine(m)
            await gw.opcua.flush()
            c = await connect(gw.opcua.endpoint)
            try:
                idx = await c.get_namespace_index(NS)
                dv = await _dv(c, idx, "s1/l1/m1/Online")
                assert dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData
                ev = _event(1, 0.5)
                ev.features, ev.scores = {"vibration": [0.1, 0.2]}, {"vibration": 0.5}
                await gw.opcua.update(m, ev)
                await gw.opcua.flush()
                assert (await _dv(c, idx, "s1/l1/m1/Online")).Value.Value is True
                assert (await _dv(c, idx, "s1/l1/m1/Health")).Value.Value == "Normal"
            finally:
                await c.disconnect()

    asyncio.run(scenario())
