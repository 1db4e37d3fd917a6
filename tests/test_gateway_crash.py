"""Kill the gateway (SIGKILL) in the middle of a stream of 10,000 events, restart it, and
check that every event was processed exactly once: the committed processed-counters equal
what was sent, and the uplink delivered every event (duplicates only, none missing).

Mosquitto only: the test relies on the broker keeping the gateway's persistent session
(clean_session=False) while it is dead; amqtt keeps none for anonymous clients.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from edgeline.hil.mosquitto import MosquittoProcess
from edgeline.host.ports import free_tcp_port
from edgeline.host.uplink import decode_record

from wire_messages import Collector, birth, disconnect, event, publisher

N_EVENTS = 10_000
NODES = [f"n{i}" for i in range(10)]


def _event(node: str, seq: int) -> bytes:
    anomaly = seq % 97 == 0
    return event(
        node,
        seq,
        trace=os.urandom(16),
        span=os.urandom(8),
        t_wall_us=time.time_ns() // 1000,
        t_mono_us=seq,
        anomaly=anomaly,
        causes=["vibration"] if anomaly else [],
    )


def _processed(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT COALESCE(SUM(count), 0) FROM processed WHERE kind = 'evt'").fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return 0  # schema not created yet
    finally:
        con.close()


class _GatewayProc:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "edgeline.host.cli",
            "-v",
            "gateway",
            "run",
            "--config",
            str(self.config),
        ]
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_gateway_sigkill_mid_stream_processes_each_event_once(tmp_path: Path) -> None:
    with MosquittoProcess() as ingest, MosquittoProcess() as upstream:
        state = tmp_path / "state"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nid = "gw-crash"\nsite = "s1"\nstate_dir = "{state}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {ingest.port}\n'
            f'[opcua]\nport = {free_tcp_port()}\nsecurity = "none"\n'
            f'[uplink]\nkind = "mqtt"\nhost = "127.0.0.1"\nport = {upstream.port}\n'
        )
        db = state / "gateway.sqlite3"

        # (node, boot, seq) of each uplink record
        up = Collector(
            "127.0.0.1", upstream.port, "t-up", "edgeline/v1/uplink/#", lambda p: decode_record(p).identity
        )
        seen: list[tuple[str, int, int]] = up.messages

        gw = _GatewayProc(cfg, tmp_path / "gateway.log")
        pub = publisher("127.0.0.1", ingest.port, "t-pub", max_inflight=200)
        try:
            gw.start()
            _wait(lambda: db.exists() and "gateway up" in gw.log.read_text(), 30, "the gateway to start")
            for n in NODES:
                birth_topic = f"edgeline/v1/s1/{n}/birth"
                pub.publish(birth_topic, birth(n, f"m-{n}"), qos=1, retain=True).wait_for_publish(5)
            killed_at = None
            infos = []
            for i in range(N_EVENTS):
                node = NODES[i % len(NODES)]
                infos.append(
                    pub.publish(f"edgeline/v1/s1/{node}/evt", _event(node, i // len(NODES) + 1), qos=1)
                )
                if killed_at is None and i >= 3000 and i % 100 == 0 and _processed(db) >= 2000:
                    gw.kill()  # mid-stream: events still arriving, some processed, some not
                    killed_at = _processed(db)
                if i % 500 == 0:
                    time.sleep(0.02)  # a stream, not one burst
            for info in infos:
                info.wait_for_publish(30)
            assert killed_at is not None, "the gateway was never killed mid-stream"
            assert killed_at < N_EVENTS
            gw.start()
            _wait(lambda: _processed(db) >= N_EVENTS, 120, f"{N_EVENTS} processed events")
            _wait(lambda: len(set(seen)) >= N_EVENTS, 60, "the uplink to deliver every event")
            time.sleep(1.0)  # anything late would show as over-counting
            processed = _processed(db)
        finally:
            gw.stop()
            disconnect(pub)
            up.close()

        assert processed == N_EVENTS, f"processed {processed}, sent {N_EVENTS} (killed at {killed_at})"
        with up.lock:
            unique = set(seen)
        expected = {(NODES[i % len(NODES)], 1, i // len(NODES) + 1) for i in range(N_EVENTS)}
        assert unique == expected
        dups = len(seen) - len(unique)
        print(f"killed at {killed_at} processed; uplink records {len(seen)}, duplicates {dups}")
