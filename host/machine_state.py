"""The gateway's live picture of each machine (its digital twin), fed by node messages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgeline.host.wire import Birth, Event


@dataclass
class NodeInfo:
    node: str
    boot: int
    machine: str  # the machine's Site/Line/Machine key
    firmware: str
    online: bool = True
    last_seen: float = 0.0
    last_seq: int = 0


@dataclass
class MachineState:
    site: str
    line: str
    machine: str
    sensors: dict[str, tuple[str, list[str]]] = field(
        default_factory=dict
    )  # name -> unit, features
    features: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    anomaly: bool = False
    anomalies: int = 0
    last_trace: str = ""
    nodes: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        """Site/Line/Machine path: machine names need only be unique within a line."""
        return f"{self.site}/{self.line}/{self.machine}"


class StateStore:
    def __init__(self) -> None:
        self.machines: dict[str, MachineState] = {}
        self.nodes: dict[str, NodeInfo] = {}

    def on_birth(self, b: Birth) -> tuple[MachineState, bool]:
        """Register or refresh a node; returns its machine and whether the machine is new."""
        key = f"{b.site}/{b.line}/{b.machine}"
        new = key not in self.machines
        m = self.machines.get(key)
        if m is None:
            m = self.machines[key] = MachineState(b.site, b.line, b.machine)
        for name, unit, feats in b.sensors:
            m.sensors[name] = (unit, feats)
        m.nodes.add(b.node)
        self.nodes[b.node] = NodeInfo(b.node, b.boot, key, b.firmware, True, time.time())
        return m, new

    def on_death(self, node: str) -> NodeInfo | None:
        info = self.nodes.get(node)
        if info is not None:
            info.online = False
        return info

    def machine_of(self, node: str) -> MachineState | None:
        info = self.nodes.get(node)
        return self.machines.get(info.machine) if info else None

    def on_event(self, ev: Event) -> MachineState | None:
        m = self.machine_of(ev.node)
        if m is None:
            return None
        info = self.nodes[ev.node]
        info.last_seen = time.time()
        info.last_seq = ev.seq
        info.online = True
        m.features.update(ev.features)
        m.scores.update(ev.scores)
        m.anomaly = ev.anomaly
        if ev.anomaly:
            m.anomalies += 1
            m.last_trace = ev.trace_hex
        return m
