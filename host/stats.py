"""Small numeric summaries for reports: percentiles of latency samples."""

from __future__ import annotations

import numpy as np


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max of `samples` (ms), rounded to 0.01; None when there are none."""
    if not samples:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(samples, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": len(samples),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p99": round(float(p99), 2),
        "max": round(float(a.max()), 2),
    }
