"""Exactly-once processing over at-least-once transport: dedupe on (node, boot, seq).

Per (node, boot) it keeps the highest seq below which everything has been seen, plus the
seqs seen above it within a bounded reorder window. Memory per stream is bounded by the
window; a seq that falls below the window's floor is treated as already seen (duplicate),
and the seqs skipped over are reported as a gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Stream:
    floor: int = 0  # every seq <= floor has been accepted or given up on
    above: set[int] = field(default_factory=set)


class Deduper:
    def __init__(self, window: int = 4096) -> None:
        if window < 1:
            raise ValueError(f"reorder window must be >= 1, got {window}")
        self.window = window
        self._streams: dict[tuple[str, int], _Stream] = {}
        self.duplicates = 0
        self.gaps = 0  # seqs given up on because the window moved past them
        self.dirty: set[tuple[str, int]] = set()  # streams changed since the last persist

    def accept(self, node: str, boot: int, seq: int) -> bool:
        """True the first time (node, boot, seq) is offered, False for every repeat."""
        s = self._streams.get((node, boot))
        if s is None:
            s = self._streams[(node, boot)] = _Stream()
        if seq <= s.floor or seq in s.above:
            self.duplicates += 1
            return False
        s.above.add(seq)
        self.dirty.add((node, boot))
        while s.floor + 1 in s.above:
            s.floor += 1
            s.above.discard(s.floor)
        if s.above and max(s.above) - s.floor > self.window:
            # Give up on the oldest missing seqs so memory stays bounded.
            new_floor = max(s.above) - self.window
            self.gaps += sum(1 for q in range(s.floor + 1, new_floor + 1) if q not in s.above)
            s.above = {q for q in s.above if q > new_floor}
            s.floor = new_floor
            while s.floor + 1 in s.above:
                s.floor += 1
                s.above.discard(s.floor)
        return True

    def streams(self) -> int:
        return len(self._streams)

    def export(self, key: tuple[str, int]) -> tuple[int, list[int]]:
        """(floor, seqs seen above it) of one stream, for persisting."""
        s = self._streams[key]
        return s.floor, sorted(s.above)

    def restore(self, key: tuple[str, int], floor: int, above: list[int]) -> None:
        self._streams[key] = _Stream(floor, set(above))
