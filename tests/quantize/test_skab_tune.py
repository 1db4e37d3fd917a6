"""The search that chose SELECTED_CONFIG: it still chooses it, and it never loads valve2/."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgeline.quantize import tune
from edgeline.quantize.skab_eval import SkabConfig


@pytest.mark.slow
def test_tune_chooses_the_selected_config(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[str, ...]] = []
    real_load = tune.load_skab

    def spy(shared_dir: Path, groups: tuple[str, ...] = ("valve1", "valve2", "other")) -> list:  # type: ignore[type-arg]
        loaded.append(tuple(groups))
        return real_load(shared_dir, groups)

    monkeypatch.setattr(tune, "load_skab", spy)
    r = tune.tune_skab(shared, evaluate=False)
    assert loaded == [("valve1", "other")]
    assert SkabConfig.from_dict(r["selected"]) == tune.SELECTED_CONFIG
    assert r["selected_metrics"]["meets_targets"]
    assert r["grid_size"] == tune.Grid().size() == 2160
    assert r["search_seconds"] < 300


def test_grid_is_bounded_and_configs_round_trip() -> None:
    assert tune.Grid().size() <= 5000
    d = tune.SELECTED_CONFIG.to_dict()
    assert SkabConfig.from_dict(d) == tune.SELECTED_CONFIG
    with pytest.raises(ValueError, match=r"unknown SKAB config keys \['colour'\]"):
        SkabConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="unknown: \\['Humidity'\\]"):
        SkabConfig(columns=("Humidity",))
