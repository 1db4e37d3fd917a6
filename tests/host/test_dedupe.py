import random

import pytest
from edgeline.host.dedupe import Deduper


def test_each_triple_accepted_once_in_any_order() -> None:
    d = Deduper(window=64)
    seqs = list(range(1, 501)) * 3  # every message delivered three times
    rng = random.Random(7)
    # Shuffle within small blocks: the reorder an MQTT reconnect-and-replay produces.
    blocks = [seqs[i : i + 20] for i in range(0, len(seqs), 20)]
    for b in blocks:
        rng.shuffle(b)
    accepted = [s for b in blocks for s in b if d.accept("n1", 1, s)]
    assert sorted(accepted) == list(range(1, 501))
    assert d.duplicates == 1000
    assert d.gaps == 0


def test_boots_and_nodes_are_separate_streams() -> None:
    d = Deduper()
    assert d.accept("n1", 1, 1)
    assert d.accept("n1", 2, 1)
    assert d.accept("n2", 1, 1)
    assert not d.accept("n1", 1, 1)
    assert d.streams() == 3


def test_memory_bounded_and_gaps_counted() -> None:
    d = Deduper(window=10)
    assert d.accept("n", 1, 1)
    # seqs 2..5 never arrive; 6..30 do
    for s in range(6, 31):
        assert d.accept("n", 1, s)
    assert d.gaps == 4
    s = d._streams[("n", 1)]
    assert len(s.above) <= 10
    assert not d.accept("n", 1, 3)  # too old: given up on, not processed late


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reorder window"):
        Deduper(window=0)
