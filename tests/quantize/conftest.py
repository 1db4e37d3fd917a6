"""Fixtures for the quantize tests: the benchmark data sets in the shared folder."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder holding datasets/ (SKAB, NAB, CWRU); a test that needs them fails
    without them rather than skipping."""
    if not (SHARED / "datasets" / "skab").is_dir():
        pytest.fail(f"the benchmark data are missing: expected {SHARED.resolve()}/datasets")
    return SHARED
