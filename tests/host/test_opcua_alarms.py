"""The anomaly alarm as an OPC-UA condition: raise, acknowledge, clear with hysteresis, refresh.

End to end through `Gateway.handle` and an asyncua client subscribed to the alarms, under
Basic256Sha256 Sign&Encrypt with a trusted client certificate and a user account; the state
machine's rules also in isolation, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from asyncua import ua
from edgeline.host.opcua_alarms import AlarmConfig, AlarmManager
from edgeline.host.opcua_watch import AlarmWatcher, SeenAlarm, connect
from edgeline.host.wire import Event

from opcua_pki import birth, gateway, make_pki, send, trace_of, window
from wire_messages import death

pytestmark = pytest.mark.timeout(60)

CFG = AlarmConfig(raise_threshold=3.0, clear_threshold=2.0, raise_count=2, clear_count=3, severity=750)


def _refreshed(seen: list[SeenAlarm]) -> list[SeenAlarm] | None:
    """The alarms between the last RefreshStart and its RefreshEnd (None: no complete refresh)."""
    kinds = [a.kind for a in seen]
    if "refresh-end" not in kinds:
        return None
    end = len(kinds) - 1 - kinds[::-1].index("refresh-end")
    start = max(i for i in range(end) if kinds[i] == "refresh-start")
    return seen[start + 1 : end]


def test_alarm_lifecycle_under_sign_and_encrypt(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        async with gateway(pki.cfg, CFG) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            aw = AlarmWatcher(gw.opcua.endpoint, pki.operator)
            await aw.start()
            try:
                await send(gw, "n1", "evt", window("n1", 1, 1.0))
                await send(gw, "n1", "evt", window("n1", 2, 5.0))  # 1 of 2 needed to raise
                await asyncio.sleep(0.3)
                assert aw.alarms == [], "one event above the threshold must not raise (raise_count=2)"
                await send(gw, "n1", "evt", window("n1", 3, 6.0))
                seen = await aw.wait_for(lambda s: len([a for a in s if a.kind == "alarm"]) >= 1)
                raised = next(a for a in seen if a.kind == "alarm")
                assert raised.active and not raised.acked and raised.retain
                assert raised.trace_id == trace_of("n1", 3).hex(), "TraceId of the event that raised it"
                assert raised.score == 6.0 and raised.severity == 750
                assert raised.source == "s1/l1/m1" and raised.trace_id in raised.message
                assert raised.condition_id is not None
                assert raised.condition_id.Identifier == "s1/l1/m1/AnomalyAlarm"
                assert raised.latency_ms is not None and raised.latency_ms < 1000

                # The address space follows: the machine and the condition's own variables.
                c = aw.client
                assert c is not None
                idx = raised.condition_id.NamespaceIndex
                await gw.opcua.flush()
                health = await c.get_node(ua.NodeId("s1/l1/m1/Health", idx)).read_value()
                assert health == "Alarm"
                active_id = c.get_node(ua.NodeId("s1/l1/m1/AnomalyAlarm/ActiveState/Id", idx))
                assert await active_id.read_value() is True
                machine = c.get_node(ua.NodeId("s1/l1/m1", idx))
                conds = await machine.get_referenced_nodes(ua.ObjectIds.HasCondition)
                assert [n.nodeid for n in conds] == [raised.condition_id]

                # Acknowledge: the EventId must be the condition's latest.
                with pytest.raises(ua.uaerrors.BadEventIdUnknown):
                    await aw.acknowledge(raised, "wrong id", event_id=b"\x00" * 16)
                await aw.acknowledge(raised, "looking into it")
                seen = await aw.wait_for(lambda s: s[-1].kind == "alarm" and s[-1].acked)
                acked = seen[-1]
                assert acked.active and acked.retain, "still active: still retained"
                assert acked.user == "olga" and acked.comment == "looking into it"
                assert acked.event_id != raised.event_id
                with pytest.raises(ua.uaerrors.BadConditionBranchAlreadyAcked):
                    await aw.acknowledge(acked, "again")
                with pytest.raises(ua.uaerrors.BadEventIdUnknown):
                    await aw.add_comment(raised, "an old state's EventId")

                # Clear with hysteresis: 3 events in a row below 2.0; 2.5 is neither.
                n_alarms = len(aw.alarms)
                for seq, score in enumerate([1.0, 1.0, 2.5, 1.0, 1.0], start=4):
                    await send(gw, "n1", "evt", window("n1", seq, score))
                await asyncio.sleep(0.3)
                assert len(aw.alarms) == n_alarms, "not cleared before 3 quiet events in a row"
                assert gw.opcua.condition_of("s1/l1/m1").active  # type: ignore[union-attr]
                await send(gw, "n1", "evt", window("n1", 9, 1.0))
                seen = await aw.wait_for(lambda s: s[-1].kind == "alarm" and not s[-1].active)
                cleared = seen[-1]
                assert cleared.acked and not cleared.retain, "inactive and acknowledged: no longer retained"
                assert cleared.trace_id == raised.trace_id

                # Nothing is retained now: a refresh replays nothing.
                await aw.refresh()
                seen = await aw.wait_for(lambda s: _refreshed(s) is not None)
                assert _refreshed(seen) == []
            finally:
                await aw.stop()

    asyncio.run(scenario())


def test_refresh_replays_retained_and_viewer_cannot_acknowledge(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        async with gateway(pki.cfg, CFG) as gw:
            for n, m in (("n1", "m1"), ("n2", "m2"), ("n3", "m3")):
                await send(gw, n, "birth", birth(n, m))
            # m1: active, unacknowledged. m2: raised and cleared, never acknowledged (retained).
            # m3: quiet.
            for seq, score in enumerate([5.0, 5.0], 1):
                await send(gw, "n1", "evt", window("n1", seq, score))
            for seq, score in enumerate([5.0, 5.0, 0.5, 0.5, 0.5], 1):
                await send(gw, "n2", "evt", window("n2", seq, score))
            await send(gw, "n3", "evt", window("n3", 1, 0.5))
            await gw.opcua.flush()

            viewer = AlarmWatcher(gw.opcua.endpoint, pki.viewer)
            operator = AlarmWatcher(gw.opcua.endpoint, pki.operator)
            await viewer.start()
            await operator.start()
            try:
                await asyncio.sleep(0.2)
                assert viewer.alarms == [], "connected after the changes: nothing seen without a refresh"
                await viewer.refresh()
                seen = await viewer.wait_for(lambda s: _refreshed(s) is not None)
                replay = {a.source: a for a in _refreshed(seen) or []}
                assert set(replay) == {"s1/l1/m1", "s1/l1/m2"}
                assert replay["s1/l1/m1"].active and not replay["s1/l1/m1"].acked
                assert (
                    not replay["s1/l1/m2"].active
                    and not replay["s1/l1/m2"].acked
                    and replay["s1/l1/m2"].retain
                )
                for src, a in replay.items():
                    cond = gw.opcua.condition_of(src)
                    assert cond is not None and a.event_id == cond.event_id, "the latest state, same EventId"
                assert replay["s1/l1/m1"].trace_id == trace_of("n1", 2).hex()

                # A viewer may read and refresh, not acknowledge.
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await viewer.acknowledge(replay["s1/l1/m1"], "viewer tries")
                cond1 = gw.opcua.condition_of("s1/l1/m1")
                assert cond1 is not None and not cond1.acked

                # The operator acknowledges m2 with the EventId the refresh delivered.
                await operator.acknowledge(replay["s1/l1/m2"], "seen")
                await viewer.wait_for(
                    lambda s: s[-1].source == "s1/l1/m2" and s[-1].acked and not s[-1].retain
                )

                # ConditionRefresh2, for the one monitored item: only m1 is retained now.
                await viewer.refresh(monitored_item=True)
                seen = await viewer.wait_for(lambda s: s[-1].kind == "refresh-end")
                assert [a.source for a in _refreshed(seen) or []] == ["s1/l1/m1"]

                # Another session may not refresh (or peek into) the viewer's subscription.
                assert operator.client is not None and viewer._sub is not None
                cond_type = operator.client.get_node(ua.NodeId(ua.ObjectIds.ConditionType))
                with pytest.raises(ua.uaerrors.BadSubscriptionIdInvalid):
                    await cond_type.call_method(
                        ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                        ua.Variant(viewer._sub.subscription_id, ua.VariantType.UInt32),
                    )
            finally:
                await viewer.stop()
                await operator.stop()

    asyncio.run(scenario())


def test_raised_and_cleared_unacknowledged_stays_retained_until_acked(tmp_path: Path) -> None:
    """Unsecured (demo) mode: same state machine; anonymous may acknowledge there."""

    async def scenario() -> None:
        async with gateway(None, CFG) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            aw = AlarmWatcher(gw.opcua.endpoint)
            await aw.start()
            try:
                for seq, score in enumerate([4.0, 4.0, 1.0, 1.0, 1.0], 1):
                    await send(gw, "n1", "evt", window("n1", seq, score))
                seen = await aw.wait_for(lambda s: len(s) >= 2)
                assert [(a.active, a.acked, a.retain) for a in seen] == [
                    (True, False, True),
                    (False, False, True),
                ]
                await aw.acknowledge(seen[-1])
                seen = await aw.wait_for(lambda s: len(s) >= 3)
                assert (seen[-1].active, seen[-1].acked, seen[-1].retain) == (False, True, False)
                assert seen[-1].user == "anonymous"
                # The node going offline shows in the condition's Quality, and back.
                await send(gw, "n1", "death", death("n1"))
                seen = await aw.wait_for(lambda s: len(s) >= 4)
                assert seen[-1].quality == ua.StatusCodes.BadNoCommunication
                await send(gw, "n1", "birth", birth("n1", "m1", boot=2))
                seen = await aw.wait_for(lambda s: len(s) >= 5)
                assert seen[-1].quality == ua.StatusCodes.Good
            finally:
                await aw.stop()

    asyncio.run(scenario())


# -- the state machine alone ------------------------------------------------------------------
def _event(seq: int, score: float) -> Event:
    return Event(
        kind=1,
        node="n1",
        boot=1,
        seq=seq,
        trace_id=trace_of("n1", seq),
        span_id=b"\x01" * 8,
        t_wall_us=1_700_000_000_000_000 + seq,
        t_mono_us=seq,
        scores={"s": score},
        causes=["s"],
    )


def _manager(cfg: AlarmConfig) -> tuple[AlarmManager, list[Any], Any]:
    emitted: list[Any] = []
    mgr = AlarmManager(cast(Any, None), 2, cfg, lambda ev, c: emitted.append(ev), enforce_roles=True)
    cond = mgr.register(
        ua.NodeId("m/AnomalyAlarm", 2), ua.NodeId("m", 2), "s/l/m", {}, ua.NodeId("m/Score", 2)
    )
    return mgr, emitted, cond


@pytest.mark.parametrize(
    ("scores", "states"),
    [
        # (active, acked, retain) after each emitted event
        ([5, 1, 5, 1, 5], []),  # never 2 in a row above
        ([5, 5], [(True, False, True)]),
        ([5, 5, 5, 1, 1, 2.5, 1, 1, 1], [(True, False, True), (False, False, True)]),
        ([3.0, 3.0, 2.0, 2.0, 2.0], [(True, False, True)]),  # 2.0 is not below 2.0
        ([5, 5, 1, 1, 1, 5, 5], [(True, False, True), (False, False, True), (True, False, True)]),
    ],
)
def test_hysteresis(scores: list[float], states: list[tuple[bool, bool, bool]]) -> None:
    mgr, emitted, cond = _manager(AlarmConfig(3.0, 2.0, raise_count=2, clear_count=3))
    for i, s in enumerate(scores, 1):
        mgr.observe(cond, s, _event(i, s))
    got = [(e.__dict__["ActiveState/Id"], e.__dict__["AckedState/Id"], e.Retain) for e in emitted]
    assert got == states
    assert len({e.EventId for e in emitted}) == len(emitted), "each state has its own EventId"
    if emitted:
        assert emitted[-1].EventId == cond.event_id
        # The raise carries the trace of the event that completed the run of 2.
        first = next(i for i in range(1, len(scores)) if scores[i - 1] >= 3 and scores[i] >= 3)
        assert emitted[0].TraceId == trace_of("n1", first + 1).hex()


def test_alarm_config_is_checked() -> None:
    with pytest.raises(ValueError, match="clear_threshold"):
        AlarmConfig(raise_threshold=2.0, clear_threshold=3.0)
    with pytest.raises(ValueError, match="raise_count"):
        AlarmConfig(raise_count=0)
    with pytest.raises(ValueError, match="severity"):
        AlarmConfig(severity=0)


def test_unsecured_client_cannot_reach_a_secure_server(tmp_path: Path) -> None:
    """The asyncua client itself refuses: the server offers no None endpoint (the server-side
    refusals are in test_opcua_security)."""
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        async with gateway(pki.cfg, CFG) as gw:
            with pytest.raises(ua.UaError, match="No matching endpoints"):
                await connect(gw.opcua.endpoint)

    asyncio.run(scenario())
