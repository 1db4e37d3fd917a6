"""The gateway model: batched scoring of each machine's features, and blue-green reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from edgeline.firmware.edgeline_node import features as node_features
from edgeline.host.demo import DEMO_MODEL
from edgeline.host.gateway import Gateway, GatewayConfig, alarm_score
from edgeline.host.gateway_scoring import GatewayScorer
from edgeline.host.ports import free_tcp_port

from wire_messages import birth, event

SENSORS = ("vibration", "temperature", "current")
HEALTHY = {
    "vibration": [0.0, 0.39, 0.39, 0.69, 1.77],
    "temperature": [39.5, 0.05, 39.5, 39.64, 1.0],
    "current": [0.0, 9.5, 9.5, 13.6, 1.44],
}


def _birth() -> bytes:
    return birth("n1", fw="t", sensors=[(s, "u", node_features.FEATURE_NAMES) for s in SENSORS])


def _event(seq: int, feats: dict[str, list[float]]) -> bytes:
    return event(
        "n1",
        seq,
        trace=seq.to_bytes(16, "big"),
        span=b"\x01" * 8,
        features=feats,
        scores={s: 0.1 for s in SENSORS},
    )


def test_gateway_scores_machines_and_reloads_blue_green(tmp_path: Path) -> None:
    seen: list[float | None] = []

    async def scenario() -> Gateway:
        gw = Gateway(GatewayConfig(site="s1", opcua_port=free_tcp_port(), model_path=str(DEMO_MODEL)))
        gw.event_listeners.append(lambda ev, m, t: seen.append(ev.scores.get("gateway")))
        await gw.start(connect=False)
        try:
            await gw.handle("edgeline/v1/s1/n1/birth", _birth(), 0)
            await gw.handle("edgeline/v1/s1/n1/evt", _event(1, HEALTHY), 0)
            faulty = {**HEALTHY, "vibration": [0.0, 1.2, 1.2, 3.5, 2.9]}
            await gw.handle("edgeline/v1/s1/n1/evt", _event(2, faulty), 0)
            # Reload: a broken file is refused and the running model stays...
            bad = tmp_path / "bad.tflite"
            bad.write_bytes(DEMO_MODEL.read_bytes()[:500])
            running = gw.scorer
            assert not gw.reload_model(str(bad))
            assert gw.scorer is running and gw.stats.model_reloads_refused == 1
            # ...a good one is swapped in, and scoring goes on with it.
            assert gw.reload_model(DEMO_MODEL.read_bytes())
            assert gw.scorer is not running and gw.stats.model_reloads == 1
            await gw.handle("edgeline/v1/s1/n1/evt", _event(3, HEALTHY), 0)
        finally:
            await gw.stop()
        return gw

    asyncio.run(scenario())
    assert len(seen) == 3 and all(s is not None for s in seen)
    healthy1, faulty, healthy2 = seen
    assert healthy1 is not None and faulty is not None and healthy2 is not None
    assert healthy1 < 1.0 < faulty  # ratios to the model's threshold
    assert healthy2 == pytest.approx(healthy1)


def test_self_test_and_alarm_units() -> None:
    s = GatewayScorer(str(DEMO_MODEL))
    assert 0.0 <= s.self_test() < 1.0
    from edgeline.host.wire import Event

    ev = Event(
        kind=1,
        node="n",
        boot=1,
        seq=1,
        trace_id=b"\x01" * 16,
        span_id=b"\x01" * 8,
        t_wall_us=0,
        t_mono_us=0,
        scores={"vibration": 2.0, "model": 1.5},
    )
    assert alarm_score(ev) == pytest.approx(4.5)  # a model at 1.5x its threshold is 4.5 sigma
