"""pytest fixtures for real MQTT brokers: a private Mosquitto and the embedded amqtt broker.

Load as a plugin (`pytest_plugins = ["brokers"]` in tests/conftest.py, or `-p brokers`).

- `mosquitto`: a fresh `MosquittoProcess` per test (stop()/start() it for an outage).
- `amqtt_broker`: a fresh `BrokerThread` per test.
- `broker`: parametrised over both, for tests that must pass on each; yields a `Broker`
  with `.name`, `.host`, `.port`, `.url` (and `.server`, the object above).

Tests using them carry the `mosquitto` / `amqtt` markers, so `-m "not mosquitto"` deselects
them. A missing broker fails its tests with an install hint: a suite that quietly skips its
broker tests proves nothing. EDGELINE_ALLOW_MISSING_BROKERS=1 turns that into a skip for a
quick local run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from edgeline.hil.mosquitto import MosquittoProcess

if TYPE_CHECKING:  # imported lazily below: without amqtt, only its tests are affected
    from edgeline.host.embedded_broker import BrokerThread

BROKERS = ("mosquitto", "amqtt")
_FIXTURE_MARKS = {"mosquitto": "mosquitto", "amqtt_broker": "amqtt"}


@dataclass(frozen=True)
class Broker:
    name: str  # "mosquitto" or "amqtt"
    host: str
    port: int
    server: MosquittoProcess | BrokerThread

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def _missing(what: str) -> None:
    if os.environ.get("EDGELINE_ALLOW_MISSING_BROKERS") == "1":
        pytest.skip(what)
    pytest.fail(what)


def _require_mosquitto() -> None:
    if not (
        os.environ.get("EDGELINE_MOSQUITTO")
        or shutil.which("mosquitto")
        or Path("/usr/sbin/mosquitto").exists()
    ):
        _missing("mosquitto is not installed: apt-get install mosquitto (Debian package `mosquitto`)")


def _require_amqtt() -> None:
    if importlib.util.find_spec("amqtt") is None:
        _missing("amqtt is not installed: pip install amqtt (the embedded broker)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Marks on fixtures have no effect in pytest; mark the tests that use them instead, at
    # collection time, so `-m` selection sees them. `broker` carries its marks per param.
    for item in items:
        names = getattr(item, "fixturenames", ())
        for fixture, mark in _FIXTURE_MARKS.items():
            if fixture in names:
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    """A private Mosquitto on 127.0.0.1:<free port>, stopped by PID after the test."""
    _require_mosquitto()
    with MosquittoProcess() as m:
        yield m


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerThread]:
    """The embedded amqtt broker in its own thread and loop, on 127.0.0.1:<free port>."""
    _require_amqtt()
    from edgeline.host.embedded_broker import BrokerThread

    with BrokerThread() as b:
        yield b


@pytest.fixture(
    params=[
        pytest.param("mosquitto", marks=pytest.mark.mosquitto),
        pytest.param("amqtt", marks=pytest.mark.amqtt),
    ]
)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Each real broker in turn: the test runs once on Mosquitto and once on amqtt."""
    name: str = request.param
    if name == "mosquitto":
        _require_mosquitto()
        with MosquittoProcess() as m:
            yield Broker(name, m.host, m.port, m)
    else:
        _require_amqtt()
        from edgeline.host.embedded_broker import BrokerThread

        with BrokerThread() as b:
            yield Broker(name, b.host, b.port, b)
