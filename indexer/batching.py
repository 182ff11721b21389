"""How chunks travel through the encoder stage: groups of chunks per encode task, and how many
groups are in flight at once.

A chunk is the reader's unit (256 BigEarthNet patches, one Major TOM tile); a group is the
encoder's: consecutive chunks adding up to at least one model batch, so a GPU sees full batches
whatever the chunk size. Groups in flight keep every read slot busy and every encoder fed, within
a memory budget for the raw pixels waiting on the workers.
"""

from __future__ import annotations

import math
from typing import TypeVar

T = TypeVar("T")

BYTES_PER_PATCH = 300_000  # raw pixels of an S2 patch with every band on the 10 m grid (Major TOM)
MEMORY_BUDGET = 4 << 30  # raw pixels in flight across the cluster, at most


def groups(todo: list[T], sizes: list[int], target: int) -> list[list[T]]:
    """Consecutive items whose sizes add up to at least `target` (the last group may be smaller)."""
    out: list[list[T]] = []
    current: list[T] = []
    filled = 0
    for item, size in zip(todo, sizes):
        current.append(item)
        filled += size
        if filled >= target:
            out.append(current)
            current, filled = [], 0
    if current:
        out.append(current)
    return out


def groups_in_flight(read_slots: int, encoder_slots: int, chunks_per_group: float, patches_per_group: float,
                     budget: int = MEMORY_BUDGET) -> int:
    """Enough groups that every read slot has two chunks queued and every encoder two groups,
    but no more raw pixels than `budget` waiting."""
    wanted = max(2 * encoder_slots, math.ceil(2 * read_slots / max(chunks_per_group, 1.0)))
    affordable = max(1, int(budget // max(patches_per_group * BYTES_PER_PATCH, 1)))
    return max(1, min(wanted, affordable))
