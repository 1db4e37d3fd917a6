"""The gateway's second opinion: a model over all of a machine's sensors, batched.

Each accepted window event whose features cover the model's inputs ("sensor.feature") is
scored through LiteRT (host/inference.py) in one invoke per batch. The result is reported
as a ratio to the model's threshold (1.0 = at the threshold), the same unit the nodes use
for their own model score, so alarms compare scores from different models.
"""

from __future__ import annotations

import os
import time

import numpy as np
from edgeline.host.machine_state import MachineState
from edgeline.host.model_scorer import ModelScorer
from edgeline.host.wire import Event


class GatewayScorer:
    def __init__(self, model: str | os.PathLike[str] | bytes, backend: str = "litert") -> None:
        self.model = ModelScorer(model, backend=backend)
        self.threshold = float(self.model.scoring.threshold)
        # (sensor, feature) per model input; births say where each sits in a machine's events.
        self.inputs = [tuple(f.split(".", 1)) for f in self.model.scoring.features]
        self.rows_scored = 0
        self.last_batch_seconds = 0.0
        self._index_cache: dict[str, list[tuple[str, int]] | None] = {}

    def _index(self, m: MachineState) -> list[tuple[str, int]] | None:
        """Where each model input sits in this machine's events, from its birth; cached."""
        key = m.key
        if key in self._index_cache:
            return self._index_cache[key]
        idx: list[tuple[str, int]] | None = []
        for sensor, feature in self.inputs:
            spec = m.sensors.get(sensor)
            if spec is None or feature not in spec[1]:
                idx = None
                break
            assert idx is not None
            idx.append((sensor, spec[1].index(feature)))
        if len(self._index_cache) > 4096:
            self._index_cache.clear()
        self._index_cache[key] = idx
        return idx

    def self_test(self) -> float:
        """Score the training centre (the scaler's mean): a working model scores it finite and
        below its threshold. Returns that ratio; raises ValueError otherwise."""
        centre = np.asarray([self.model.scoring.mean], dtype=np.float64)
        ratio = float(self.model.scores(centre)[0]) / self.threshold
        if not np.isfinite(ratio) or ratio >= 1.0:
            raise ValueError(f"model self-test failed: its training centre scores {ratio:.3f} x threshold")
        return ratio

    def forget(self, machine_key: str) -> None:
        """A birth may change a machine's sensors or features: look them up again."""
        self._index_cache.pop(machine_key, None)

    def score(self, events: list[tuple[Event, MachineState | None]]) -> list[float | None]:
        """Score ratio (score / threshold) per event; None where the model's inputs are missing.

        Each event comes with its machine (whose birth names the features per sensor).
        """
        rows: list[list[float]] = []
        where: list[int] = []
        for i, (ev, m) in enumerate(events):
            idx = self._index(m) if m is not None else None
            if idx is None:
                continue
            try:
                rows.append([ev.features[s][j] for s, j in idx])
            except (KeyError, IndexError):
                continue  # this event lacks a sensor or feature the model needs
            where.append(i)
        out: list[float | None] = [None] * len(events)
        if not rows:
            return out
        t0 = time.perf_counter()
        scores = self.model.scores(np.asarray(rows, dtype=np.float64))
        self.last_batch_seconds = time.perf_counter() - t0
        self.rows_scored += len(rows)
        for i, sc in zip(where, scores.tolist(), strict=True):
            out[i] = sc / self.threshold
        return out
