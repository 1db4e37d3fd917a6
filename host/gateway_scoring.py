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
from edgeline.host.model_scorer import ModelScorer
from edgeline.host.wire import Event


class GatewayScorer:
    def __init__(self, model: str | os.PathLike[str] | bytes, backend: str = "litert") -> None:
        self.model = ModelScorer(model, backend=backend)
        self.threshold = float(self.model.scoring.threshold)
        # (sensor, index in that sensor's feature list) per model input, resolved per
        # feature-name list (births announce them; usually one list for every machine).
        self.inputs = [f.split(".", 1) for f in self.model.scoring.features]
        self.rows_scored = 0
        self.last_batch_seconds = 0.0

    def _row(self, ev: Event, names: dict[str, list[str]]) -> list[float] | None:
        row = []
        for sensor, feature in self.inputs:
            vals = ev.features.get(sensor)
            fnames = names.get(sensor)
            if vals is None or fnames is None or feature not in fnames:
                return None
            i = fnames.index(feature)
            if i >= len(vals):
                return None
            row.append(vals[i])
        return row

    def score(self, events: list[tuple[Event, dict[str, list[str]]]]) -> list[float | None]:
        """Score ratio (score / threshold) per event; None where the model's inputs are missing.

        `events` pairs each event with its machine's feature names per sensor (from births).
        """
        rows: list[list[float]] = []
        where: list[int] = []
        for i, (ev, names) in enumerate(events):
            r = self._row(ev, names)
            if r is not None:
                rows.append(r)
                where.append(i)
        out: list[float | None] = [None] * len(events)
        if not rows:
            return out
        t0 = time.perf_counter()
        scores = self.model.scores(np.asarray(rows, dtype=np.float64))
        self.last_batch_seconds = time.perf_counter() - t0
        self.rows_scored += len(rows)
        for i, sc in zip(where, scores, strict=True):
            out[i] = float(sc) / self.threshold
        return out
